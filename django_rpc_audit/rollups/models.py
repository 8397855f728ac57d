"""The rollup tables: calls per hour, method, user and outcome, kept after the rows are gone.

:class:`RPCRollup` holds one row per (hour, method, user, status, sealed): how many rows and
calls, what they cost, how long they took (sum and a fixed-bucket histogram). Rows with
``sealed`` false are remade from the log rows of their hour by every ``rpc_rollup`` run
(:mod:`~django_rpc_audit.rollups.maintain`); rows with ``sealed`` true count log rows that
``rpc_logs_cleanup`` deleted, and only ever grow. A figure is the sum of both.

:class:`RPCRollupBucket` holds one row per hour that was rolled up: when, whether it had
settled, and up to when its log rows were deleted. Its row is the lock every change to the
hour's rollups takes first, so concurrent runs and cleanups never count a row twice.
"""

from __future__ import annotations

from datetime import timedelta

from django.conf import settings
from django.db import models
from django.utils.translation import gettext_lazy as _

from django_rpc_audit.conf import COST_DECIMAL_PLACES

#: Length of a rollup bucket. An hour: a month is 744 buckets per (method, user, status), few
#: enough for a usage report or a 90-day dashboard to sum quickly, while the last hour is
#: still read from the log rows themselves.
BUCKET = timedelta(hours=1)

#: Upper edges (milliseconds) of the duration histogram's buckets, as OpenTelemetry advises for
#: ``rpc.client.call.duration`` (in seconds there); a last bucket holds the slower calls.
DURATION_EDGES_MS: tuple[float, ...] = (
    5,
    10,
    25,
    50,
    75,
    100,
    250,
    500,
    750,
    1000,
    2500,
    5000,
    7500,
    10000,
)

#: The histogram's fields, one per bucket: ``le_<edge>ms`` counts the calls that took more
#: than the previous edge and at most this one; ``gt_10000ms`` the slower ones.
HISTOGRAM_FIELDS: tuple[str, ...] = (
    *(f"le_{edge:g}ms" for edge in DURATION_EDGES_MS),
    f"gt_{DURATION_EDGES_MS[-1]:g}ms",
)

#: Digits of a summed cost: a trillion units at six places and then some.
COST_SUM_MAX_DIGITS = 28


class MethodSums(models.Model):
    """The figures every rollup table of a method and an outcome holds.

    Counts are exact (``rows``) and sample-weighted (``calls``: each row counts
    ``1 / sample_rate`` calls). ``cost`` needs no weighting: a call with a cost is never sampled
    out, so its row has ``sample_rate`` 1. Durations are weighted like ``calls``.
    """

    id = models.BigAutoField(primary_key=True)
    method = models.CharField(_("method"), max_length=255)
    status = models.CharField(_("status"), max_length=16)
    #: Log rows counted.
    rows = models.PositiveBigIntegerField(_("rows"), default=0)
    #: Calls they stand for: the sum of ``1 / sample_rate``.
    calls = models.FloatField(_("calls"), default=0.0)
    #: Rows with a cost (billed calls; never sampled, so also calls).
    billed_calls = models.PositiveBigIntegerField(_("billed calls"), default=0)
    #: Sum of the rows' costs, exact.
    cost = models.DecimalField(
        _("cost"),
        max_digits=COST_SUM_MAX_DIGITS,
        decimal_places=COST_DECIMAL_PLACES,
        default=0,
    )
    #: Calls with a duration (weighted), and the sum of their durations (weighted, ms).
    timed_calls = models.FloatField(_("timed calls"), default=0.0)
    duration_sum_ms = models.FloatField(_("duration sum (ms)"), default=0.0)
    duration_max_ms = models.FloatField(_("longest (ms)"), null=True, blank=True)

    # The duration histogram (weighted calls per bucket, see HISTOGRAM_FIELDS).
    le_5ms = models.FloatField(default=0.0)
    le_10ms = models.FloatField(default=0.0)
    le_25ms = models.FloatField(default=0.0)
    le_50ms = models.FloatField(default=0.0)
    le_75ms = models.FloatField(default=0.0)
    le_100ms = models.FloatField(default=0.0)
    le_250ms = models.FloatField(default=0.0)
    le_500ms = models.FloatField(default=0.0)
    le_750ms = models.FloatField(default=0.0)
    le_1000ms = models.FloatField(default=0.0)
    le_2500ms = models.FloatField(default=0.0)
    le_5000ms = models.FloatField(default=0.0)
    le_7500ms = models.FloatField(default=0.0)
    le_10000ms = models.FloatField(default=0.0)
    gt_10000ms = models.FloatField(default=0.0)

    class Meta:
        abstract = True


