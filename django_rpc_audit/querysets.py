"""``RPCLogQuerySet``: reading rows (filters, analytics) and keeping the table tidy (retention).

Rows are written by :mod:`django_rpc_audit.writers`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal, TypedDict, cast

from django.db import connections, models
from django.db.models import Case, Count, ExpressionWrapper, F, Max, Q, Sum, Value, When
from django.db.models.functions import Trunc
from django.utils import timezone

from django_rpc_audit.conf import get_config
from django_rpc_audit.percentiles import as_key, group_key, window_percentiles
from django_rpc_audit.status import RPCStatus
from django_rpc_audit.utils import stored_datetime

if TYPE_CHECKING:
    from django_rpc_audit.models import RPCLog  # noqa: F401  (named in the base class below)

#: ``error_code`` of rows the reaper marked: the call's outcome was never written.
OUTCOME_LOST = "outcome_lost"


class MethodStats(TypedDict):
    """One row of :meth:`RPCLogQuerySet.stats_by_method`."""

    method: str
    total_calls: int
    success_count: int
    failed_count: int
    timeout_count: int
    rate_limited_count: int
    avg_duration_ms: float | None
    p95_duration_ms: float | None


class UserStats(TypedDict):
    """One row of :meth:`RPCLogQuerySet.stats_by_user`."""

    user_id: Any
    username: str | None
    total_calls: int
    success_count: int
    failed_count: int
    timeout_count: int
    rate_limited_count: int
    #: Distinct caller IPs; ``None`` when answered from the rollups, which keep no addresses.
    caller_ip_count: int | None


# -- dashboard analytics types

Bucket = Literal["minute", "hour", "day"]
_BUCKETS: dict[str, timedelta] = {
    "minute": timedelta(minutes=1),
    "hour": timedelta(hours=1),
    "day": timedelta(days=1),
}
_OVERVIEW_PERCENTILES = {"p50_duration_ms": 0.5, "p95_duration_ms": 0.95, "p99_duration_ms": 0.99}


class Overview(TypedDict):
    """What :meth:`RPCLogQuerySet.overview` returns."""

    total_calls: int
    success_count: int
    failed_count: int
    timeout_count: int
    rate_limited_count: int
    pending_count: int
    success_rate: float | None
    error_rate: float | None
    p50_duration_ms: float | None
    p95_duration_ms: float | None
    p99_duration_ms: float | None


class TimeBucket(TypedDict):
    """One bucket of :meth:`RPCLogQuerySet.calls_over_time`."""

    start: datetime
    total_calls: int
    success_count: int
    failed_count: int
    timeout_count: int
    rate_limited_count: int


class MethodCalls(TypedDict):
    """One row of :meth:`RPCLogQuerySet.calls_by_method`."""

    method: str
    total_calls: int
    success_count: int
    failed_count: int
    timeout_count: int
    rate_limited_count: int
    avg_duration_ms: float | None
    max_duration_ms: float | None


class UserCalls(TypedDict):
    """One row of :meth:`RPCLogQuerySet.busiest_users`."""

    user_id: Any
    username: str | None
    total_calls: int
    success_count: int
    failed_count: int
    timeout_count: int
    rate_limited_count: int


def _bucket_start(value: datetime, bucket: str) -> datetime:
    """The start of the bucket holding ``value``, in the current time zone (as ``Trunc``)."""
    if timezone.is_aware(value):
        value = timezone.localtime(value)
    value = value.replace(second=0, microsecond=0)
    if bucket in ("hour", "day"):
        value = value.replace(minute=0)
    if bucket == "day":
        value = value.replace(hour=0)
    return value


def _overview(counts: dict[str, int], percentiles: dict[str, Any]) -> Overview:
    """The :class:`Overview` of a window's call ``counts`` by outcome and its duration
    ``percentiles`` (keys of ``_OVERVIEW_PERCENTILES``), from the rows or the rollups."""
    total, success = counts["total_calls"], counts["success_count"]
    failed, timeout = counts["failed_count"], counts["timeout_count"]
    finished = success + failed + timeout
    rate_limited = counts["rate_limited_count"]
    return Overview(
        total_calls=total,
        success_count=success,
        failed_count=failed,
        timeout_count=timeout,
        rate_limited_count=rate_limited,
        pending_count=total - finished - rate_limited,
        success_rate=100 * success / finished if finished else None,
        error_rate=100 * (failed + timeout) / finished if finished else None,
        p50_duration_ms=percentiles["p50_duration_ms"],
        p95_duration_ms=percentiles["p95_duration_ms"],
        p99_duration_ms=percentiles["p99_duration_ms"],
    )


def _timeline(
    counts: dict[datetime, dict[str, int]], since: datetime, until: datetime, bucket: str
) -> list[TimeBucket]:
    """Every bucket from ``since`` to ``until``, oldest first, with the ``counts`` found for
    it (by bucket start) and zeros where none were."""
    step = _BUCKETS[bucket]
    start, end = _bucket_start(since, bucket), _bucket_start(until, bucket)
    timeline: list[TimeBucket] = []
    while start <= end:
        found = counts.get(start, {})
        timeline.append(
            TimeBucket(
                start=start,
                total_calls=found.get("total_calls", 0),
                success_count=found.get("success_count", 0),
                failed_count=found.get("failed_count", 0),
                timeout_count=found.get("timeout_count", 0),
                rate_limited_count=found.get("rate_limited_count", 0),
            )
        )
        start = _bucket_start(start + step, bucket)
    return timeline


class PercentileCont(models.Aggregate):
    """PostgreSQL's exact ``percentile_cont(fraction) WITHIN GROUP (ORDER BY expression)``."""

    function = "PERCENTILE_CONT"
    name = "percentile_cont"
    output_field = models.FloatField()
    template = "%(function)s(%(fraction)s) WITHIN GROUP (ORDER BY %(expressions)s)"

    def __init__(self, expression: str, fraction: float, **extra: Any) -> None:
        if not 0 <= fraction <= 1:
            raise ValueError("fraction must be between 0 and 1.")
        super().__init__(expression, fraction=float(fraction), **extra)


