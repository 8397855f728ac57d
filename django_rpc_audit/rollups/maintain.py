"""Keeping the rollups: remade from the log rows, and sealed as retention deletes them.

Two operations change an hour's rollups, each in one transaction that first locks the hour's
:class:`~django_rpc_audit.rollups.models.RPCRollupBucket` row, so they never interleave:

- :func:`recompute_hour` (``rpc_rollup``): delete the hour's *unsealed* rollups and insert
  them again from the log rows the hour holds now. Idempotent: rerunning it, or retrying it
  after a failure, gives the same rows; a late row is counted by the next run that remakes
  its hour. :func:`roll_up` runs it over every hour not yet settled (the last
  ``ROLLUP_SETTLE_SECONDS`` and any hour after the last settled one), or over a given range.
- :func:`seal_and_delete` (``rpc_logs_cleanup``, ``RPCLog.objects.prune()``): delete the log
  rows and add exactly the rows deleted to the hour's *sealed* rollups (PostgreSQL: ``DELETE
  ... RETURNING`` summed in the same statement; elsewhere their keys are locked first), then
  remake the unsealed rollups from what is left. A row is counted in the sealed rollups in
  the transaction that deletes it, so it is counted once whatever fails or runs at the same
  time; nothing is deleted before it is counted.

A figure for an hour is the sum of its sealed and unsealed rollups: the rows deleted plus the
rows still there.

Both also mark the hour's UTC day stale (:class:`~django_rpc_audit.rollups.models.RPCRollupDay`)
in their transaction. :func:`refresh_day` remakes a day's daily rows from its hourly rollups in
one transaction that first locks the day's hours and marker, and marks it fresh: idempotent,
and a change that commits meanwhile marks the day stale again after it. :func:`roll_up`
refreshes every stale day (and every day rolled up but never refreshed) after its hours;
:func:`seal_and_delete` and :func:`prune_rollups` the days they changed.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from django.db import connections, router, transaction
from django.db.models import (
    Case,
    Count,
    ExpressionWrapper,
    F,
    FloatField,
    Max,
    Q,
    Sum,
    Value,
    When,
)
from django.db.models.functions import NullIf, Round
from django.utils import timezone

from django_rpc_audit.conf import COST_DECIMAL_PLACES, get_config
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
from django_rpc_audit.utils import stored_datetime

if TYPE_CHECKING:
    from django_rpc_audit.models import RPCLog
    from django_rpc_audit.querysets import RPCLogQuerySet

#: The columns a rollup row is keyed by, besides its hour.
KEY_FIELDS = ("method", "user_id", "username", "status")
#: The summed columns of a rollup row (``duration_max_ms`` is a maximum).
SUM_FIELDS = (
    "rows",
    "calls",
    "billed_calls",
    "cost",
    "timed_calls",
    "duration_sum_ms",
    *HISTOGRAM_FIELDS,
)

_Key = tuple[Any, ...]

#: Keys per ``IN`` list: well within every database's limit on bound parameters.
_IDS_PER_STATEMENT = 2_000


def hour_of(value: dt.datetime) -> dt.datetime:
    """The start of the rollup hour holding ``value`` (in UTC when it is aware)."""
    if timezone.is_aware(value):
        value = value.astimezone(dt.UTC)
    return value.replace(minute=0, second=0, microsecond=0)


#: A UTC day: the span of the daily tables' rows.
DAY = dt.timedelta(days=1)


def day_of(value: dt.datetime) -> dt.datetime:
    """The midnight (UTC when ``value`` is aware) starting the day holding ``value``."""
    return hour_of(value).replace(hour=0)


def _now() -> dt.datetime:
    """Now, as the rows store it (naive local time with ``USE_TZ = False``)."""
    return stored_datetime(timezone.now())


def _log_model() -> type[RPCLog]:
    from django_rpc_audit.models import RPCLog

    return RPCLog


# -- aggregates ---------------------------------------------------------------------------------


def row_aggregates(vendor: str) -> dict[str, Any]:
    """The aggregates of a rollup row over ``RPCLog`` rows: what the rollups store, and what
    reads compute for the hours not rolled up yet (:mod:`~django_rpc_audit.rollups.read`)."""
    weight = Value(1.0) / NullIf(F("sample_rate"), Value(0.0))
    timed = ~Q(duration_ms=None)
    values: dict[str, Any] = {
        "rows": Count("pk"),
        "calls": Sum(weight, output_field=FloatField()),
        "billed_calls": Count("cost"),
        "timed_calls": Sum(
            Case(When(timed, then=weight), default=Value(0.0)), output_field=FloatField()
        ),
        "duration_sum_ms": Sum(F("duration_ms") * weight, output_field=FloatField()),
        "duration_max_ms": Max("duration_ms"),
    }
    if vendor == "sqlite":
        # SQLite sums decimals as binary floats: whole micro-units are summed exactly instead.
        scale = 10**COST_DECIMAL_PLACES
        micro_units = ExpressionWrapper(F("cost") * Value(scale), output_field=FloatField())
        values["cost_units"] = Sum(Round(micro_units), output_field=FloatField())
    else:
        values["cost"] = Sum("cost")
    low = None
    for edge, name in zip(DURATION_EDGES_MS, HISTOGRAM_FIELDS, strict=False):
        within = (
            Q(duration_ms__lte=edge)
            if low is None
            else Q(duration_ms__gt=low, duration_ms__lte=edge)
        )
        values[name] = Sum(
            Case(When(within, then=weight), default=Value(0.0)), output_field=FloatField()
        )
        low = edge
    values[HISTOGRAM_FIELDS[-1]] = Sum(
        Case(When(duration_ms__gt=low, then=weight), default=Value(0.0)), output_field=FloatField()
    )
    return values


def aggregate(queryset: RPCLogQuerySet, *, newest: bool = False) -> dict[_Key, dict[str, Any]]:
    """The rollup sums of the log rows ``queryset`` selects, by (method, user, username,
    status): one ``GROUP BY`` query. With ``newest``, each also has the ``newest`` row's
    ``created_at``."""
    vendor = connections[queryset.db].vendor
    sums = row_aggregates(vendor)
    if newest:
        sums["newest"] = Max("created_at")
    grouped = queryset.order_by().values(*KEY_FIELDS).annotate(**sums)
    result: dict[_Key, dict[str, Any]] = {}
    for row in grouped:
        key = tuple(row.pop(name) for name in KEY_FIELDS)
        units = row.pop("cost_units", None)
        if vendor == "sqlite":
            row["cost"] = Decimal(int(units or 0)).scaleb(-COST_DECIMAL_PLACES)
        row["cost"] = row["cost"] or Decimal(0)
        for name in SUM_FIELDS:
            row[name] = row[name] or 0
        result[key] = row
    return result


def _add(total: dict[str, Any], more: dict[str, Any]) -> None:
    for name in SUM_FIELDS:
        total[name] = total[name] + more[name]
    longest = [
        v for v in (total.get("duration_max_ms"), more.get("duration_max_ms")) if v is not None
    ]
    total["duration_max_ms"] = max(longest) if longest else None


def _rollup(start: dt.datetime, key: _Key, sums: dict[str, Any], sealed: bool) -> RPCRollup:
    return RPCRollup(
        bucket_start=start,
        sealed=sealed,
        **dict(zip(KEY_FIELDS, key, strict=True)),
        **{name: sums[name] for name in (*SUM_FIELDS, "duration_max_ms")},
    )


# -- one hour -----------------------------------------------------------------------------------


def _lock_hour(start: dt.datetime, using: str) -> RPCRollupBucket:
    """The hour's bucket row, locked until the transaction ends: the first statement of it, so
    that on MySQL / MariaDB the reads after it see every transaction that held the lock."""
    return RPCRollupBucket.objects.using(using).select_for_update().get(start=start)


def _ensure_hour(start: dt.datetime, using: str) -> None:
    """Create the hour's bucket row, and its day's marker, if they do not exist (their own
    transactions): a change to the hour then always finds the marker to mark stale."""
    RPCRollupBucket.objects.using(using).get_or_create(start=start)
    RPCRollupDay.objects.using(using).get_or_create(day=day_of(start))


def _mark_stale(start: dt.datetime, using: str) -> None:
    """Mark the day of the hour ``start`` stale: in the transaction that changed the hour."""
    RPCRollupDay.objects.using(using).filter(day=day_of(start)).update(stale=True)


def _remake_unsealed(start: dt.datetime, using: str, rows: RPCLogQuerySet) -> int:
    RPCRollup.objects.using(using).filter(bucket_start=start, sealed=False).delete()
    sums = aggregate(rows.filter(created_at__gte=start, created_at__lt=start + BUCKET))
    RPCRollup.objects.using(using).bulk_create(
        [_rollup(start, key, values, sealed=False) for key, values in sums.items()]
    )
    return len(sums)


def recompute_hour(
    start: dt.datetime, *, using: str | None = None, now: dt.datetime | None = None
) -> int:
    """Remake the unsealed rollups of the hour starting at ``start`` from its log rows, in one
    transaction; return how many rollup rows it has. Idempotent."""
    model = _log_model()
    using = using or router.db_for_write(RPCRollup)
    now = now or _now()
    _ensure_hour(start, using)
    with transaction.atomic(using=using):
        bucket = _lock_hour(start, using)
        count = _remake_unsealed(start, using, model.objects.using(using).all())
        bucket.computed_at = now
        bucket.settled = now >= start + BUCKET + _settle()
        bucket.save(using=using, update_fields=["computed_at", "settled"])
        _mark_stale(start, using)
    return count


def _settle() -> dt.timedelta:
    return dt.timedelta(seconds=get_config().rollup_settle_seconds)


# -- roll up ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RollupRun:
    """What :func:`roll_up` did."""

    #: Hours whose unsealed rollups were remade.
    hours: int
    #: Rollup rows those hours now have.
    rollup_rows: int
    #: The first and last hour remade (``None`` when none was).
    first: dt.datetime | None
    last: dt.datetime | None


def hours_to_roll_up(
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
    *,
    using: str | None = None,
    now: dt.datetime | None = None,
) -> Iterator[dt.datetime]:
    """The hours :func:`roll_up` remakes, oldest first.

    From ``since`` (default: the hour after the last settled one, and at the latest the hours
    still within ``ROLLUP_SETTLE_SECONDS``; on the first run, the oldest log row's hour) to
    ``until`` (default: now): each hour that holds log rows or has unsettled rollups. Empty
    hours are skipped with one indexed query each, not walked.
    """
    model = _log_model()
    using = using or router.db_for_write(RPCRollup)
    now = now or _now()
    rows = model.objects.using(using)
    buckets = RPCRollupBucket.objects.using(using)
    if since is None:
        settled = buckets.filter(settled=True).aggregate(last=Max("start"))["last"]
        recent = hour_of(now - _settle() - BUCKET)
        if settled is not None:
            since = min(settled + BUCKET, recent)
        else:
            oldest = rows.order_by("created_at").values_list("created_at", flat=True).first()
            since = recent if oldest is None else min(hour_of(oldest), recent)
    hour = hour_of(since)
    end = now if until is None else until
    unsettled = set(
        buckets.filter(settled=False, start__gte=hour, start__lt=end).values_list(
            "start", flat=True
        )
    )
    while True:
        # The next hour from ``hour`` on with rows (or with unsettled rollups to remake).
        upcoming = (
            rows.filter(created_at__gte=hour)
            .order_by("created_at")
            .values_list("created_at", flat=True)
            .first()
        )
        candidates = [hour_of(upcoming)] if upcoming is not None else []
        candidates += [start for start in unsettled if start >= hour]
        if not candidates or min(candidates) >= end:
            return
        hour = min(candidates)
        yield hour
        hour += BUCKET


def roll_up(
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
    *,
    using: str | None = None,
    now: dt.datetime | None = None,
) -> RollupRun:
    """Remake the unsealed rollups of every hour :func:`hours_to_roll_up` gives, each in its
    own transaction. What ``manage.py rpc_rollup`` does; safe to run concurrently, to rerun
    and to retry. ::

        roll_up()  # from cron, every few minutes
        roll_up(since=datetime(2026, 11, 1, tzinfo=UTC))  # after a long ingest backlog
    """
    using = using or router.db_for_write(RPCRollup)
    now = now or _now()
    hours = rollup_rows = 0
    first = last = None
    for hour in hours_to_roll_up(since, until, using=using, now=now):
        rollup_rows += recompute_hour(hour, using=using, now=now)
        hours += 1
        first = first or hour
        last = hour
    refresh_days(using=using, now=now)
    return RollupRun(hours=hours, rollup_rows=rollup_rows, first=first, last=last)


# -- seal and delete (retention) ----------------------------------------------------------------


def seal_and_delete(queryset: RPCLogQuerySet, *, batch_size: int = 5_000) -> int:
    """Delete the log rows ``queryset`` selects, hour by hour, counting each in its hour's
    sealed rollups in the transaction that deletes it; return how many were deleted.

    Per hour, one transaction: lock the hour, lock its selected rows (``SELECT ... FOR
    UPDATE``: a writer finishing one of them waits), add their sums to the sealed rollups,
    delete exactly those rows (``batch_size`` keys per statement), remake the unsealed rollups
    from the rows left. A row written meanwhile is not among the locked ones: it stays, and is
    counted by the next run.
    """
    using = queryset.db
    deleted = 0
    selected = queryset.order_by()
    days: set[dt.datetime] = set()
    while True:
        oldest = selected.order_by("created_at").values_list("created_at", flat=True).first()
        if oldest is None:
            refresh_days(sorted(days), using=using)
            return deleted
        start = hour_of(oldest)
        deleted += _seal_hour(selected, start, using, batch_size)
        days.add(day_of(start))


def _seal_hour(selected: RPCLogQuerySet, start: dt.datetime, using: str, batch_size: int) -> int:
    now = _now()
    _ensure_hour(start, using)
    in_hour = selected.filter(created_at__gte=start, created_at__lt=start + BUCKET)
    with transaction.atomic(using=using):
        bucket = _lock_hour(start, using)
        if connections[using].vendor == "postgresql":
            deleted, totals, latest = _delete_returning_sums(in_hour, batch_size)
        else:
            deleted, totals, latest = _lock_sum_and_delete(in_hour, batch_size)
        _merge_sealed(start, using, totals)
        _remake_unsealed(start, using, selected.model.objects.using(using).all())
        bucket.computed_at = now
        if latest is not None:
            sealed_to = latest + dt.timedelta(microseconds=1)
            if bucket.sealed_before is None or sealed_to > bucket.sealed_before:
                bucket.sealed_before = sealed_to
        bucket.save(using=using, update_fields=["computed_at", "sealed_before"])
        _mark_stale(start, using)
    return deleted


_Sealed = tuple[int, dict[_Key, dict[str, Any]], dt.datetime | None]


def _fold(totals: dict[_Key, dict[str, Any]], key: _Key, sums: dict[str, Any]) -> None:
    if key in totals:
        _add(totals[key], sums)
    else:
        totals[key] = sums


def _lock_sum_and_delete(in_hour: RPCLogQuerySet, batch_size: int) -> _Sealed:
    """MySQL, MariaDB, SQLite: lock the rows' keys (``SELECT ... FOR UPDATE``: a writer
    finishing one of them waits), sum and delete them by key, ``batch_size`` keys a statement.
    The keys are fixed once locked, so exactly the rows summed are deleted."""
    keys = list(in_hour.select_for_update().values_list("pk", flat=True))
    totals: dict[_Key, dict[str, Any]] = {}
    latest = None
    manager = in_hour.model.objects.using(in_hour.db)
    for chunk in _chunks(keys, min(batch_size, _IDS_PER_STATEMENT)):
        rows = manager.filter(pk__in=chunk)
        for key, sums in aggregate(rows, newest=True).items():
            newest = sums.pop("newest")
            latest = newest if latest is None or newest > latest else latest
            _fold(totals, key, sums)
        rows.delete()
    return len(keys), totals, latest


def _delete_returning_sums(in_hour: RPCLogQuerySet, batch_size: int) -> _Sealed:
    """PostgreSQL: ``WITH gone AS (DELETE ... RETURNING ...) SELECT sums FROM gone GROUP BY``,
    ``batch_size`` rows a statement: what is summed is exactly what the statement deleted (a
    row a writer changes meanwhile is deleted, and summed, in its new state)."""
    model = in_hour.model
    connection = connections[in_hour.db]
    quote = connection.ops.quote_name
    meta = model._meta

    columns = {f.name: str(f.column) for f in meta.concrete_fields}

    def column(name: str) -> str:
        return quote(columns[name])

    keys_sql, keys_params = in_hour.order_by().values("pk")[:batch_size].query.sql_with_params()
    returned = ("method", "user", "username", "status", "sample_rate", "cost", "duration_ms")
    weight = f"(1.0 / NULLIF({column('sample_rate')}, 0))"
    duration = column("duration_ms")
    buckets = []
    low: float | None = None
    for edge in DURATION_EDGES_MS:
        within = f"{duration} <= {float(edge)!r}"
        if low is not None:
            within = f"{duration} > {float(low)!r} AND {within}"
        buckets.append(f"SUM(CASE WHEN {within} THEN {weight} ELSE 0 END)")
        low = edge
    last = float(DURATION_EDGES_MS[-1])
    buckets.append(f"SUM(CASE WHEN {duration} > {last!r} THEN {weight} ELSE 0 END)")
    group = ", ".join(column(name) for name in ("method", "user", "username", "status"))
    # Identifiers come from the model, quoted, numbers from the code; values are bound.
    sql = (
        f"WITH gone AS (DELETE FROM {quote(meta.db_table)} "  # noqa: S608
        f"WHERE {quote(str(meta.pk.column))} IN ({keys_sql}) "
        f"RETURNING {', '.join(column(name) for name in returned)}, {column('created_at')}) "
        f"SELECT {group}, COUNT(*), SUM({weight}), COUNT({column('cost')}), "
        f"SUM({column('cost')}), "
        f"SUM(CASE WHEN {duration} IS NOT NULL THEN {weight} ELSE 0 END), "
        f"SUM({duration} * {weight}), MAX({duration}), {', '.join(buckets)}, "
        f"MAX({column('created_at')}) FROM gone GROUP BY {group}"
    )
    names: tuple[str, ...] = ("rows", "calls", "billed_calls", "cost", "timed_calls")
    names += ("duration_sum_ms", "duration_max_ms", *HISTOGRAM_FIELDS)
    totals: dict[_Key, dict[str, Any]] = {}
    latest = None
    deleted = 0
    with connection.cursor() as cursor:
        while True:
            cursor.execute(sql, keys_params)
            batch = 0
            for row in cursor.fetchall():
                key, values, newest = tuple(row[:4]), row[4:-1], row[-1]
                sums = dict(zip(names, values, strict=True))
                sums["cost"] = sums["cost"] or Decimal(0)
                for name in SUM_FIELDS:
                    sums[name] = sums[name] or 0
                batch += sums["rows"]
                latest = newest if latest is None or newest > latest else latest
                _fold(totals, key, sums)
            deleted += batch
            if batch < batch_size:
                return deleted, totals, latest


def _merge_sealed(start: dt.datetime, using: str, totals: dict[_Key, dict[str, Any]]) -> None:
    if not totals:
        return
    existing = {
        tuple(getattr(row, name) for name in KEY_FIELDS): row
        for row in RPCRollup.objects.using(using).filter(bucket_start=start, sealed=True)
    }
    changed = []
    created = []
    for key, sums in totals.items():
        row = existing.get(key)
        if row is None:
            created.append(_rollup(start, key, sums, sealed=True))
            continue
        current = {name: getattr(row, name) for name in (*SUM_FIELDS, "duration_max_ms")}
        _add(current, sums)
        for name, value in current.items():
            setattr(row, name, value)
        changed.append(row)
    RPCRollup.objects.using(using).bulk_create(created)
    if changed:
        RPCRollup.objects.using(using).bulk_update(changed, [*SUM_FIELDS, "duration_max_ms"])


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for offset in range(0, len(items), size):
        yield items[offset : offset + size]


def prune_rollups(
    days: int, *, batch_size: int = 5_000, using: str | None = None, dry_run: bool = False
) -> int:
    """Delete the rollups of hours that ended more than ``days`` days ago (``0``: none), in
    batches; return how many rollup rows (would) go. ``ROLLUP_RETENTION_DAYS`` is the days
    ``rpc_logs_cleanup`` passes. The hours' bucket rows go with them, unless log rows of the
    hour are left (retention longer for the log rows than for their rollups)."""
    if days == 0:
        return 0
    using = using or router.db_for_write(RPCRollup)
    cutoff = hour_of(_now() - dt.timedelta(days=days))
    old = RPCRollup.objects.using(using).filter(bucket_start__lt=cutoff)
    if dry_run:
        return old.count()
    deleted = 0
    old_days = RPCRollupDay.objects.using(using).filter(day__lt=cutoff)
    while True:
        with transaction.atomic(using=using):
            keys = list(old.order_by("bucket_start").values_list("pk", flat=True)[:batch_size])
            count, _ = RPCRollup.objects.using(using).filter(pk__in=keys).delete()
            # The days losing hours: read from their hours until refreshed below.
            old_days.filter(stale=False).update(stale=True)
        deleted += count
        if count < batch_size:
            break
    log_rows = _log_model().objects.using(using)
    oldest = log_rows.order_by("created_at").values_list("created_at", flat=True).first()
    kept_from = cutoff if oldest is None else min(cutoff, hour_of(oldest))
    RPCRollupBucket.objects.using(using).filter(start__lt=kept_from).delete()
    refresh_days(list(old_days.order_by("day").values_list("day", flat=True)), using=using)
    return deleted


# -- the daily tables ---------------------------------------------------------------------------

#: The statuses with a column of their own in the calls per outcome; ``pending_calls`` counts
#: the rest (pending, and any status written by other means).
_OUTCOME_STATUSES = {
    "success_calls": RPCStatus.SUCCESS.value,
    "failed_calls": RPCStatus.FAILED.value,
    "timeout_calls": RPCStatus.TIMEOUT.value,
    "rate_limited_calls": RPCStatus.RATE_LIMITED.value,
}


def outcome_sums() -> dict[str, Any]:
    """Aggregates of rollup rows' calls per outcome (:data:`OUTCOME_FIELDS`)."""
    sums: dict[str, Any] = {
        name: Sum("calls", filter=Q(status=status)) for name, status in _OUTCOME_STATUSES.items()
    }
    sums["pending_calls"] = Sum("calls", filter=~Q(status__in=list(_OUTCOME_STATUSES.values())))
    return sums


