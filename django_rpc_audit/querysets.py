"""``RPCLogQuerySet``: the query API (filters, analytics) and the write API behind the writers."""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import json
import math
import time
import uuid
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal, TypedDict, cast

from django.conf import settings
from django.db import connections, models, transaction
from django.db.models import Avg, Count, ExpressionWrapper, F, Max, Q, Subquery, Sum, Value
from django.db.models.functions import Trunc
from django.utils import timezone

from django_rpc_audit.conf import get_config
from django_rpc_audit.sanitize import cap_text, clean_text, stored_json_and_text
from django_rpc_audit.status import RPCStatus

if TYPE_CHECKING:
    from django_rpc_audit.models import RPCLog

# Row ids are derived from the call's identity, so the finishing write finds the row the
# starting write made (or makes it, if that write was lost) without any shared state.
_LOG_ID_NAMESPACE = uuid.UUID("6f1d2c1e-7a53-4c53-9a8e-2f4d1b0c9e71")


def call_log_id(correlation_id: str, started_at: datetime) -> uuid.UUID:
    """The primary key of the row logging the call ``correlation_id`` started at ``started_at``:
    the uuid5 of both in the package's namespace (see :func:`call_log_id_hex`)."""
    return uuid.UUID(hex=call_log_id_hex(correlation_id, started_at))


_NAMESPACE_BYTES = _LOG_ID_NAMESPACE.bytes
# uuid5's version and variant bits, as uuid.UUID(..., version=5) sets them.
_UUID_CLEAR = ~((0xC000 << 48) | (0xF000 << 64))
_UUID_SET = (0x8000 << 48) | (5 << 76)


def call_log_id_hex(correlation_id: str, started_at: datetime) -> str:
    """:func:`call_log_id` as 32 hex digits (what PostgreSQL's ``uuid`` input takes), made
    without building a ``uuid.UUID``: the same SHA-1 and bits as ``uuid.uuid5`` of
    ``"<correlation_id>|<started_at ISO>"`` in the package's namespace."""
    name = f"{correlation_id}|{started_at.isoformat()}".encode()
    digest = hashlib.sha1(_NAMESPACE_BYTES + name, usedforsecurity=False).digest()
    number = int.from_bytes(digest[:16], "big") & _UUID_CLEAR | _UUID_SET
    return f"{number:032x}"


#: ``error_code`` of rows the reaper marked: the call's outcome was never written.
OUTCOME_LOST = "outcome_lost"


class MethodStats(TypedDict):
    """One row of :meth:`RPCLogQuerySet.stats_by_method`."""

    method: str
    total_calls: int
    success_count: int
    failed_count: int
    timeout_count: int
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
    caller_ip_count: int


# -- dashboard analytics types

Bucket = Literal["minute", "hour"]
_BUCKETS: dict[str, timedelta] = {"minute": timedelta(minutes=1), "hour": timedelta(hours=1)}
_OVERVIEW_PERCENTILES = {"p50_duration_ms": 0.5, "p95_duration_ms": 0.95, "p99_duration_ms": 0.99}


class Overview(TypedDict):
    """What :meth:`RPCLogQuerySet.overview` returns."""

    total_calls: int
    success_count: int
    failed_count: int
    timeout_count: int
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


class MethodCalls(TypedDict):
    """One row of :meth:`RPCLogQuerySet.calls_by_method`."""

    method: str
    total_calls: int
    success_count: int
    failed_count: int
    timeout_count: int
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


def _bucket_start(value: datetime, bucket: str) -> datetime:
    """The start of the bucket holding ``value``, in the current time zone (as ``Trunc``)."""
    if timezone.is_aware(value):
        value = timezone.localtime(value)
    value = value.replace(second=0, microsecond=0)
    if bucket == "hour":
        value = value.replace(minute=0)
    return value


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
    }


def _rounded_counts(row: dict[str, Any]) -> dict[str, int]:
    """The weighted sums of :func:`_outcome_counts` as whole numbers of calls."""
    return {name: round(row[name] or 0) for name in _COUNT_NAMES}


_COUNT_NAMES = ("total_calls", "success_count", "failed_count", "timeout_count")


def _stored_datetime(value: datetime) -> datetime:
    """Signals carry aware UTC datetimes; a project with ``USE_TZ = False`` stores naive ones."""
    if not settings.USE_TZ and timezone.is_aware(value):
        return timezone.make_naive(value)
    return value