class PercentilesCont(models.Aggregate):
    """PostgreSQL's ``percentile_cont(ARRAY[fractions]) WITHIN GROUP (ORDER BY expression)``.

    Several percentiles from one sort: PostgreSQL sorts the rows once per ordered-set
    aggregate, so three :class:`PercentileCont` cost three sorts (measured at 1,000,000 rows:
    309 ms against 138 ms for the 233,000 calls of a week).
    """

    function = "PERCENTILE_CONT"
    name = "percentiles_cont"
    template = (
        "%(function)s(ARRAY[%(fractions)s]::float8[]) WITHIN GROUP (ORDER BY %(expressions)s)"
    )

    def __init__(self, expression: str, fractions: Sequence[float], **extra: Any) -> None:
        from django.contrib.postgres.fields import ArrayField

        if not fractions or not all(0 <= fraction <= 1 for fraction in fractions):
            raise ValueError("fractions must be between 0 and 1.")
        # Validated floats, so formatting them into the SQL is safe.
        literals = ", ".join(repr(float(fraction)) for fraction in fractions)
        super().__init__(
            expression,
            fractions=literals,
            output_field=ArrayField(models.FloatField()),
            **extra,
        )


def percentile_cont(sorted_values: Sequence[float], fraction: float) -> float | None:
    """The same interpolated percentile as PostgreSQL's ``percentile_cont``, in Python."""
    if not sorted_values:
        return None
    position = fraction * (len(sorted_values) - 1)
    lower = math.floor(position)
    upper = min(lower + 1, len(sorted_values) - 1)
    return sorted_values[lower] + (position - lower) * (sorted_values[upper] - sorted_values[lower])


