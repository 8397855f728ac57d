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
and unsealed rollups are only read for hours before the boundary, whose rows are not read. The
hours after the boundary (their rows, and the sealed rollups of their deleted rows) are read in
one transaction at ``REPEATABLE READ`` (one snapshot), so a cleanup that commits between the two
queries cannot make a row count twice or not at all.

The hours before the boundary are read by :class:`Block` (a whole UTC day, or one hour), each
block's sums cached under a key that changes when one of its hours is remade or sealed, and
each run of blocks (the hours before the first whole day, the days, the hours after) cached as
one sum: a window that did not move costs three cache reads per figure (:data:`CACHE_ALIAS`).

:func:`percentile` estimates a percentile from the fixed duration histogram.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings
from django.core.cache import BaseCache, caches
from django.core.cache.backends.locmem import LocMemCache
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
from django_rpc_audit.status import RPCStatus

#: The Django cache (``CACHES`` alias) holding the sums of whole settled days and hours. When
#: ``CACHES`` has no such alias, a cache of the process's own (``LocMemCache``, up to
#: :data:`PROCESS_CACHE_ENTRIES` entries); ``None``: no cache.
CACHE_ALIAS: str | None = "rpc_audit"
#: Entries of the per-process cache: the 90-day dashboard leaves about 460 (four figures).
PROCESS_CACHE_ENTRIES = 10_000
#: How long a block's sums are kept: as long as a 90-day window may read them.
CACHE_SECONDS = 100 * 24 * 3600
#: Bumped when the cached form changes.
_CACHE_FORMAT = 1
DAY = dt.timedelta(days=1)

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
    #: The hours before the boundary as whole UTC days where they can be, single hours
    #: elsewhere: the units whose sums are cached (:func:`window_sums`).
    blocks: tuple[Block, ...] = ()


@dataclass(frozen=True, slots=True)
class Block:
    """Whole hours (a UTC day, or one hour) before the boundary, read and cached together."""

    start: dt.datetime
    end: dt.datetime
    #: Changes whenever one of its hours' rollups change: how many of its hours were rolled
    #: up, the last time one was (``computed_at``: ``rpc_rollup`` and every cleanup set it),
    #: and up to when their rows were deleted.
    version: str


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

    def add_compact(self, values: tuple[Any, ...]) -> None:
        """Add a block's cached sums (``_compact``'s tuple)."""
        calls, timed, total, longest, histogram, username = values
        self.calls += calls
        self.timed_calls += timed
        self.duration_sum_ms += total
        if longest is not None and (self.duration_max_ms is None or longest > self.duration_max_ms):
            self.duration_max_ms = longest
        bins = self._bins()
        for index, value in enumerate(histogram):
            bins[index] += value
        self.username = max(self.username, username)

    def compact(self) -> tuple[Any, ...]:
        """The tuple :meth:`add_compact` adds (how blocks are cached)."""
        return (
            self.calls,
            self.timed_calls,
            self.duration_sum_ms,
            self.duration_max_ms,
            tuple(self.histogram),
            self.username,
        )

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
    hours = list(
        RPCRollupBucket.objects.using(using)
        .filter(start__gte=start, start__lt=last)
        .order_by("start")
        .values_list("start", "settled", "computed_at", "sealed_before")
    )
    settled = max((hour[0] for hour in hours if hour[1]), default=None)
    boundary = start if settled is None else settled + BUCKET
    return Coverage(
        start=start,
        boundary=boundary,
        until=until,
        using=using,
        blocks=_blocks(start, boundary, [hour for hour in hours if hour[0] < boundary]),
    )


