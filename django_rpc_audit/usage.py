"""Usage reports: calls and costs per user and method, per day or month, read from the rollups.

The figures come from :class:`~django_rpc_audit.rollups.models.RPCRollup` (sealed and
unsealed rows summed), so they outlive the log rows: ``rpc_logs_cleanup`` counts every row it
deletes into the rollups first. They are as fresh as the last ``rpc_rollup`` run. Periods are
UTC days and months. ::

    from django_rpc_audit.usage import month_range, usage

    start, end = month_range("2026-11")
    for line in usage(start, end, by=("user",)):
        print(line.username, line.billed_calls, line.cost)

``cost`` and ``billed_calls`` are exact: costed calls are never sampled, and each is counted
once. ``calls`` counts every call (any outcome), scaled up for sampled rows (``1 /
sample_rate`` each), rounded.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Literal

from django.conf import settings
from django.db import router
from django.db.models import Max, Q, Sum
from django.db.models.functions import Trunc

from django_rpc_audit.conf import COST_DECIMAL_PLACES
from django_rpc_audit.rollups.maintain import DAY, hour_of
from django_rpc_audit.rollups.models import (
    BUCKET,
    RPCDailyRollup,
    RPCDailyUserRollup,
    RPCRollup,
    RPCRollupBucket,
)
from django_rpc_audit.rollups.read import fresh_days, hours_outside, snapshot
from django_rpc_audit.status import RPCStatus

Period = Literal["day", "month"]
Dimension = Literal["user", "method"]

#: The columns a report can be broken down by, and the rollup fields of each.
_DIMENSIONS: dict[str, tuple[str, ...]] = {
    "user": ("user_id", "username"),
    "method": ("method",),
}
_FAILED = (RPCStatus.FAILED.value, RPCStatus.TIMEOUT.value)
_PLACES = Decimal(1).scaleb(-COST_DECIMAL_PLACES)


@dataclass(frozen=True, slots=True)
class UsageLine:
    """One line of a usage report: a period, a user and/or a method, and what they used.

    ``period`` is ``None`` for a report over the whole range; ``user_id`` / ``username`` and
    ``method`` are ``None`` when the report is not broken down by them. ``username`` is the
    snapshot taken when the calls were made, so a deleted user's usage still names them.
    """

    period: dt.date | None
    user_id: Any
    username: str | None
    method: str | None
    #: Calls made (any outcome), sampled rows scaled up, rounded.
    calls: int
    #: Calls that failed or timed out (scaled up like ``calls``).
    failed_calls: int
    #: Calls that carry a cost: exact.
    billed_calls: int
    #: Their total cost, exact, in the unit of ``COSTS``.
    cost: Decimal


def month_range(month: str | dt.date) -> tuple[dt.datetime, dt.datetime]:
    """The first instant of ``month`` (``"2026-11"`` or a date in it) and of the next, UTC.

    :raises ValueError: not a ``YYYY-MM`` month.
    """
    if isinstance(month, str):
        try:
            first = dt.datetime.strptime(month.strip(), "%Y-%m").date()
        except ValueError:
            raise ValueError(f"{month!r} is not a month written YYYY-MM (2026-11).") from None
    else:
        first = month.replace(day=1)
    following = (first.replace(day=28) + dt.timedelta(days=4)).replace(day=1)
    return _midnight(first), _midnight(following)


def _midnight(day: dt.date) -> dt.datetime:
    # Naive with USE_TZ = False, as the rows and rollups store their times then.
    return dt.datetime.combine(day, dt.time(), tzinfo=dt.UTC if settings.USE_TZ else None)


def usage(
    start: dt.datetime,
    end: dt.datetime,
    *,
    by: Sequence[Dimension] = ("user", "method"),
    period: Period | None = None,
    user: Any = None,
    method: str | None = None,
    billed_only: bool = False,
    using: str | None = None,
) -> list[UsageLine]:
    """Usage from ``start`` (included) to ``end`` (excluded), broken down ``by`` user and/or
    method, and per ``period`` (``"day"`` or ``"month"``, UTC) if given.

    ``start`` and ``end`` are rounded down to the hour (the rollups' bucket). ``user`` (a user
    or its primary key) and ``method`` narrow it down; ``billed_only`` keeps the lines with a
    cost. Lines come by period, then highest cost, then most calls. Read in one snapshot: per
    user (or per method) over the whole UTC days of the range from the daily tables, where
    they are not stale, and the other hours from the hourly rollups.

    :raises ValueError: an unknown dimension or period, or ``end`` before ``start``.
    """
    unknown = [name for name in by if name not in _DIMENSIONS]
    if unknown:
        raise ValueError(f"usage() is broken down by 'user' and/or 'method', not {unknown!r}.")
    if period not in (None, "day", "month"):
        raise ValueError(f"period must be 'day', 'month' or None, not {period!r}.")
    if end < start:
        raise ValueError(f"end ({end.isoformat()}) is before start ({start.isoformat()}).")
    using = using or router.db_for_read(RPCRollup)
    fields = [field for name in by for field in _DIMENSIONS[name]]
    if period is not None:
        fields.insert(0, "period")
    # Per user over whole UTC days: the daily user rows; per method: the daily method rows;
    # by user and method, or one user's: the hourly rollups.
    daily_model: Any = None
    if method is None and tuple(by) == ("user",):
        daily_model = RPCDailyUserRollup
    elif user is None and tuple(by) == ("method",):
        daily_model = RPCDailyRollup
    start, end = _next_hour(start), _next_hour(end)  # the hours starting from start to end
    first = start.replace(hour=0)
    if first < start:
        first += DAY
    totals: dict[tuple[Any, ...], dict[str, Any]] = {}
    with snapshot(using):
        days = fresh_days(using, first, end.replace(hour=0)) if daily_model is not None else []
        if days:
            daily = daily_model.objects.using(using).filter(day__in=days)
            if user is not None:
                daily = daily.filter(user_id=getattr(user, "pk", user))
            failed: Any = Sum("calls", filter=Q(status__in=_FAILED))
            if daily_model is RPCDailyUserRollup:
                failed = Sum("failed_calls") + Sum("timeout_calls")
            _fold(totals, _grouped(daily, fields, period, "day", failed), fields)
        hours = hours_outside(start, end, days)
        if hours is not None:
            rollups = RPCRollup.objects.using(using).filter(hours)
            if user is not None:
                rollups = rollups.filter(user_id=getattr(user, "pk", user))
            if method is not None:
                rollups = rollups.filter(method=method)
            failed = Sum("calls", filter=Q(status__in=_FAILED))
            _fold(totals, _grouped(rollups, fields, period, "bucket_start", failed), fields)
    lines = [_line(row, period) for row in totals.values() if not billed_only or row["billed"] > 0]
    lines.sort(
        key=lambda line: (
            line.period or dt.date.min,
            -line.cost,
            -line.calls,
            line.username or "",
            line.method or "",
        )
    )
    return lines


def _next_hour(moment: dt.datetime) -> dt.datetime:
    """The first hour starting at or after ``moment``."""
    hour = hour_of(moment)
    return hour if hour == moment else hour + BUCKET


def _grouped(table: Any, fields: list[str], period: Period | None, moment: str, failed: Any) -> Any:
    if period is not None:
        table = table.annotate(period=Trunc(moment, period, tzinfo=dt.UTC))
    return (
        table.order_by()
        .values(*fields)
        .annotate(
            calls_sum=Sum("calls"),
            failed_sum=failed,
            billed=Sum("billed_calls"),
            cost_sum=Sum("cost"),
        )
    )


def _fold(totals: dict[tuple[Any, ...], dict[str, Any]], grouped: Any, fields: list[str]) -> None:
    """Add the grouped rows to ``totals``, by their ``fields``."""
    for row in grouped:
        key = tuple(_period_key(row[name]) if name == "period" else row[name] for name in fields)
        found = totals.get(key)
        values = {
            "calls_sum": row["calls_sum"] or 0.0,
            "failed_sum": row["failed_sum"] or 0.0,
            "billed": int(row["billed"] or 0),
            "cost_sum": Decimal(row["cost_sum"] if row["cost_sum"] is not None else 0),
        }
        if found is None:
            totals[key] = {**{name: row[name] for name in fields}, **values}
            continue
        for name, value in values.items():
            found[name] += value


def _period_key(moment: Any) -> Any:
    return _date_of(moment) if moment is not None else None


def _line(row: dict[str, Any], period: Period | None) -> UsageLine:
    moment = row.get("period")
    return UsageLine(
        period=None if moment is None else _date_of(moment),
        user_id=row.get("user_id"),
        username=row.get("username"),
        method=row.get("method"),
        calls=round(row["calls_sum"] or 0),
        failed_calls=round(row["failed_sum"] or 0),
        billed_calls=int(row["billed"] or 0),
        # Six places whatever the database returns (SQLite drops trailing zeros).
        cost=Decimal(row["cost_sum"] if row["cost_sum"] is not None else 0).quantize(_PLACES),
    )


def _date_of(moment: dt.datetime | dt.date) -> dt.date:
    if isinstance(moment, dt.datetime):
        if moment.tzinfo is not None:
            moment = moment.astimezone(dt.UTC)
        return moment.date()
    return moment


def total(lines: Iterable[UsageLine]) -> UsageLine:
    """The sum of ``lines``, as one line with no period, user or method."""
    calls = failed = billed = 0
    cost = Decimal(0).quantize(_PLACES)
    for line in lines:
        calls += line.calls
        failed += line.failed_calls
        billed += line.billed_calls
        cost += line.cost
    return UsageLine(
        period=None,
        user_id=None,
        username=None,
        method=None,
        calls=calls,
        failed_calls=failed,
        billed_calls=billed,
        cost=cost,
    )


#: The CSV columns, in order.
CSV_COLUMNS = (
    "period",
    "user_id",
    "username",
    "method",
    "calls",
    "failed_calls",
    "billed_calls",
    "cost",
)


def to_csv(lines: Iterable[UsageLine], out: io.TextIOBase | Any | None = None) -> str:
    """``lines`` as CSV with a header row (:data:`CSV_COLUMNS`); written to ``out`` if given,
    and returned. Costs keep every decimal place; empty cells for what a report does not
    break down by. A text starting with ``=``, ``+``, ``-`` or ``@`` (a formula to a
    spreadsheet) is prefixed with ``'``."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for line in lines:
        writer.writerow(
            [
                "" if line.period is None else line.period.isoformat(),
                "" if line.user_id is None else line.user_id,
                _cell(line.username),
                _cell(line.method),
                line.calls,
                line.failed_calls,
                line.billed_calls,
                line.cost,
            ]
        )
    text = buffer.getvalue()
    if out is not None:
        out.write(text)
    return text


