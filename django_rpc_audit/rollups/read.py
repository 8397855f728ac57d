"""Reading a time window from the rollups, completed by the log rows not rolled up yet.

A window answered from the rollups covers whole UTC hours, from the hour holding ``since`` to
``until``, split at a *boundary* (:func:`coverage`):

- hours before it (up to the last *settled* hour in the window: remade by ``rpc_rollup`` after
  ``ROLLUP_SETTLE_SECONDS`` past its end, and left alone since) are read from the rollups,
  sealed and unsealed: the rows ``rpc_logs_cleanup`` deleted plus the rows still stored. Whole
  UTC days among them are read from the daily tables (a row per day and method, or per day and
  user) while their day is not stale, and the other hours from the hourly rollups;
- hours from it on (the current hour, the hours not settled yet, and every hour when
  ``rpc_rollup`` never ran) are read from the log rows themselves, plus their *sealed* rollups
  only: the rows already deleted.

Each log row is in exactly one of these parts: a row is counted in an hour's sealed rollups in
the transaction that deletes it (:func:`~django_rpc_audit.rollups.maintain.seal_and_delete`),
unsealed rollups are only read for hours before the boundary, whose rows are not read, and a
day's daily rows only while no hour of the day changed since they were made (every change marks
the day stale in its own transaction). Every part of a window is read in one transaction at
``REPEATABLE READ`` (one snapshot), so a cleanup or a roll-up that commits between two queries
cannot make a row count twice or not at all.

A 90-day window reads about 90 daily rows per method and outcome, and per user: no cache is
needed, and none is kept.

:func:`percentile` estimates a percentile from the fixed duration histogram.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from django.db import connections, router, transaction
from django.db.models import Max, Q, QuerySet, Sum
from django.db.models.functions import Trunc

from django_rpc_audit.rollups.maintain import DAY, hour_of, row_aggregates
from django_rpc_audit.rollups.models import (
    BUCKET,
    DURATION_EDGES_MS,
    HISTOGRAM_FIELDS,
    OUTCOME_FIELDS,
    RPCDailyRollup,
    RPCDailyUserRollup,
    RPCHourlyMethodRollup,
    RPCRollup,
    RPCRollupBucket,
    RPCRollupDay,
)
from django_rpc_audit.status import RPCStatus

#: What a window can be grouped by: the rollups' key columns and the hour.
DIMENSIONS = ("status", "method", "user_id", "hour")
#: The summed columns read (cost is the usage reports' concern: :mod:`django_rpc_audit.usage`).
_SUMMED = ("calls", "timed_calls", "duration_sum_ms", *HISTOGRAM_FIELDS)
#: The status each outcome column of the daily user rows and the hours counts.
_OUTCOME_STATUS = dict(
    zip(
        OUTCOME_FIELDS,
        (
            RPCStatus.SUCCESS.value,
            RPCStatus.FAILED.value,
            RPCStatus.TIMEOUT.value,
            RPCStatus.RATE_LIMITED.value,
            RPCStatus.PENDING.value,
        ),
        strict=True,
    )
)


@dataclass(frozen=True, slots=True)
class Coverage:
    """Which part of a window the rollups answer and which the log rows."""

    #: The first hour of the window (the hour holding ``since``, UTC).
    start: dt.datetime
    #: Hours before it are read from their rollups; from it on, from the rows (and the
    #: rollups of rows already deleted).
    boundary: dt.datetime
    #: The end of the window (included).
    until: dt.datetime
    #: The database.
    using: str


@dataclass(slots=True)
class Sums:
    """Calls (weighted), durations and the duration histogram of one group."""

    calls: float = 0.0
    timed_calls: float = 0.0
    duration_sum_ms: float = 0.0
    duration_max_ms: float | None = None
    #: Weighted calls per bucket of ``DURATION_EDGES_MS`` (the last: slower than the last edge).
    #: (Empty until timed sums are added: most groups of a window only count calls.)
    histogram: list[float] = field(default_factory=list)
    #: The username snapshot of the group's calls (when grouped by user).
    username: str = ""

    def _bins(self) -> list[float]:
        if not self.histogram:
            self.histogram = [0.0] * len(HISTOGRAM_FIELDS)
        return self.histogram

    def add(self, row: dict[str, Any]) -> None:
        self.calls += row["calls"] or 0.0
        self.timed_calls += row["timed_calls"] or 0.0
        self.duration_sum_ms += row["duration_sum_ms"] or 0.0
        longest = row["duration_max_ms"]
        if longest is not None and (self.duration_max_ms is None or longest > self.duration_max_ms):
            self.duration_max_ms = longest
        bins = self._bins()
        for index, name in enumerate(HISTOGRAM_FIELDS):
            bins[index] += row[name] or 0.0
        self.username = max(self.username, row.get("username") or "")

    def merge(self, other: Sums) -> None:
        if not other.timed_calls and other.duration_max_ms is None:  # counts only
            self.calls += other.calls
            self.username = max(self.username, other.username)
            return
        self.calls += other.calls
        self.timed_calls += other.timed_calls
        self.duration_sum_ms += other.duration_sum_ms
        if other.duration_max_ms is not None and (
            self.duration_max_ms is None or other.duration_max_ms > self.duration_max_ms
        ):
            self.duration_max_ms = other.duration_max_ms
        bins = self._bins()
        for index, value in enumerate(other.histogram):
            bins[index] += value
        self.username = max(self.username, other.username)

    @property
    def mean_duration_ms(self) -> float | None:
        """The mean duration of the timed calls, each row weighted as its calls."""
        return self.duration_sum_ms / self.timed_calls if self.timed_calls else None


def coverage(since: dt.datetime, until: dt.datetime, *, using: str | None = None) -> Coverage:
    """Split the window from ``since`` to ``until`` between the rollups and the rows: the
    boundary is the end of the last settled hour in it (its first hour when none is)."""
    using = using or router.db_for_read(RPCRollup)
    start, last = hour_of(since), hour_of(until)
    settled = (
        RPCRollupBucket.objects.using(using)
        .filter(settled=True, start__gte=start, start__lt=last)
        .aggregate(last=Max("start"))["last"]
    )
    boundary = start if settled is None else settled + BUCKET
    return Coverage(start=start, boundary=boundary, until=until, using=using)


@contextmanager
def snapshot(using: str) -> Iterator[None]:
    """One transaction seeing one snapshot of the database for every read inside it
    (``REPEATABLE READ``, read only). Inside a transaction already open, that one's."""
    connection = connections[using]
    if connection.in_atomic_block:
        yield
        return
    with transaction.atomic(using=using):
        if connection.vendor in ("postgresql", "mysql"):
            # The transaction's first statement: on MySQL / MariaDB it sets the transaction
            # the next read starts (Django's sessions run at READ COMMITTED there).
            with connection.cursor() as cursor:
                cursor.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        # SQLite: a transaction sees one snapshot anyway.
        yield