def _truncate(value: object, limit: int) -> str:
    """``value`` as text a database column accepts: NUL removed (PostgreSQL refuses it), capped."""
    text = "" if value is None else str(value)
    return clean_text(text.replace("\x00", ""))[:limit]


def _capped_text(value: object, max_bytes: int) -> str:
    """``value`` as text a database column accepts, at most ``max_bytes`` UTF-8 bytes."""
    if value is None:
        return ""
    try:
        text = value if isinstance(value, str) else str(value)
    except Exception:
        text = f"<unprintable {type(value).__qualname__}>"
    return cap_text(clean_text(text), max_bytes)


def stored_json(value: Any, max_bytes: int) -> Any:
    """``value`` as the JSON a JSON column stores: sanitized, then capped at ``max_bytes``."""
    return stored_json_and_text(value, max_bytes)[0]


def stored_json_text(value: Any, max_bytes: int) -> str:
    """The compact JSON text of :func:`stored_json`'s value, made without a second dump."""
    return stored_json_and_text(value, max_bytes)[1]


def _ip_or_none(value: object) -> str | None:
    if not value:
        return None
    return _parsed_ip(str(value))


@functools.lru_cache(maxsize=4096)
def _parsed_ip(value: str) -> str | None:
    """The canonical form of the address ``value``, or ``None``; cached: a site sees the same
    few addresses again and again, and ``ipaddress`` parses in Python."""
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id:
        # PostgreSQL's inet refuses a zone index ("fe80::1%eth0").
        address = ipaddress.IPv6Address(str(address).partition("%")[0])
    return str(address)