class RPCRollup(MethodSums):
    """Calls of one method, by one user, with one outcome, within one hour (the figures of
    :class:`MethodSums`). Several rows may share a key (one ``sealed``, one not): sum them.
    """

    #: Start of the hour (UTC).
    bucket_start = models.DateTimeField(_("hour"))
    #: The user's id, kept after the user is deleted (no constraint, no cascade).
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        verbose_name=_("user"),
        null=True,
        blank=True,
        on_delete=models.DO_NOTHING,
        db_constraint=False,
        related_name="+",
        db_index=False,
    )
    #: The username snapshot of the calls (``RPCLog.username``).
    username = models.CharField(_("username"), max_length=255, blank=True, default="")
    #: Counts log rows ``rpc_logs_cleanup`` deleted (only grows), or else rows still stored
    #: (remade by each ``rpc_rollup`` run).
    sealed = models.BooleanField(_("sealed"), default=False)

    objects: models.Manager[RPCRollup] = models.Manager()

    class Meta:
        verbose_name = _("RPC rollup")
        verbose_name_plural = _("RPC rollups")
        ordering = ("-bucket_start",)
        indexes = (
            # Time windows (dashboard, usage per month); (hour, method) for the per-method view.
            models.Index(fields=["bucket_start", "method"], name="rpcrollup_bucket_method_idx"),
            # One user's usage over a period.
            models.Index(fields=["user", "bucket_start"], name="rpcrollup_user_bucket_idx"),
            # One method's history.
            models.Index(fields=["method", "bucket_start"], name="rpcrollup_method_bucket_idx"),
        )

    def __str__(self) -> str:
        return f"{self.bucket_start:%Y-%m-%d %H:00} {self.method} [{self.status}]"


class RPCRollupBucket(models.Model):
    """One hour that has been rolled up; its row serialises every change to its rollups."""

    #: Start of the hour (UTC).
    start = models.DateTimeField(_("hour"), primary_key=True)
    #: When its unsealed rollups were last remade from the log rows.
    computed_at = models.DateTimeField(_("computed at"), null=True, blank=True)
    #: Remade after ``ROLLUP_SETTLE_SECONDS`` past its end: later runs leave it alone.
    settled = models.BooleanField(_("settled"), default=False)
    #: The log rows of this hour created before it were deleted by ``rpc_logs_cleanup``, after
    #: they were counted in its sealed rollups.
    sealed_before = models.DateTimeField(_("sealed before"), null=True, blank=True)
    #: The hour's calls (weighted) per outcome, from its rollups, remade with its day's rows
    #: (valid while :class:`RPCRollupDay` says the day is not stale); ``pending_calls`` also
    #: counts any status outside :class:`~django_rpc_audit.status.RPCStatus`.
    success_calls = models.FloatField(_("successful calls"), default=0.0)
    failed_calls = models.FloatField(_("failed calls"), default=0.0)
    timeout_calls = models.FloatField(_("timed out calls"), default=0.0)
    rate_limited_calls = models.FloatField(_("rate limited calls"), default=0.0)
    pending_calls = models.FloatField(_("pending calls"), default=0.0)

    objects: models.Manager[RPCRollupBucket] = models.Manager()

    class Meta:
        verbose_name = _("RPC rollup hour")
        verbose_name_plural = _("RPC rollup hours")
        ordering = ("-start",)
        indexes = (models.Index(fields=["settled", "start"], name="rpcrollupbucket_settled_idx"),)

    def __str__(self) -> str:
        return f"{self.start:%Y-%m-%d %H:00}"


#: The columns of the calls per outcome (``pending_calls``: pending and any other status).
OUTCOME_FIELDS: tuple[str, ...] = (
    "success_calls",
    "failed_calls",
    "timeout_calls",
    "rate_limited_calls",
    "pending_calls",
)