def fresh_days(using: str, first: dt.datetime, end: dt.datetime) -> list[dt.datetime]:
    """The days from ``first`` to ``end`` whose daily rows match their hours (call it in the
    snapshot the daily rows are read in)."""
    return list(
        RPCRollupDay.objects.using(using)
        .filter(stale=False, day__gte=first, day__lt=end)
        .order_by("day")
        .values_list("day", flat=True)
    )


def hours_outside(start: dt.datetime, end: dt.datetime, days: list[dt.datetime]) -> Q | None:
    """A filter on ``bucket_start`` for the hours from ``start`` to ``end`` outside ``days``
    (sorted), ``None`` when there are none."""
    ranges = Q()
    empty = True
    moment = start
    for day in [*days, end]:
        if moment < day:
            ranges |= Q(bucket_start__gte=moment, bucket_start__lt=min(day, end))
            empty = False
        moment = max(moment, day + DAY)
    return None if empty else ranges


def _daily_source(dims: tuple[str, ...]) -> str | None:
    """Which coarser tables answer ``dims`` for the fresh days: ``"method"`` (per day, method
    and status, and per hour, method and status for the edge days), ``"user"`` (per day and
    user: calls by outcome), ``"hour"`` (the hours' calls by outcome), or none (the hourly
    rollups)."""
    if set(dims) <= {"method", "status"}:
        return "method"
    if _is_light(dims):
        return "user" if dims[0] == "user_id" else "hour"
    return None