class RPCLogQuerySet(models.QuerySet["RPCLog"]):
    """Chainable filters and analytics on ``RPCLog`` rows.

    ::

        RPCLog.objects.filter(user=user).recent(hours=24).failed().count()
        RPCLog.objects.recent(hours=1).stats_by_method()
    """

    # -- filters ------------------------------------------------------------------------------

    def recent(self, hours: float = 24) -> RPCLogQuerySet:
        """Calls started in the last ``hours`` hours."""
        if isinstance(hours, bool) or not isinstance(hours, int | float) or hours <= 0:
            raise ValueError(f"hours must be a positive number, not {hours!r}.")
        return self.filter(created_at__gte=timezone.now() - timedelta(hours=hours))

    def succeeded(self) -> RPCLogQuerySet:
        """Calls that got a successful reply."""
        return self.filter(status=RPCStatus.SUCCESS)

    def failed(self) -> RPCLogQuerySet:
        """Calls that ended in an error (remote, connection or protocol), timeouts excepted."""
        return self.filter(status=RPCStatus.FAILED)

    def timed_out(self) -> RPCLogQuerySet:
        """Calls that got no reply in time."""
        return self.filter(status=RPCStatus.TIMEOUT)

    def pending(self) -> RPCLogQuerySet:
        """Calls still in flight (or whose outcome was never written)."""
        return self.filter(status=RPCStatus.PENDING)

    def slow(self, ms: float = 1000) -> RPCLogQuerySet:
        """Finished calls that took at least ``ms`` milliseconds."""
        return self.filter(duration_ms__gte=ms)

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
        """One dict per method: call counts by outcome, mean and 95th-percentile duration.

        Ordered by ``total_calls``, busiest first. On PostgreSQL the percentile is computed
        exactly by the database (``percentile_cont``); on other databases it is computed
        exactly in Python from the durations, which reads one float per finished call.
        Pending calls count in ``total_calls`` but have no duration. Under sampling each row
        counts as ``1 / sample_rate`` calls, so the counts are estimated totals; durations are
        those of the logged rows.
        """
        # django-stubs cannot see annotations passed as **kwargs; the rows are plain dicts.
        rows = cast(
            "models.QuerySet[Any, dict[str, Any]]",
            self.order_by()
            .values("method")
            .annotate(**_outcome_counts(), avg_duration_ms=Avg("duration_ms")),
        )
        on_postgres = connections[self.db].vendor == "postgresql"
        if on_postgres:
            rows = rows.annotate(p95_duration_ms=PercentileCont("duration_ms", 0.95))
        stats: list[MethodStats] = [
            MethodStats(
                method=row["method"],
                **_rounded_counts(row),  # type: ignore[typeddict-item]
                avg_duration_ms=row["avg_duration_ms"],
                p95_duration_ms=cast("float | None", row.get("p95_duration_ms")),
            )
            for row in rows
        ]
        if not on_postgres:
            durations = self._durations_by_method()
            for item in stats:
                item["p95_duration_ms"] = percentile_cont(durations[item["method"]], 0.95)
        stats.sort(key=lambda item: (-item["total_calls"], item["method"]))
        return stats

    def _durations_by_method(self) -> dict[str, list[float]]:
        durations: dict[str, list[float]] = defaultdict(list)
        rows = cast(
            "Iterable[tuple[str, float]]",
            self.filter(duration_ms__isnull=False)
            .order_by("method", "duration_ms")
            .values_list("method", "duration_ms")
            .iterator(chunk_size=10_000),
        )
        for method, duration in rows:
            durations[method].append(duration)
        return durations

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

        Returns how many rows were deleted (with ``dry_run``: would be). Deletes in batches of
        ``batch_size`` primary keys, each batch its own short transaction, so no long lock is
        held and inserts go on meanwhile. A row still ``pending`` and younger than
        ``RPC_TIMEOUT`` plus ``REAP_MARGIN_SECONDS`` is never deleted: its call may still be
        running. Bigger batches are not faster: on a million rows PostgreSQL plans a table
        scan per batch at 20,000 (see README, Performance). Applies to the rows this queryset
        selects::

            RPCLog.objects.prune(days=30)
            RPCLog.objects.for_method("system.ping").prune(days=1)
        """
        candidates = self._prunable(days)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, not {batch_size!r}.")
        if dry_run:
            return candidates.count()
        deleted = 0
        while True:
            with transaction.atomic(using=self.db):
                count = candidates._delete_oldest(batch_size)
            deleted += count
            if count < batch_size:
                return deleted

    def _delete_oldest(self, limit: int) -> int:
        """Delete the ``limit`` oldest rows of this queryset, chosen by primary key."""
        oldest = self.order_by("created_at").values("pk")[:limit]
        if connections[self.db].vendor == "mysql":
            # MySQL refuses LIMIT in an IN subquery: fetch the keys first.
            chosen: Any = list(oldest.values_list("pk", flat=True))
        else:
            # One statement, no keys through Python: several times faster on PostgreSQL.
            chosen = Subquery(oldest)
        # The conditions apply again to the chosen keys: a row may have changed meanwhile.
        count, _ = self.filter(pk__in=chosen).order_by().delete()
        return count

    def _prunable(self, days: float | None) -> RPCLogQuerySet:
        config = get_config()
        if days is None:
            days = config.retention_days
        if isinstance(days, bool) or not isinstance(days, int | float) or not days >= 0:
            raise ValueError(f"days must be a number >= 0, not {days!r}.")
        now = timezone.now()
        in_flight = now - timedelta(seconds=config.rpc_timeout + config.reap_margin_seconds)
        return self.filter(created_at__lt=now - timedelta(days=days)).exclude(
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
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout < 0:
            raise ValueError(f"timeout must be a number of seconds >= 0, not {timeout!r}.")
        cutoff = timezone.now() - timedelta(seconds=timeout + config.reap_margin_seconds)
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
            completed_at=_stored_datetime(timezone.now()),
        )

    # -- writes (used by the log writers) -----------------------------------------------------

    def record_started(
        self,
        *,
        correlation_id: str,
        method: str,
        params: Any,
        user: Any,
        caller_ip: str | None,
        user_agent: str | None,
        started_at: datetime,
        **extra: Any,
    ) -> RPCLog:
        """Insert the ``pending`` row of a call that has just started (``rpc_started``'s kwargs)."""
        return self.create(
            **_started_row(correlation_id, method, params, user, caller_ip, user_agent, started_at)
        )

    def record_finished(
        self,
        *,
        correlation_id: str,
        method: str,
        params: Any,
        user: Any,
        caller_ip: str | None,
        user_agent: str | None,
        started_at: datetime,
        status: str,
        response: Any,
        error_code: str | None,
        error_message: str | None,
        duration_ms: float | None,
        completed_at: datetime,
        sample_rate: float = 1.0,
        **extra: Any,
    ) -> None:
        """Complete the row of a finished call (``rpc_finished``'s kwargs).

        If the ``pending`` row is missing (its write failed, or nobody wrote it), the whole
        row is inserted now: a finished call never loses its row.
        """
        log_id = call_log_id(correlation_id, started_at)
        outcome = outcome_values(
            status=status,
            response=response,
            error_code=error_code,
            error_message=error_message,
            duration_ms=duration_ms,
            completed_at=completed_at,
            sample_rate=sample_rate,
        )
        if self.filter(pk=log_id).update(**outcome):
            return
        self.create(
            **_started_row(correlation_id, method, params, user, caller_ip, user_agent, started_at),
            **outcome,
        )

    # -- dashboard analytics ------------------------------------------------------------------

    def unsuccessful(self) -> RPCLogQuerySet:
        """Calls that failed or timed out."""
        return self.filter(status__in=(RPCStatus.FAILED, RPCStatus.TIMEOUT))

    def overview(self) -> Overview:
        """Call counts by outcome, success and error rates, and p50 / p95 / p99 duration.

        The rates are percentages of the *finished* calls (pending ones have no outcome yet),
        ``None`` when no call has finished. On PostgreSQL one aggregate query computes it all;
        elsewhere the percentiles are computed in Python from the durations.
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
            durations = cast(
                "list[float]",
                list(
                    self.filter(duration_ms__isnull=False)
                    .order_by("duration_ms")
                    .values_list("duration_ms", flat=True)
                ),
            )
            for name, fraction in _OVERVIEW_PERCENTILES.items():
                row[name] = percentile_cont(durations, fraction)
        counts = _rounded_counts(row)
        total, success = counts["total_calls"], counts["success_count"]
        failed, timeout = counts["failed_count"], counts["timeout_count"]
        finished = success + failed + timeout
        return Overview(
            total_calls=total,
            success_count=success,
            failed_count=failed,
            timeout_count=timeout,
            pending_count=total - finished,
            success_rate=100 * success / finished if finished else None,
            error_rate=100 * (failed + timeout) / finished if finished else None,
            p50_duration_ms=row["p50_duration_ms"],
            p95_duration_ms=row["p95_duration_ms"],
            p99_duration_ms=row["p99_duration_ms"],
        )

    def calls_over_time(
        self, *, since: datetime, bucket: Bucket = "minute", until: datetime | None = None
    ) -> list[TimeBucket]:
        """Call counts by outcome per ``bucket`` (``"minute"`` or ``"hour"``) from ``since``.

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
        step = _BUCKETS[bucket]
        start, end = _bucket_start(since, bucket), _bucket_start(until, bucket)
        timeline: list[TimeBucket] = []
        while start <= end:
            bucket_counts = counts.get(start, {})
            timeline.append(
                TimeBucket(
                    start=start,
                    total_calls=bucket_counts.get("total_calls", 0),
                    success_count=bucket_counts.get("success_count", 0),
                    failed_count=bucket_counts.get("failed_count", 0),
                    timeout_count=bucket_counts.get("timeout_count", 0),
                )
            )
            start = _bucket_start(start + step, bucket)
        return timeline

    def calls_by_method(self) -> list[MethodCalls]:
        """Per method: call counts by outcome, mean and longest duration; busiest first.

        :meth:`stats_by_method` without its percentile, which sorts every call: this one is
        a single hash aggregation, cheap enough for a dashboard's week of calls.
        """
        rows = cast(
            "Iterable[dict[str, Any]]",
            self.order_by()
            .values("method")
            .annotate(
                **_outcome_counts(),
                avg_duration_ms=Avg("duration_ms"),
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


def outcome_values(
    *,
    status: str,
    response: Any,
    error_code: str | None,
    error_message: str | None,
    duration_ms: float | None,
    completed_at: datetime,
    sample_rate: float = 1.0,
    json_text: bool = False,
) -> dict[str, Any]:
    """Column values known when a call ends, made safe to store (sanitized, capped).

    ``sample_rate`` is the share of such calls that are logged (1.0 unless sampled). With
    ``json_text`` the JSON column holds its compact JSON text instead (for ``COPY``).
    """
    config = get_config()
    to_json = stored_json_text if json_text else stored_json
    return {
        "status": status,
        "response": None if response is None else to_json(response, config.max_response_bytes),
        "error_code": _truncate(error_code, 100),
        "error_message": _capped_text(error_message, config.max_error_message_bytes),
        "duration_ms": duration_ms,
        "completed_at": _stored_datetime(completed_at),
        "sample_rate": sample_rate,
    }


def _started_values(
    correlation_id: str,
    method: str,
    params: Any,
    user: Any,
    caller_ip: str | None,
    user_agent: str | None,
    json_text: bool = False,
) -> dict[str, Any]:
    """Column values known when a call starts, made safe to store whatever the caller passed.

    Params are sanitized (:func:`~django_rpc_audit.sanitize.sanitize`) and capped at
    ``MAX_PARAMS_BYTES``; the user agent at ``MAX_USER_AGENT_BYTES``. With ``json_text``
    the JSON column holds its compact JSON text instead (for ``COPY``).
    """
    config = get_config()
    user_pk = getattr(user, "pk", None) if isinstance(user, models.Model) else None
    if params is None:
        stored_params: Any = "{}" if json_text else {}
    else:
        to_json = stored_json_text if json_text else stored_json
        stored_params = to_json(params, config.max_params_bytes)
    return {
        "correlation_id": _truncate(correlation_id, 64),
        "method": _truncate(method, 255),
        "params": stored_params,
        "user_id": user_pk,
        "caller_ip": _ip_or_none(caller_ip),
        "user_agent": _capped_text(user_agent, config.max_user_agent_bytes),
    }


def _started_row(
    correlation_id: str,
    method: str,
    params: Any,
    user: Any,
    caller_ip: str | None,
    user_agent: str | None,
    started_at: datetime,
    *,
    for_copy: bool = False,
) -> dict[str, Any]:
    """The ``pending`` row of a call: its id, :func:`_started_values` and ``created_at``.

    With ``for_copy`` the id is hex digits and the JSON columns JSON text, as ``COPY`` takes
    them.
    """
    return {
        "id": (call_log_id_hex if for_copy else call_log_id)(correlation_id, started_at),
        **_started_values(
            correlation_id, method, params, user, caller_ip, user_agent, json_text=for_copy
        ),
        "created_at": _stored_datetime(started_at),
    }


# -- bulk writes (buffered writer) ------------------------------------------------------------

#: The event keys :func:`_started_values` takes. Adding a key to an event is one line here.
STARTED_KEYS: tuple[str, ...] = (
    "correlation_id",
    "method",
    "params",
    "user",
    "caller_ip",
    "user_agent",
)
#: The ``rpc_finished`` keys :func:`outcome_values` takes (the event has the started ones too).
OUTCOME_KEYS: tuple[str, ...] = (
    "status",
    "response",
    "error_code",
    "error_message",
    "duration_ms",
    "completed_at",
    "sample_rate",
)


def is_finished_event(event: Mapping[str, Any]) -> bool:
    """True for ``rpc_finished``'s arguments, false for ``rpc_started``'s."""
    return "status" in event


def event_row_values(event: Mapping[str, Any], *, for_copy: bool = False) -> dict[str, Any]:
    """Every column of the row an ``rpc_started`` or ``rpc_finished`` event stands for.

    A started event gives a ``pending`` row; a finished one (which repeats the started keys)
    the whole row in its final state. Keys the helpers do not take are ignored, so events
    may carry more than today's keys. With ``for_copy`` the JSON columns hold their compact
    JSON text (``None`` stays ``None``: SQL ``NULL``) and ``id`` its hex digits, as ``COPY``
    takes them.
    """
    started: dict[str, Any] = {key: event.get(key) for key in STARTED_KEYS}
    values = _started_row(**started, started_at=event["started_at"], for_copy=for_copy)
    if is_finished_event(event):
        # rpc_finished always sends the outcome; the receivers add sample_rate (default 1.0).
        outcome: dict[str, Any] = {key: event[key] for key in OUTCOME_KEYS if key in event}
        values.update(outcome_values(**outcome, json_text=for_copy))
    return values


def bulk_record_events(queryset: RPCLogQuerySet, events: Sequence[Mapping[str, Any]]) -> int:
    """Write the rows of ``events`` (at most one per call) in one transaction; return the count.

    Idempotent, so a batch can be retried after a partial failure or a lost commit reply:
    finished calls are upserted (``INSERT ... ON CONFLICT (id) DO UPDATE``), pending ones
    inserted unless their row exists (``ON CONFLICT DO NOTHING``), so a late pending write
    never turns a finished row back to ``pending``.
    """
    from django.db import transaction

    connection = connections[queryset.db]
    if connection.vendor == "postgresql" and _copy_supported(connection):
        with transaction.atomic(using=queryset.db):
            return _copy_record_events(queryset, connection, events)
    model = queryset.model
    finished: list[RPCLog] = []
    pending: list[RPCLog] = []
    for event in events:
        row = model(**event_row_values(event))
        (finished if is_finished_event(event) else pending).append(row)
    with transaction.atomic(using=queryset.db):
        if finished:
            update_fields = [f.name for f in model._meta.concrete_fields if not f.primary_key]
            queryset.bulk_create(
                finished,
                update_conflicts=True,
                unique_fields=["id"],
                update_fields=update_fields,
            )
        if pending:
            queryset.bulk_create(pending, ignore_conflicts=True)
    return len(finished) + len(pending)


def _yield_the_gil() -> None:
    """Let a thread waiting for the GIL run now, not after the 5 ms switch interval.

    The rows are built by a background thread while request threads make calls: a request
    thread whose reply has arrived would otherwise wait up to ``sys.getswitchinterval()`` for
    the writer's CPU-bound loop to give up the GIL. ``sleep(0)`` releases it at once; being a
    system call it is not free (tens of µs on a busy virtual machine), hence every few rows.
    """
    time.sleep(0)


#: Rows built between two :func:`_yield_the_gil` (about a millisecond of work).
_ROWS_PER_YIELD = 8


#: Session-local staging table of the PostgreSQL path, emptied at each commit.
_STAGING_TABLE = "django_rpc_audit_incoming"


def _copy_supported(connection: Any) -> bool:
    """psycopg 3 (``COPY`` from Python rows); psycopg2 takes the ``bulk_create`` path."""
    from django.db.backends.postgresql.psycopg_any import is_psycopg3

    return bool(is_psycopg3)


def _copy_record_events(
    queryset: RPCLogQuerySet, connection: Any, events: Sequence[Mapping[str, Any]]
) -> int:
    """The PostgreSQL path of :func:`bulk_record_events`: ``COPY`` into a staging table, then
    one upsert of the finished rows and one insert of the pending ones, both idempotent.

    ``COPY`` costs a fraction of an ``INSERT`` with thousands of bound parameters, which
    is what lets one writer thread keep up with a busy process. Runs inside the caller's
    transaction.
    """
    model = queryset.model
    fields = list(model._meta.concrete_fields)
    defaults = {f.attname: f.get_default() for f in fields}
    for f in fields:
        # JSON columns are copied as JSON text (the server parses it), not adapted objects.
        if isinstance(f, models.JSONField) and defaults[f.attname] is not None:
            defaults[f.attname] = json.dumps(defaults[f.attname])
    attnames = [f.attname for f in fields]
    table = connection.ops.quote_name(model._meta.db_table)
    staging = connection.ops.quote_name(_STAGING_TABLE)
    columns = ", ".join(connection.ops.quote_name(f.column) for f in fields)
    updates = ", ".join(
        f"{connection.ops.quote_name(f.column)} = EXCLUDED.{connection.ops.quote_name(f.column)}"
        for f in fields
        if not f.primary_key
    )
    pending = RPCStatus.PENDING.value
    counts = {True: 0, False: 0}  # finished, pending
    # Identifiers come from the model, quoted; values are bound or copied, never formatted.
    select = f"INSERT INTO {table} ({columns}) SELECT {columns} FROM {staging} WHERE status "  # noqa: S608
    with connection.cursor() as cursor:
        cursor.execute(
            f"CREATE TEMPORARY TABLE IF NOT EXISTS {staging} "
            f"(LIKE {table} INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
        )
        with cursor.cursor.copy(f"COPY {staging} ({columns}) FROM STDIN") as copy:
            for n, event in enumerate(events, 1):
                values = event_row_values(event, for_copy=True)
                copy.write_row([values.get(name, defaults[name]) for name in attnames])
                counts[is_finished_event(event)] += 1
                if n % _ROWS_PER_YIELD == 0:
                    _yield_the_gil()
        if counts[True]:
            cursor.execute(f"{select}<> %s ON CONFLICT (id) DO UPDATE SET {updates}", [pending])
        if counts[False]:
            cursor.execute(f"{select}= %s ON CONFLICT (id) DO NOTHING", [pending])
        # Emptied at commit anyway; explicitly for a batch written inside a longer transaction.
        cursor.execute(f"DELETE FROM {staging}")  # noqa: S608
    return len(events)