def _cell(value: str | None) -> str:
    if value is None:
        return ""
    return f"'{value}" if value[:1] in ("=", "+", "-", "@") else value


# -- CloudEvents --------------------------------------------------------------------------------

#: The namespace of the events' ids (uuid5 of source, day, user and method).
_EVENT_NAMESPACE = uuid.UUID("8a0f0c55-2b7e-4f0a-9d3c-6f7e1b2a4c19")
#: The ``type`` of a usage event.
EVENT_TYPE = "io.github.django-rpc-audit.usage.daily"


def closed_until(using: str | None = None) -> dt.datetime | None:
    """The end of the last day whose hours have all settled (see ``ROLLUP_SETTLE_SECONDS``):
    its figures no longer change, so it can be exported once. ``None`` before any has."""
    last = (
        RPCRollupBucket.objects.using(using)
        .filter(settled=True)
        .aggregate(last=Max("start"))["last"]
    )
    if last is None:
        return None
    end: dt.datetime = last + BUCKET
    if end.tzinfo is not None:
        end = end.astimezone(dt.UTC)
    return end.replace(hour=0, minute=0, second=0, microsecond=0)


def cloud_events(
    start: dt.datetime,
    end: dt.datetime,
    *,
    source: str = "django-rpc-audit",
    using: str | None = None,
) -> list[dict[str, Any]]:
    """The usage of each user and method per closed day from ``start`` to ``end`` as
    CloudEvents 1.0 (the shape OpenMeter ingests): one event per (day, user, method) with
    calls or a cost, ``subject`` the username (``user:<id>`` without one, ``anonymous``), and
    ``data`` the method, calls, billed calls and cost (a string: exact; and ``cost_micros``,
    an integer of millionths). Days not closed yet (:func:`closed_until`) are left out.

    The ``id`` is fixed by source, day, user and method, so a system that deduplicates on
    source and id (OpenMeter) takes each day once, however often it is exported.
    """
    limit = closed_until(using)
    if limit is None or limit <= start:
        return []
    lines = usage(start, min(end, limit), by=("user", "method"), period="day", using=using)
    events = []
    for line in lines:
        assert line.period is not None  # period="day"
        subject = line.username or (
            f"user:{line.user_id}" if line.user_id is not None else "anonymous"
        )
        identity = (
            f"{source}|{line.period.isoformat()}|{line.user_id}|{line.username}|{line.method}"
        )
        events.append(
            {
                "specversion": "1.0",
                "id": str(uuid.uuid5(_EVENT_NAMESPACE, identity)),
                "source": source,
                "type": EVENT_TYPE,
                "subject": subject,
                "time": _midnight(line.period).isoformat().replace("+00:00", "Z"),
                "datacontenttype": "application/json",
                "data": {
                    "method": line.method,
                    "user_id": None if line.user_id is None else str(line.user_id),
                    "calls": line.calls,
                    "failed_calls": line.failed_calls,
                    "billed_calls": line.billed_calls,
                    "cost": str(line.cost),
                    "cost_micros": int(line.cost.scaleb(COST_DECIMAL_PLACES)),
                },
            }
        )
    return events
