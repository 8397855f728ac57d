"""Alerts: signed webhooks on failed, timed-out and slow calls, and slow-call detection.

Settings live in ``DJANGO_CFG_RPC`` (``WEBHOOKS``, ``WEBHOOK_*``, ``SLOW_CALL_*``,
``ADMIN_BASE_URL``); see ``docs/alerts.md``. The modules, in the order an alert travels:

- :mod:`~django_rpc_audit.alerts.slow`: the per-process, per-method baseline that flags a slow
  call on the caller's thread (O(1), no I/O); the client sends ``rpc_slow`` and marks the row.
- :mod:`~django_rpc_audit.alerts.endpoints`: the ``WEBHOOKS`` setting parsed into
  :class:`~django_rpc_audit.alerts.endpoints.WebhookEndpoint` values, and their filters.
- :mod:`~django_rpc_audit.alerts.outbox`: the writers add the alerts of the calls they log to
  the outbox table, in the same transaction as the log rows (durable once logged).
- :mod:`~django_rpc_audit.alerts.models`: the outbox (``WebhookDelivery``, one row per
  delivery, visible in the admin) and ``WebhookEndpointState`` (endpoints disabled by a 410).
- :mod:`~django_rpc_audit.alerts.payload`: what an alert or a digest says, and its body
  (Standard Webhooks envelope, or Slack's ``{"text"}``).
- :mod:`~django_rpc_audit.alerts.storm`: storm control, one window per kind of alert,
  coordinated across processes and hosts through Redis.
- :mod:`~django_rpc_audit.alerts.signing`: Standard Webhooks signatures.
- :mod:`~django_rpc_audit.alerts.delivery`: claim due rows (``FOR UPDATE SKIP LOCKED``), send,
  retry with backoff and jitter, give up, disable on 410.
- :mod:`~django_rpc_audit.alerts.worker`: the background delivery thread of each process that
  logs calls; ``manage.py rpc_webhooks_deliver`` runs the same loop in the foreground.
- :mod:`~django_rpc_audit.alerts.admin`: the deliveries in the admin, with "send again".
"""