def _outcome_counts() -> dict[str, Sum]:
    """The call counts every stats row has: in all, and by outcome.

    Each row counts ``1 / sample_rate`` calls, so under sampling the counts are estimated
    totals (a row logged at rate 0.1 stands for ten calls); :func:`_rounded_counts` makes them
    whole numbers.
    """
    weight = ExpressionWrapper(Value(1.0) / F("sample_rate"), output_field=models.FloatField())
    return {
        "total_calls": Sum(weight),
        "success_count": Sum(weight, filter=Q(status=RPCStatus.SUCCESS)),
        "failed_count": Sum(weight, filter=Q(status=RPCStatus.FAILED)),
        "timeout_count": Sum(weight, filter=Q(status=RPCStatus.TIMEOUT)),
        "rate_limited_count": Sum(weight, filter=Q(status=RPCStatus.RATE_LIMITED)),
    }


def _mean_duration() -> Any:
    """The mean duration of the timed calls, each row weighted as the ``1 / sample_rate``
    calls it stands for (the rollups' mean: the sum of weighted durations over the weighted
    count); the plain mean when nothing is sampled."""
    weight = Value(1.0) / F("sample_rate")
    timed = Case(When(duration_ms__isnull=False, then=weight), output_field=models.FloatField())
    return ExpressionWrapper(
        Sum(F("duration_ms") * weight, output_field=models.FloatField())
        / Sum(timed, output_field=models.FloatField()),
        output_field=models.FloatField(),
    )


def _rounded_counts(row: dict[str, Any]) -> dict[str, int]:
    """The weighted sums of :func:`_outcome_counts` as whole numbers of calls."""
    return {name: round(row[name] or 0) for name in _COUNT_NAMES}


_COUNT_NAMES = (
    "total_calls",
    "success_count",
    "failed_count",
    "timeout_count",
    "rate_limited_count",
)


def _ago(now: datetime, what: str, **delta: float) -> datetime:
    """``now`` minus ``delta``, or a :class:`ValueError` (not an ``OverflowError``) saying
    ``what`` is too large when that reaches outside the calendar (``days=1e7``, ``hours=inf``)."""
    try:
        return now - timedelta(**delta)
    except OverflowError:
        raise ValueError(f"{what} is too large: the window would start before year 1.") from None