def window_sums(cover: Coverage, dims: Sequence[str]) -> dict[tuple[Any, ...], Sums]:
    """The sums of the window ``cover`` grouped by ``dims`` (of :data:`DIMENSIONS`; ``hour``
    is the UTC hour), each key a tuple of the dims' values.

    In one snapshot: the whole days before the boundary that are not stale from the daily
    tables, the other hours before it from the hourly rollups, then the rollups of rows
    already deleted after the boundary, and the rows after it. Groups by user or by hour and
    status (:func:`_is_light`) carry calls only.
    """
    unknown = [name for name in dims if name not in DIMENSIONS]
    if unknown:
        raise ValueError(f"unknown dimensions {unknown!r}; choose from {DIMENSIONS!r}")
    dims = tuple(dims)
    using = cover.using
    light = _is_light(dims)
    result: dict[tuple[Any, ...], Sums] = {}

    from django_rpc_audit.models import RPCLog

    rows = RPCLog.objects.using(using).filter(
        created_at__gte=cover.boundary, created_at__lte=cover.until
    )
    # The very sums rpc_rollup stores, so the tail adds up as its rollups will.
    every = row_aggregates(connections[using].vendor)
    if light:  # counts are all these groups give
        row_sums: dict[str, Any] = {"calls": every["calls"]}
    else:
        row_sums = {name: every[name] for name in _SUMMED}
        row_sums["duration_max_ms"] = every["duration_max_ms"]
    if "user_id" in dims:
        row_sums["username"] = Max("username")
    if "hour" in dims:
        rows = rows.annotate(hour=Trunc("created_at", "hour", tzinfo=dt.UTC))
    row_groups = rows.order_by().values(*dims).annotate(**row_sums)

    with snapshot(using):
        source = _daily_source(dims)
        span = (cover.start, cover.boundary)
        days = []
        if source is not None:
            days = fresh_days(using, cover.start.replace(hour=0), cover.boundary)
        whole = [day for day in days if day >= span[0] and day + DAY <= span[1]]
        edges = [day for day in days if day not in whole]
        # Per method and per hour, the fresh days are kept per hour too: the hours of the
        # fresh days at the window's edges are read from them (per user, from the hourly
        # rollups: only whole days are kept per user).
        if source == "method":
            if whole:
                _add_daily(result, using, dims, "method", whole, span)
            if edges:
                _add_daily(result, using, dims, "hour-method", edges, span)
        elif source == "hour" and days:
            _add_daily(result, using, dims, "hour", days, span)
        elif source == "user":
            if whole:
                _add_daily(result, using, dims, "user", whole, span)
            days = whole
        hourly = hours_outside(cover.start, cover.boundary, days)
        rollups = RPCRollup.objects.using(using)
        groups: list[tuple[Any, str]] = []
        if hourly is not None:
            groups.append((_grouped_rollups(rollups.filter(hourly), dims), "bucket_start"))
        sealed = rollups.filter(
            sealed=True, bucket_start__gte=cover.boundary, bucket_start__lte=cover.until
        )
        groups.append((_grouped_rollups(sealed, dims), "bucket_start"))
        groups.append((row_groups, "hour"))
        for grouped, hour_name in groups:
            for row in grouped:
                key = tuple(_key_value(row, name, hour_name) for name in dims)
                _add_row(result, key, row, light)
    return result


def _add_row(
    result: dict[tuple[Any, ...], Sums], key: tuple[Any, ...], row: dict[str, Any], light: bool
) -> None:
    sums = result.get(key)
    if sums is None:
        sums = result[key] = Sums()
    if light:
        sums.calls += row["calls"] or 0.0
        sums.username = max(sums.username, row.get("username") or "")
    else:
        sums.add(row)


def _add_daily(
    result: dict[tuple[Any, ...], Sums],
    using: str,
    dims: tuple[str, ...],
    source: str | None,
    days: list[dt.datetime],
    span: tuple[dt.datetime, dt.datetime],
) -> None:
    """Add the sums of the fresh ``days`` from the table ``source`` names: ``"method"``,
    ``"hour-method"``, ``"user"`` or ``"hour"`` (the per-hour ones: the hours of ``span``
    only)."""
    if source in ("method", "hour-method"):
        if source == "method":
            daily: Any = RPCDailyRollup.objects.using(using).filter(day__in=days)
        else:
            daily = RPCHourlyMethodRollup.objects.using(using).filter(_in_days("hour", days, span))
        sums: dict[str, Any] = {name: Sum(name) for name in _SUMMED}
        sums["duration_max_ms"] = Max("duration_max_ms")
        for row in daily.order_by().values(*dims).annotate(**sums):
            _add_row(result, tuple(row[name] for name in dims), row, light=False)
        return
    outcomes = {name: Sum(name) for name in OUTCOME_FIELDS}
    heads: list[tuple[Any, Mapping[str, Any]]]
    if source == "user":
        users = RPCDailyUserRollup.objects.using(using).filter(day__in=days)
        grouped = users.order_by().values("user_id").annotate(username=Max("username"), **outcomes)
        heads = [(row["user_id"], row) for row in grouped]
    else:
        hours = RPCRollupBucket.objects.using(using).filter(_in_days("start", days, span))
        values = hours.values("start", *OUTCOME_FIELDS)
        heads = [(_key_value(row, "hour", "start"), row) for row in values]
    for head, row in heads:
        for name, status in _OUTCOME_STATUS.items():
            if row[name]:
                _add_row(
                    result,
                    (head, status),
                    {"calls": row[name], "username": row.get("username")},
                    light=True,
                )