def days_to_refresh(using: str | None = None) -> list[dt.datetime]:
    """The days whose daily rows are stale, or were never made for hours rolled up."""
    using = using or router.db_for_write(RPCRollup)
    markers = dict(RPCRollupDay.objects.using(using).values_list("day", "stale"))
    days = {day for day, stale in markers.items() if stale}
    for start in RPCRollupBucket.objects.using(using).values_list("start", flat=True):
        day = day_of(start)
        if day not in markers:
            days.add(day)
    return sorted(days)


def refresh_days(
    days: list[dt.datetime] | None = None,
    *,
    using: str | None = None,
    now: dt.datetime | None = None,
) -> int:
    """Remake the daily rows of ``days`` (default: :func:`days_to_refresh`), each day in its
    own transaction (:func:`refresh_day`); return how many days were remade."""
    using = using or router.db_for_write(RPCRollup)
    chosen = days_to_refresh(using) if days is None else days
    for day in chosen:
        refresh_day(day, using=using, now=now)
    return len(chosen)


def refresh_day(
    day: dt.datetime, *, using: str | None = None, now: dt.datetime | None = None
) -> None:
    """Remake the daily rows of the UTC day starting at ``day`` from its hourly rollups, and
    its hours' calls per outcome, in one transaction that first locks the day's hours and
    marker; then mark it fresh. Idempotent. A day with neither rollups nor hours left loses its
    marker."""
    using = using or router.db_for_write(RPCRollup)
    now = now or _now()
    day = day_of(day)
    RPCRollupDay.objects.using(using).get_or_create(day=day)
    with transaction.atomic(using=using):
        # The day's hours first, then its marker: the order every change to an hour locks
        # them in (its hour, then the marker it marks stale), so they never deadlock.
        hours = list(
            RPCRollupBucket.objects.using(using)
            .select_for_update()
            .filter(start__gte=day, start__lt=day + DAY)
            .order_by("start")
        )
        marker = RPCRollupDay.objects.using(using).select_for_update().get(day=day)
        hourly: Any = RPCRollup.objects.using(using).filter(
            bucket_start__gte=day, bucket_start__lt=day + DAY
        )
        RPCDailyRollup.objects.using(using).filter(day=day).delete()
        RPCDailyUserRollup.objects.using(using).filter(day=day).delete()
        RPCHourlyMethodRollup.objects.using(using).filter(
            hour__gte=day, hour__lt=day + DAY
        ).delete()
        sums: dict[str, Any] = {name: Sum(name) for name in SUM_FIELDS}
        sums["duration_max_ms"] = Max("duration_max_ms")
        by_method: list[dict[str, Any]] = list(
            hourly.order_by().values("method", "status").annotate(**sums)
        )
        RPCDailyRollup.objects.using(using).bulk_create(
            [
                RPCDailyRollup(
                    day=day,
                    method=row["method"],
                    status=row["status"],
                    duration_max_ms=row["duration_max_ms"],
                    **{name: _summed(row[name], name) for name in SUM_FIELDS},
                )
                for row in by_method
            ]
        )
        by_hour: list[dict[str, Any]] = list(
            hourly.order_by().values("bucket_start", "method", "status").annotate(**sums)
        )
        RPCHourlyMethodRollup.objects.using(using).bulk_create(
            [
                RPCHourlyMethodRollup(
                    hour=row["bucket_start"],
                    method=row["method"],
                    status=row["status"],
                    duration_max_ms=row["duration_max_ms"],
                    **{name: _summed(row[name], name) for name in SUM_FIELDS},
                )
                for row in by_hour
            ]
        )
        # Named apart from the columns: the outcomes' sums filter the ``calls`` column.
        totals = ("rows", "calls", "billed_calls", "cost")
        user_sums = {f"all_{name}": Sum(name) for name in totals}
        by_user: list[dict[str, Any]] = list(
            hourly.order_by().values("user_id", "username").annotate(**user_sums, **outcome_sums())
        )
        RPCDailyUserRollup.objects.using(using).bulk_create(
            [
                RPCDailyUserRollup(
                    day=day,
                    user_id=row["user_id"],
                    username=row["username"],
                    **{name: _summed(row[f"all_{name}"], name) for name in totals},
                    **{name: row[name] or 0.0 for name in OUTCOME_FIELDS},
                )
                for row in by_user
            ]
        )
        per_hour: dict[dt.datetime, dict[str, Any]] = {
            row["bucket_start"]: row
            for row in hourly.order_by().values("bucket_start").annotate(**outcome_sums())
        }
        for hour in hours:
            found: dict[str, Any] = per_hour.get(hour.start, {})
            for name in OUTCOME_FIELDS:
                setattr(hour, name, found.get(name) or 0.0)
        RPCRollupBucket.objects.using(using).bulk_update(hours, list(OUTCOME_FIELDS))
        if not hours and not per_hour:
            marker.delete(using=using)
            return
        marker.stale = False
        marker.computed_at = now
        marker.save(using=using, update_fields=["stale", "computed_at"])


def _summed(value: Any, name: str) -> Any:
    """A summed column's value, zero for none; costs rounded to their places (SQLite sums
    decimals as floats)."""
    if name == "cost":
        return Decimal(value or 0).quantize(Decimal(1).scaleb(-COST_DECIMAL_PLACES))
    return value or 0