def _blocks(
    start: dt.datetime, boundary: dt.datetime, hours: list[tuple[Any, ...]]
) -> tuple[Block, ...]:
    """Cut ``[start, boundary)`` into whole days and the hours around them, each with the
    version of its rolled-up ``hours`` (``(start, settled, computed_at, sealed_before)``, in
    order)."""
    spans = []
    moment = start
    while moment < boundary:
        midnight = moment.replace(hour=0)
        end = moment + DAY if moment == midnight and moment + DAY <= boundary else moment + BUCKET
        spans.append((moment, end))
        moment = end
    blocks = []
    index = 0
    for low, high in spans:
        count, computed, sealed = 0, "", ""
        while index < len(hours) and hours[index][0] < high:
            _, _, computed_at, sealed_before = hours[index]
            count += 1
            computed = max(computed, computed_at.isoformat() if computed_at else "")
            sealed = max(sealed, sealed_before.isoformat() if sealed_before else "")
            index += 1
        blocks.append(Block(low, high, f"{count}|{computed}|{sealed}"))
    return tuple(blocks)


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
    is the UTC hour), each key a tuple of the dims' values.

    The hours before the boundary come by :class:`Block` from the cache (``CACHES`` alias
    :data:`CACHE_ALIAS`), each computed from the rollups once per version; the rest is two
    grouped queries in one snapshot: the rollups of rows already deleted after the boundary,
    and the rows after it.
    """
    unknown = [name for name in dims if name not in DIMENSIONS]
    if unknown:
        raise ValueError(f"unknown dimensions {unknown!r}; choose from {DIMENSIONS!r}")
    dims = tuple(dims)
    using = cover.using
    result = _merge_blocks(_run_sums(cover, dims), _is_light(dims))

    sealed = RPCRollup.objects.using(using).filter(
        sealed=True, bucket_start__gte=cover.boundary, bucket_start__lte=cover.until
    )
    rollup_groups = _grouped_rollups(sealed, dims, by_block=None)

    from django_rpc_audit.models import RPCLog

    rows = RPCLog.objects.using(using).filter(
        created_at__gte=cover.boundary, created_at__lte=cover.until
    )
    # The very sums rpc_rollup stores, so the tail adds up as its rollups will.
    every = _aggregates(connections[using].vendor)
    light = _is_light(dims)
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
        for grouped, hour_name in ((rollup_groups, "bucket_start"), (row_groups, "hour")):
            for row in grouped:
                key = tuple(_key_value(row, name, hour_name) for name in dims)
                sums = result.get(key)
                if sums is None:
                    sums = result[key] = Sums()
                if light:
                    sums.calls += row["calls"] or 0.0
                    sums.username = max(sums.username, row.get("username") or "")
                else:
                    sums.add(row)
    return result


def _grouped_rollups(rollups: Any, dims: tuple[str, ...], *, by_block: str | None) -> Any:
    """``rollups`` grouped by ``dims`` (and by ``"day"`` or ``"hour"`` with ``by_block``)."""
    if _is_light(dims):
        sums: dict[str, Any] = {"calls": Sum("calls")}
    else:
        sums = {name: Sum(name) for name in _SUMMED}
        sums["duration_max_ms"] = Max("duration_max_ms")
    if "user_id" in dims:
        sums["username"] = Max("username")
    columns = [("bucket_start" if name == "hour" else name) for name in dims]
    if by_block == "day":
        rollups = rollups.annotate(block=Trunc("bucket_start", "day", tzinfo=dt.UTC))
        columns.append("block")
    elif by_block == "hour" and "bucket_start" not in columns:
        columns.append("bucket_start")
    return rollups.order_by().values(*columns).annotate(**sums)


_Compact = tuple[Any, ...]


def _run_sums(cover: Coverage, dims: tuple[str, ...]) -> list[Any]:
    """The sums of ``cover``'s blocks, as one part per *run* of them (the hours before its
    first whole day, the whole days, the hours after): each run's sum is cached under the keys
    of its blocks, so a window that did not move reads three entries; a run that did (an hour
    settled, a day began, a cleanup sealed rows) is added up again from its blocks' entries,
    and only the blocks that changed are read from the rollups."""
    if not cover.blocks:
        return []
    light = _is_light(dims)
    cache = _cache()
    database = connections[cover.using].settings_dict.get("NAME")
    block_keys = {block: _cache_key(database, cover.using, dims, block) for block in cover.blocks}
    runs: list[tuple[Block, ...]] = []
    for block in cover.blocks:
        if runs and (runs[-1][-1].end - runs[-1][-1].start) == (block.end - block.start):
            runs[-1] = (*runs[-1], block)
        else:
            runs.append((block,))
    run_keys = {
        run: "rpc_audit:rollups:run:"
        + hashlib.sha256("|".join(block_keys[block] for block in run).encode()).hexdigest()
        for run in runs
    }
    found = cache.get_many(list(run_keys.values())) if cache is not None else {}
    missing = [run for run in runs if run_keys[run] not in found]
    if missing:
        blocks = [block for run in missing for block in run]
        parts = dict(zip(blocks, _block_sums(cover.using, dims, blocks, block_keys), strict=True))
        made = {run_keys[run]: _combine([parts[block] for block in run], light) for run in missing}
        if cache is not None:
            cache.set_many(made, CACHE_SECONDS)
        found.update(made)
    return [found[run_keys[run]] for run in runs]


def _block_sums(
    using: str, dims: tuple[str, ...], blocks: list[Block], keys: dict[Block, str]
) -> list[Any]:
    """Per block: its sums (a part), from the cache or, for the blocks it lacks, from the
    rollups (one grouped query for the missing days, one for the missing hours), then
    cached."""
    cache = _cache()
    found = cache.get_many([keys[block] for block in blocks]) if cache is not None else {}
    missing = [block for block in blocks if keys[block] not in found]
    if missing:
        computed = _compute_blocks(using, dims, missing)
        made = {keys[block]: computed[block] for block in missing}
        if cache is not None:
            cache.set_many(made, CACHE_SECONDS)
        found.update(made)
    return [found[keys[block]] for block in blocks]


def _is_light(dims: tuple[str, ...]) -> bool:
    """Groups by user or by hour (then by status) need only their calls: cached per block as
    one entry per user or hour holding the calls of each status, the smallest form to read
    and to add up over ninety days."""
    return len(dims) == 2 and dims[-1] == "status" and dims[0] in ("user_id", "hour")


#: The slot of each status in a light entry; the last slot holds the username.
_STATUS_SLOTS = {status: index for index, status in enumerate(RPCStatus.values)}
_NAME_SLOT = len(_STATUS_SLOTS)


def _compute_blocks(using: str, dims: tuple[str, ...], blocks: list[Block]) -> dict[Block, Any]:
    """The sums of ``blocks`` from the rollups: per block, ``{head: [calls per status...,
    username]}`` for light groups, else a list of ``(key, compact sums)``."""
    light = _is_light(dims)
    computed: dict[Block, Any] = {block: {} if light else [] for block in blocks}
    for kind in ("day", "hour"):
        chosen = [block for block in blocks if (block.end - block.start == DAY) == (kind == "day")]
        if not chosen:
            continue
        by_start = {block.start: block for block in chosen}
        ranges = Q()
        for low, high in _ranges(chosen):
            ranges |= Q(bucket_start__gte=low, bucket_start__lt=high)
        grouped = _grouped_rollups(
            RPCRollup.objects.using(using).filter(ranges), dims, by_block=kind
        )
        for row in grouped:
            moment = _key_value(row, "hour", "block" if kind == "day" else "bucket_start")
            block = by_start[moment]
            key = tuple(_key_value(row, name, "bucket_start") for name in dims)
            if not light:
                computed[block].append((key, _compact(row)))
                continue
            entry = computed[block].get(key[0])
            if entry is None:
                entry = computed[block][key[0]] = [0.0] * _NAME_SLOT + [""]
            # A status outside RPCStatus (raw SQL) counts in the total only, like pending.
            entry[_STATUS_SLOTS.get(key[1], _STATUS_SLOTS[RPCStatus.PENDING])] += (
                row["calls"] or 0.0
            )
            entry[_NAME_SLOT] = max(entry[_NAME_SLOT], row.get("username") or "")
    return computed


def _combine(parts: list[Any], light: bool) -> Any:
    """Several parts added up into one part of the same form."""
    if not light:
        sums: dict[tuple[Any, ...], Sums] = {}
        for part in parts:
            for key, values in part:
                found = sums.get(key)
                if found is None:
                    found = sums[key] = Sums()
                found.add_compact(values)
        return [(key, found.compact()) for key, found in sums.items()]
    # Up to a few hundred thousand entries over ninety days: plain list arithmetic.
    totals: dict[Any, list[Any]] = {}
    slots = range(_NAME_SLOT)
    for part in parts:
        for head, entry in part.items():
            total = totals.get(head)
            if total is None:
                totals[head] = list(entry)
                continue
            for slot in slots:
                total[slot] += entry[slot]
            if entry[_NAME_SLOT] > total[_NAME_SLOT]:  # noqa: PLR1730 (no call per entry)
                total[_NAME_SLOT] = entry[_NAME_SLOT]
    return totals


def _merge_blocks(parts: list[Any], light: bool) -> dict[tuple[Any, ...], Sums]:
    """Add up the parts into one :class:`Sums` per key."""
    combined = _combine(parts, light)
    result: dict[tuple[Any, ...], Sums] = {}
    if not light:
        for key, values in combined:
            result[key] = Sums()
            result[key].add_compact(values)
        return result
    statuses = list(_STATUS_SLOTS)
    for head, total in combined.items():
        for slot, status in enumerate(statuses):
            if total[slot]:
                result[(head, status)] = Sums(calls=total[slot], username=total[_NAME_SLOT])
    return result


def _ranges(blocks: list[Block]) -> Iterator[tuple[dt.datetime, dt.datetime]]:
    """The blocks' time ranges, neighbours joined."""
    low = high = None
    for block in sorted(blocks, key=lambda block: block.start):
        if high == block.start:
            high = block.end
            continue
        if low is not None and high is not None:
            yield low, high
        low, high = block.start, block.end
    if low is not None and high is not None:
        yield low, high