class RPCRollupDay(models.Model):
    """One UTC day whose daily rows were made; ``stale`` once one of its hours changed since."""

    #: Midnight (UTC) starting the day.
    day = models.DateTimeField(_("day"), primary_key=True)
    #: An hour of the day changed after its daily rows were made: read its hours instead.
    stale = models.BooleanField(_("stale"), default=True)
    computed_at = models.DateTimeField(_("computed at"), null=True, blank=True)

    objects: models.Manager[RPCRollupDay] = models.Manager()

    class Meta:
        verbose_name = _("RPC rollup day")
        verbose_name_plural = _("RPC rollup days")
        ordering = ("-day",)
        indexes = (models.Index(fields=["stale", "day"], name="rpcrollupday_stale_idx"),)

    def __str__(self) -> str:
        return f"{self.day:%Y-%m-%d}"


class RPCDailyRollup(MethodSums):
    """Calls of one method with one outcome within one UTC day, every user together: the sums
    of the day's hourly :class:`RPCRollup` rows (sealed and unsealed)."""

    day = models.DateTimeField(_("day"))

    objects: models.Manager[RPCDailyRollup] = models.Manager()

    class Meta:
        verbose_name = _("RPC daily rollup")
        verbose_name_plural = _("RPC daily rollups")
        ordering = ("-day",)
        indexes = (models.Index(fields=["day", "method"], name="rpcdailyrollup_day_idx"),)

    def __str__(self) -> str:
        return f"{self.day:%Y-%m-%d} {self.method} [{self.status}]"


class RPCHourlyMethodRollup(MethodSums):
    """Calls of one method with one outcome within one hour, every user together: made with
    its day's daily rows (valid while the day is not stale), for the hours at a window's
    edges, which are not whole days."""

    hour = models.DateTimeField(_("hour"))

    objects: models.Manager[RPCHourlyMethodRollup] = models.Manager()

    class Meta:
        verbose_name = _("RPC hourly method rollup")
        verbose_name_plural = _("RPC hourly method rollups")
        ordering = ("-hour",)
        indexes = (models.Index(fields=["hour", "method"], name="rpchourlymethod_hour_idx"),)

    def __str__(self) -> str:
        return f"{self.hour:%Y-%m-%d %H:00} {self.method} [{self.status}]"


class RPCDailyUserRollup(models.Model):
    """Calls of one user (and username snapshot) within one UTC day, every method together:
    calls per outcome, billed calls and cost, summed from the day's hourly rollups."""

    id = models.BigAutoField(primary_key=True)
    day = models.DateTimeField(_("day"))
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        verbose_name=_("user"),
        null=True,
        blank=True,
        on_delete=models.DO_NOTHING,
        db_constraint=False,
        related_name="+",
        db_index=False,
    )
    username = models.CharField(_("username"), max_length=255, blank=True, default="")
    rows = models.PositiveBigIntegerField(_("rows"), default=0)
    calls = models.FloatField(_("calls"), default=0.0)
    success_calls = models.FloatField(_("successful calls"), default=0.0)
    failed_calls = models.FloatField(_("failed calls"), default=0.0)
    timeout_calls = models.FloatField(_("timed out calls"), default=0.0)
    rate_limited_calls = models.FloatField(_("rate limited calls"), default=0.0)
    pending_calls = models.FloatField(_("pending calls"), default=0.0)
    billed_calls = models.PositiveBigIntegerField(_("billed calls"), default=0)
    cost = models.DecimalField(
        _("cost"),
        max_digits=COST_SUM_MAX_DIGITS,
        decimal_places=COST_DECIMAL_PLACES,
        default=0,
    )

    objects: models.Manager[RPCDailyUserRollup] = models.Manager()

    class Meta:
        verbose_name = _("RPC daily user rollup")
        verbose_name_plural = _("RPC daily user rollups")
        ordering = ("-day",)
        indexes = (
            models.Index(fields=["day"], name="rpcdailyuser_day_idx"),
            models.Index(fields=["user", "day"], name="rpcdailyuser_user_day_idx"),
        )

    def __str__(self) -> str:
        return f"{self.day:%Y-%m-%d} {self.username}"