def _in_days(name: str, days: list[dt.datetime], span: tuple[dt.datetime, dt.datetime]) -> Q:
    """``name`` within one of ``days`` and within ``span``: one tight range per day, so that
    the index on ``name`` reads those hours only."""
    return Q(
        *[
            Q(**{f"{name}__gte": max(day, span[0]), f"{name}__lt": min(day + DAY, span[1])})
            for day in days
        ],
        _connector=Q.OR,
    )


def _grouped_rollups(rollups: QuerySet[RPCRollup], dims: tuple[str, ...]) -> Any:
    """``rollups`` grouped by ``dims``."""
    if _is_light(dims):
        sums: dict[str, Any] = {"calls": Sum("calls")}
    else:
        sums = {name: Sum(name) for name in _SUMMED}
        sums["duration_max_ms"] = Max("duration_max_ms")
    if "user_id" in dims:
        sums["username"] = Max("username")
    columns = [("bucket_start" if name == "hour" else name) for name in dims]
    return rollups.order_by().values(*columns).annotate(**sums)


def _is_light(dims: tuple[str, ...]) -> bool:
    """Groups by user or by hour (then by status) need only their calls."""
    return len(dims) == 2 and dims[-1] == "status" and dims[0] in ("user_id", "hour")


def _key_value(row: dict[str, Any], name: str, hour_name: str) -> Any:
    if name != "hour":
        return row[name]
    value = row[hour_name]
    # Naive with USE_TZ = False: the stored local time, as the rollups' hours are.
    return value.astimezone(dt.UTC) if value.tzinfo is not None else value


def percentile(histogram: Sequence[float], fraction: float, longest: float | None) -> float | None:
    """Estimate the ``fraction`` percentile of the durations counted in ``histogram`` (weighted
    calls per bucket of ``DURATION_EDGES_MS``) whose longest is ``longest``.

    The call at the percentile's rank (``fraction * (n - 1) + 1`` of ``n`` calls, as
    ``percentile_cont`` ranks them) is in bucket ``i``; the estimate interpolates linearly
    within that bucket, from its lower edge (0 for the first) to its upper edge or ``longest``
    if smaller (the last bucket, above 10 s, ends at ``longest``). The exact value lies
    between the calls ranked just below and at that rank, so both are in bucket ``i`` or the
    first lies in a lower one: the estimate errs by at most the width of bucket ``i`` (plus,
    rarely, the distance down to the lower call). ``None`` when nothing was timed (an empty
    ``histogram`` too).

    :raises ValueError: ``fraction`` outside 0 to 1, or not one count per bucket.
    """
    if not 0 <= fraction <= 1:
        raise ValueError("fraction must be between 0 and 1.")
    if histogram and len(histogram) != len(HISTOGRAM_FIELDS):
        raise ValueError(
            f"{len(DURATION_EDGES_MS)} edges need {len(HISTOGRAM_FIELDS)} counts, "
            f"not {len(histogram)}."
        )
    total = sum(histogram)
    if total <= 0:
        return None
    rank = fraction * max(total - 1, 0) + 1
    edges = (0.0, *(float(edge) for edge in DURATION_EDGES_MS))
    below = 0.0
    chosen = max(index for index, count in enumerate(histogram) if count > 0)
    for index, count in enumerate(histogram):
        if count > 0 and below + count >= rank * (1 - 1e-12):
            chosen = index
            break
        below += count
    else:
        below = total - histogram[chosen]
    count = histogram[chosen]
    low = edges[chosen]
    high = edges[chosen + 1] if chosen + 1 < len(edges) else (longest or low)
    if longest is not None:
        high = min(high, longest)
        low = min(low, high)
    share = min(max((rank - below) / count, 0.0), 1.0)
    return low + share * (high - low)


def bucket_bounds(value: float) -> tuple[float, float]:
    """The lower (excluded) and upper (included) edges of the histogram bucket holding
    ``value``; the last bucket's upper edge is infinite."""
    low = 0.0
    for edge in DURATION_EDGES_MS:
        if value <= edge:
            return low, float(edge)
        low = float(edge)
    return low, float("inf")
