"""Reading a time window from the rollups, completed by the log rows not rolled up yet.

A window answered from the rollups covers whole UTC hours, from the hour holding ``since`` to
``until``, split at a *boundary* (:func:`coverage`):

- hours before it (up to the last *settled* hour in the window: remade by ``rpc_rollup`` after
  ``ROLLUP_SETTLE_SECONDS`` past its end, and left alone since) are read from their rollups,
  sealed and unsealed: the rows ``rpc_logs_cleanup`` deleted plus the rows still stored;
- hours from it on (the current hour, the hours not settled yet, and every hour when
  ``rpc_rollup`` never ran) are read from the log rows themselves, plus their *sealed* rollups
  only: the rows already deleted.

Each log row is in exactly one of these parts: a row is counted in an hour's sealed rollups in
the transaction that deletes it (:func:`~django_rpc_audit.rollups.maintain.seal_and_delete`),
and unsealed rollups are only read for hours before the boundary, whose rows are not read. Both
parts are read in one transaction at ``REPEATABLE READ`` (one snapshot), so a cleanup that
commits between the two queries cannot make a row count twice or not at all.

:func:`percentile` estimates a percentile from the fixed duration histogram.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from django.db import connections, router, transaction
from django.db.models import Max, Q, Sum
from django.db.models.functions import Trunc

from django_rpc_audit.rollups.maintain import _aggregates, hour_of
from django_rpc_audit.rollups.models import (
    BUCKET,
    DURATION_EDGES_MS,
    HISTOGRAM_FIELDS,
    RPCRollup,
    RPCRollupBucket,
)

#: What a window can be grouped by: the rollups' key columns and the hour.
DIMENSIONS = ("status", "method", "user_id", "hour")
#: The summed columns read (cost is the usage reports' concern: :mod:`django_rpc_audit.usage`).
_SUMMED = ("calls", "timed_calls", "duration_sum_ms", *HISTOGRAM_FIELDS)


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
    histogram: list[float] = field(default_factory=lambda: [0.0] * len(HISTOGRAM_FIELDS))
    #: The username snapshot of the group's calls (when grouped by user).
    username: str = ""

    def add(self, row: dict[str, Any]) -> None:
        self.calls += row["calls"] or 0.0
        self.timed_calls += row["timed_calls"] or 0.0
        self.duration_sum_ms += row["duration_sum_ms"] or 0.0
        longest = row["duration_max_ms"]
        if longest is not None and (self.duration_max_ms is None or longest > self.duration_max_ms):
            self.duration_max_ms = longest
        for index, name in enumerate(HISTOGRAM_FIELDS):
            self.histogram[index] += row[name] or 0.0
        self.username = max(self.username, row.get("username") or "")

    def merge(self, other: Sums) -> None:
        self.calls += other.calls
        self.timed_calls += other.timed_calls
        self.duration_sum_ms += other.duration_sum_ms
        if other.duration_max_ms is not None and (
            self.duration_max_ms is None or other.duration_max_ms > self.duration_max_ms
        ):
            self.duration_max_ms = other.duration_max_ms
        for index, value in enumerate(other.histogram):
            self.histogram[index] += value
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


def window_sums(cover: Coverage, dims: Sequence[str]) -> dict[tuple[Any, ...], Sums]:
    """The sums of the window ``cover`` grouped by ``dims`` (of :data:`DIMENSIONS`; ``hour``
    is the UTC hour), each key a tuple of the dims' values: two grouped queries, one over
    the rollups and one over the rows after the boundary, in one snapshot."""
    unknown = [name for name in dims if name not in DIMENSIONS]
    if unknown:
        raise ValueError(f"unknown dimensions {unknown!r}; choose from {DIMENSIONS!r}")
    using = cover.using
    by_user = "user_id" in dims
    rollups = RPCRollup.objects.using(using).filter(
        Q(bucket_start__gte=cover.start, bucket_start__lt=cover.boundary)
        | Q(sealed=True, bucket_start__gte=cover.boundary, bucket_start__lte=cover.until)
    )
    rollup_sums: dict[str, Any] = {name: Sum(name) for name in _SUMMED}
    rollup_sums["duration_max_ms"] = Max("duration_max_ms")
    if by_user:
        rollup_sums["username"] = Max("username")
    rollup_groups = (
        rollups.order_by()
        .values(*(("bucket_start" if name == "hour" else name) for name in dims))
        .annotate(**rollup_sums)
    )

    from django_rpc_audit.models import RPCLog

    rows = RPCLog.objects.using(using).filter(
        created_at__gte=cover.boundary, created_at__lte=cover.until
    )
    # The very sums rpc_rollup stores, so the tail adds up as its rollups will.
    every = _aggregates(connections[using].vendor)
    row_sums: dict[str, Any] = {name: every[name] for name in _SUMMED}
    row_sums["duration_max_ms"] = every["duration_max_ms"]
    if by_user:
        row_sums["username"] = Max("username")
    if "hour" in dims:
        rows = rows.annotate(hour=Trunc("created_at", "hour", tzinfo=dt.UTC))
    row_groups = rows.order_by().values(*dims).annotate(**row_sums)

    result: dict[tuple[Any, ...], Sums] = {}
    with snapshot(using):
        for grouped, hour_name in ((rollup_groups, "bucket_start"), (row_groups, "hour")):
            for row in grouped:
                key = tuple(_key_value(row, name, hour_name) for name in dims)
                sums = result.get(key)
                if sums is None:
                    sums = result[key] = Sums()
                sums.add(row)
    return result


def _key_value(row: dict[str, Any], name: str, hour_name: str) -> Any:
    if name != "hour":
        return row[name]
    value = row[hour_name]
    return value.astimezone(dt.UTC) if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)


def percentile(histogram: Sequence[float], fraction: float, longest: float | None) -> float | None:
    """Estimate the ``fraction`` percentile of the durations counted in ``histogram`` (weighted
    calls per bucket of ``DURATION_EDGES_MS``) whose longest is ``longest``.

    The call at the percentile's rank (``fraction * (n - 1) + 1`` of ``n`` calls, as
    ``percentile_cont`` ranks them) is in bucket ``i``; the estimate interpolates linearly
    within that bucket, from its lower edge (0 for the first) to its upper edge or ``longest``
    if smaller (the last bucket, above 10 s, ends at ``longest``). The exact value lies
    between the calls ranked just below and at that rank, so both are in bucket ``i`` or the
    first lies in a lower one: the estimate errs by at most the width of bucket ``i`` (plus,
    rarely, the distance down to the lower call). ``None`` when nothing was timed.
    """
    if not 0 <= fraction <= 1:
        raise ValueError("fraction must be between 0 and 1.")
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
