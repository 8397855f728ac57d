"""Rollups: hourly counts, costs and durations that outlive the log rows they were made from.

- :mod:`~django_rpc_audit.rollups.models`: the tables,
  :class:`~django_rpc_audit.rollups.models.RPCRollup` (per hour, method, user and status) and
  :class:`~django_rpc_audit.rollups.models.RPCRollupBucket` (per hour: when it was rolled up,
  and the lock).
- :mod:`~django_rpc_audit.rollups.maintain`: keeping them:
  :func:`~django_rpc_audit.rollups.maintain.roll_up` (``rpc_rollup``), which remakes recent
  hours from the log rows, and :func:`~django_rpc_audit.rollups.maintain.seal_and_delete`
  (``rpc_logs_cleanup``), which counts log rows into the sealed rollups as it deletes them;
  and the daily tables (:class:`~django_rpc_audit.rollups.models.RPCDailyRollup`,
  :class:`~django_rpc_audit.rollups.models.RPCDailyUserRollup`) summed from them per UTC day,
  remade whole when a day's hours change
  (:func:`~django_rpc_audit.rollups.maintain.refresh_days`).

- :mod:`~django_rpc_audit.rollups.read`: reading a time window from them, completed by the
  log rows not rolled up yet (the dashboard's long windows,
  :class:`~django_rpc_audit.analytics.CallWindow`).

Usage reports read them in :mod:`django_rpc_audit.usage`.
"""