class RPCLogQuerySet(models.QuerySet["RPCLog"]):
    """Chainable filters and analytics on ``RPCLog`` rows.

    ::

        RPCLog.objects.filter(user=user).recent(hours=24).failed().count()
        RPCLog.objects.recent(hours=1).stats_by_method()
    """

    # -- filters ------------------------------------------------------------------------------

    def recent(self, hours: float = 24) -> RPCLogQuerySet:
        """Calls started in the last ``hours`` hours."""
        if isinstance(hours, bool) or not isinstance(hours, int | float) or not hours > 0:
            raise ValueError(f"hours must be a positive number, not {hours!r}.")
        return self.filter(created_at__gte=_ago(timezone.now(), f"hours={hours!r}", hours=hours))

    def succeeded(self) -> RPCLogQuerySet:
        """Calls that got a successful reply."""
        return self.filter(status=RPCStatus.SUCCESS)

    def failed(self) -> RPCLogQuerySet:
        """Calls that ended in an error (remote, connection or protocol), timeouts excepted."""
        return self.filter(status=RPCStatus.FAILED)

    def timed_out(self) -> RPCLogQuerySet:
        """Calls that got no reply in time."""
        return self.filter(status=RPCStatus.TIMEOUT)

    def rate_limited(self) -> RPCLogQuerySet:
        """Calls refused by their rate limit (``RATE_LIMITS``): never sent."""
        return self.filter(status=RPCStatus.RATE_LIMITED)

    def pending(self) -> RPCLogQuerySet:
        """Calls still in flight (or whose outcome was never written)."""
        return self.filter(status=RPCStatus.PENDING)

    def slow(self, ms: float = 1000) -> RPCLogQuerySet:
        """Finished calls that took at least ``ms`` milliseconds."""
        return self.filter(duration_ms__gte=ms)

    def flagged_slow(self) -> RPCLogQuerySet:
        """Calls that slow-call detection flagged: slower than their method's recent normal."""
        return self.filter(is_slow=True)

    def for_user(self, user: models.Model | int | str | None) -> RPCLogQuerySet:
        """Calls attributed to ``user`` (an instance or a primary key); ``None``: anonymous."""
        if user is None:
            return self.filter(user__isnull=True)
        if isinstance(user, models.Model):
            return self.filter(user_id=user.pk)
        return self.filter(user_id=user)

    def for_method(self, method: str) -> RPCLogQuerySet:
        """Calls of the RPC method ``method`` (exact name)."""
        return self.filter(method=method)

    # -- analytics ----------------------------------------------------------------------------

    def stats_by_method(self) -> list[MethodStats]:
        """One dict per method: call counts by outcome (``rate_limited_count``: refused by a rate
        limit), mean and 95th-percentile duration.

        Ordered by ``total_calls``, busiest first. The percentile is exact everywhere: on
        PostgreSQL the database's ``percentile_cont``, elsewhere the same interpolation over
        window functions (:mod:`~django_rpc_audit.percentiles`). Pending calls count in
        ``total_calls`` but have no duration. Under sampling each row counts as
        ``1 / sample_rate`` calls, so the counts are estimated totals, and the mean duration
        weighs each row the same way (the rollups' mean); the percentile is that of the logged
        rows. For long windows, :class:`~django_rpc_audit.analytics.CallWindow` answers from
        the rollups. Methods are grouped as the database compares them (on MySQL and
        MariaDB by default regardless of case).
        """
        # django-stubs cannot see annotations passed as **kwargs; the rows are plain dicts.
        rows = cast(
            "models.QuerySet[Any, dict[str, Any]]",
            self.order_by()
            .values("method")
            .annotate(**_outcome_counts(), avg_duration_ms=_mean_duration()),
        )
        on_postgres = connections[self.db].vendor == "postgresql"
        percentiles: dict[Any, list[float | None]] = {}
        if on_postgres:
            rows = rows.annotate(p95_duration_ms=PercentileCont("duration_ms", 0.95))
        else:
            key = group_key("method", self.db)
            rows = rows.annotate(percentile_group=key)
            percentiles = window_percentiles(self, "duration_ms", [0.95], group_by=key)
        stats: list[MethodStats] = [
            MethodStats(
                method=row["method"],
                **_rounded_counts(row),  # type: ignore[typeddict-item]
                avg_duration_ms=row["avg_duration_ms"],
                p95_duration_ms=cast("float | None", row.get("p95_duration_ms"))
                if on_postgres
                else percentiles.get(as_key(row["percentile_group"]), [None])[0],
            )
            for row in rows
        ]
        stats.sort(key=lambda item: (-item["total_calls"], item["method"]))
        return stats

    def stats_by_user(self) -> list[UserStats]:
        """One dict per user (``None``: calls without a user), busiest first.

        ``username`` is the value of the user model's ``USERNAME_FIELD``. Counts are estimated
        totals under sampling, as in :meth:`stats_by_method`.
        """
        from django.contrib.auth import get_user_model

        username_field = get_user_model().USERNAME_FIELD
        rows = (
            self.order_by()
            .values("user_id", f"user__{username_field}")
            .annotate(
                **_outcome_counts(),
                caller_ip_count=Count("caller_ip", distinct=True),
            )
        )
        stats = [
            UserStats(
                user_id=row["user_id"],
                username=row[f"user__{username_field}"],
                **_rounded_counts(row),  # type: ignore[typeddict-item]
                caller_ip_count=row["caller_ip_count"],
            )
            for row in rows
        ]
        stats.sort(key=lambda item: (-item["total_calls"], str(item["username"] or "")))
        return stats

    # -- retention ----------------------------------------------------------------------------

    def prune(
        self,
        days: float | None = None,
        *,
        batch_size: int = 5_000,
        dry_run: bool = False,
    ) -> int:
        """Delete rows started more than ``days`` days ago (default ``RETENTION_DAYS``).

        Returns how many rows were deleted (with ``dry_run``: would be). Deletes hour by hour,
        each hour its own transaction that first counts the rows in the hour's rollups (so
        usage reports and bills are unchanged, see :func:`~django_rpc_audit.rollups.maintain.
        seal_and_delete`), ``batch_size`` primary keys per statement; inserts go on meanwhile.
        A row still ``pending`` and younger than ``RPC_TIMEOUT`` plus ``REAP_MARGIN_SECONDS``
        is never deleted: its call may still be running. Applies to the rows
        this queryset selects::

            RPCLog.objects.prune(days=30)
            RPCLog.objects.for_method("system.ping").prune(days=1)
        """
        candidates = self._prunable(days)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, not {batch_size!r}.")
        if dry_run:
            return candidates.count()
        # Counted in the rollups in the transaction that deletes them: usage reports and bills
        # outlive the rows (django_rpc_audit.rollups.maintain).
        from django_rpc_audit.rollups.maintain import seal_and_delete

        return seal_and_delete(candidates, batch_size=batch_size)

    def _prunable(self, days: float | None) -> RPCLogQuerySet:
        config = get_config()
        if days is None:
            days = config.retention_days
        if isinstance(days, bool) or not isinstance(days, int | float) or not days >= 0:
            raise ValueError(f"days must be a number >= 0, not {days!r}.")
        now = timezone.now()
        in_flight = _ago(
            now,
            "RPC_TIMEOUT + REAP_MARGIN_SECONDS",
            seconds=config.rpc_timeout + config.reap_margin_seconds,
        )
        return self.filter(created_at__lt=_ago(now, f"days={days!r}", days=days)).exclude(
            status=RPCStatus.PENDING, created_at__gte=in_flight
        )

    def stale(self, timeout: float | None = None) -> RPCLogQuerySet:
        """Rows pending for longer than ``timeout`` (default ``RPC_TIMEOUT``) plus the margin.

        Their call can no longer be waiting for a reply: the process that made it died (or its
        finishing write was lost).
        """
        config = get_config()
        if timeout is None:
            timeout = config.rpc_timeout
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout >= 0:
            raise ValueError(f"timeout must be a number of seconds >= 0, not {timeout!r}.")
        cutoff = _ago(
            timezone.now(),
            f"timeout={timeout!r} (plus REAP_MARGIN_SECONDS)",
            seconds=timeout + config.reap_margin_seconds,
        )
        return self.pending().filter(created_at__lt=cutoff)

    def reap(self, timeout: float | None = None, *, dry_run: bool = False) -> int:
        """Mark :meth:`stale` rows as ``timeout`` with error code ``outcome_lost``.

        Returns the number of rows marked (with ``dry_run``: that would be). ::

            RPCLog.objects.reap()  # what ``manage.py rpc_logs_reap`` does
        """
        stale = self.stale(timeout)
        if dry_run:
            return stale.count()
        return stale.update(
            status=RPCStatus.TIMEOUT,
            error_code=OUTCOME_LOST,
            error_message=(
                "The call never reported an outcome (its process probably died); "
                "marked as timed out by rpc_logs_reap."
            ),
            completed_at=stored_datetime(timezone.now()),
        )

    # -- dashboard analytics ------------------------------------------------------------------

    def unsuccessful(self) -> RPCLogQuerySet:
        """Calls that failed or timed out."""
        return self.filter(status__in=(RPCStatus.FAILED, RPCStatus.TIMEOUT))

    def overview(self) -> Overview:
        """Call counts by outcome, success and error rates, and p50 / p95 / p99 duration.

        The rates are percentages of the calls that were sent and finished (pending ones have
        no outcome yet, rate-limited ones were never sent), ``None`` when there are none;
        ``rate_limited_count`` counts the refused calls. On PostgreSQL one aggregate query
        computes it all; elsewhere a second query computes the same percentiles over window
        functions.
        """
        on_postgres = connections[self.db].vendor == "postgresql"
        aggregates: dict[str, Any] = dict(_outcome_counts())
        if on_postgres:
            aggregates["percentiles"] = PercentilesCont(
                "duration_ms", list(_OVERVIEW_PERCENTILES.values())
            )
        row = self.order_by().aggregate(**aggregates)
        if on_postgres:
            values = row.pop("percentiles") or [None] * len(_OVERVIEW_PERCENTILES)
            row.update(zip(_OVERVIEW_PERCENTILES, values, strict=True))
        if not on_postgres:
            fractions = list(_OVERVIEW_PERCENTILES.values())
            values = window_percentiles(self, "duration_ms", fractions).get(None)
            row.update(zip(_OVERVIEW_PERCENTILES, values or [None] * len(fractions), strict=True))
        return _overview(_rounded_counts(row), row)

    def calls_over_time(
        self, *, since: datetime, bucket: Bucket = "minute", until: datetime | None = None
    ) -> list[TimeBucket]:
        """Call counts by outcome per ``bucket`` (``"minute"``, ``"hour"`` or ``"day"``) from
        ``since``.

        Every bucket from ``since`` to ``until`` (default: now) is present, empty ones with
        zero counts, in order; buckets follow the current time zone.
        """
        if bucket not in _BUCKETS:
            raise ValueError(f"bucket must be one of {', '.join(_BUCKETS)}, not {bucket!r}.")
        until = timezone.now() if until is None else until
        rows = cast(
            "Iterable[dict[str, Any]]",
            self.filter(created_at__gte=since, created_at__lte=until)
            .annotate(bucket=Trunc("created_at", bucket))
            .order_by()
            .values("bucket")
            .annotate(**_outcome_counts()),
        )
        counts = {row["bucket"]: _rounded_counts(row) for row in rows}
        return _timeline(counts, since, until, bucket)

    def calls_by_method(self) -> list[MethodCalls]:
        """Per method: call counts by outcome, mean and longest duration; busiest first.

        :meth:`stats_by_method` without its percentile, which sorts every call: this one is
        a single hash aggregation, cheap enough for a dashboard's week of calls.
        """
        grouped = self.order_by().values("method")
        if connections[self.db].vendor == "mysql":
            # Grouped by the collation key too (the same groups), so MySQL / MariaDB cannot
            # group by reading the whole (method, created_at) index: ten times slower.
            grouped = grouped.annotate(method_group=group_key("method", self.db))
        rows = cast(
            "Iterable[dict[str, Any]]",
            grouped.annotate(
                **_outcome_counts(),
                avg_duration_ms=_mean_duration(),
                max_duration_ms=Max("duration_ms"),
            ),
        )
        calls = [
            MethodCalls(
                method=row["method"],
                **_rounded_counts(row),  # type: ignore[typeddict-item]
                avg_duration_ms=row["avg_duration_ms"],
                max_duration_ms=row["max_duration_ms"],
            )
            for row in rows
        ]
        calls.sort(key=lambda item: (-item["total_calls"], item["method"]))
        return calls

    def busiest_users(self, limit: int = 10) -> list[UserCalls]:
        """The ``limit`` users with the most calls (``user_id`` ``None``: no user), busiest first.

        Grouped on the user column alone, then the usernames of those few users are read:
        no join over the whole window.
        """
        from django.contrib.auth import get_user_model

        # django-stubs cannot see annotations passed as **kwargs; the rows are plain dicts.
        grouped = cast(
            "models.QuerySet[Any, dict[str, Any]]",
            self.order_by().values("user_id").annotate(**_outcome_counts()),
        )
        rows = list(grouped.order_by("-total_calls", "user_id")[:limit])
        user_model = get_user_model()
        users = user_model._default_manager.in_bulk(
            [row["user_id"] for row in rows if row["user_id"] is not None]
        )
        return [
            UserCalls(
                user_id=row["user_id"],
                username=users[row["user_id"]].get_username() if row["user_id"] in users else None,
                **_rounded_counts(row),  # type: ignore[typeddict-item]
            )
            for row in rows
        ]

    def recent_methods(self, rows: int = 10_000) -> list[str]:
        """The method names among the latest ``rows`` calls, sorted: a bounded, indexed read."""
        latest = self.order_by("-created_at").values_list("method", flat=True)[:rows]
        return sorted(set(latest))

    def recent_user_ids(self, rows: int = 10_000) -> list[Any]:
        """The ids of the users among the latest ``rows`` calls: a bounded, indexed read."""
        latest = self.order_by("-created_at").values_list("user_id", flat=True)[:rows]
        return sorted({user_id for user_id in latest if user_id is not None})