def _compact(row: dict[str, Any]) -> _Compact:
    """A grouped row's sums as a tuple (see :meth:`Sums.add_compact`)."""
    return (
        row["calls"] or 0.0,
        row["timed_calls"] or 0.0,
        row["duration_sum_ms"] or 0.0,
        row["duration_max_ms"],
        tuple(row[name] or 0.0 for name in HISTOGRAM_FIELDS),
        row.get("username") or "",
    )


def _cache_key(database: Any, using: str, dims: tuple[str, ...], block: Block) -> str:
    text = f"{_CACHE_FORMAT}|{database}|{using}|{','.join(dims)}|{block.start.isoformat()}|"
    text += f"{block.end.isoformat()}|{block.version}"
    return "rpc_audit:rollups:" + hashlib.sha256(text.encode()).hexdigest()


def _cache() -> BaseCache | None:
    """The cache of :data:`CACHE_ALIAS`, or the process's own."""
    global _process_cache
    if CACHE_ALIAS is None:
        return None
    if CACHE_ALIAS in settings.CACHES:
        return caches[CACHE_ALIAS]
    if _process_cache is None:
        _process_cache = LocMemCache(
            "django_rpc_audit.rollups",
            {"TIMEOUT": CACHE_SECONDS, "OPTIONS": {"MAX_ENTRIES": PROCESS_CACHE_ENTRIES}},
        )
    return _process_cache


def clear_cache() -> None:
    """Empty the cache of block sums (they are also replaced whenever their hours change)."""
    cache = _cache()
    if cache is not None:
        cache.clear()


_process_cache: BaseCache | None = None


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
