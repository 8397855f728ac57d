"""``RPCLogQuerySet``: the query API (filters, analytics) and the write API behind the writers."""

from __future__ import annotations

import ipaddress
import math
import time
import uuid
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, TypedDict, cast

from django.conf import settings
from django.db import connections, models
from django.db.models import Avg, Count, Q
from django.utils import timezone

from django_rpc_audit.status import RPCStatus
from django_rpc_audit.utils import to_jsonable

if TYPE_CHECKING:
    from django_rpc_audit.models import RPCLog

# Row ids are derived from the call's identity, so the finishing write finds the row the
# starting write made (or makes it, if that write was lost) without any shared state.
_LOG_ID_NAMESPACE = uuid.UUID("6f1d2c1e-7a53-4c53-9a8e-2f4d1b0c9e71")


def call_log_id(correlation_id: str, started_at: datetime) -> uuid.UUID:
    """The primary key of the row logging the call ``correlation_id`` started at ``started_at``."""
    return uuid.uuid5(_LOG_ID_NAMESPACE, f"{correlation_id}|{started_at.isoformat()}")


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


def percentile_cont(sorted_values: Sequence[float], fraction: float) -> float | None:
    """The same interpolated percentile as PostgreSQL's ``percentile_cont``, in Python."""
    if not sorted_values:
        return None
    position = fraction * (len(sorted_values) - 1)
    lower = math.floor(position)
    upper = min(lower + 1, len(sorted_values) - 1)
    return sorted_values[lower] + (position - lower) * (sorted_values[upper] - sorted_values[lower])


def _outcome_counts() -> dict[str, Count]:
    """The call counts every stats row has: in all, and by outcome."""
    return {
        "total_calls": Count("pk"),
        "success_count": Count("pk", filter=Q(status=RPCStatus.SUCCESS)),
        "failed_count": Count("pk", filter=Q(status=RPCStatus.FAILED)),
        "timeout_count": Count("pk", filter=Q(status=RPCStatus.TIMEOUT)),
    }


def _stored_datetime(value: datetime) -> datetime:
    """Signals carry aware UTC datetimes; a project with ``USE_TZ = False`` stores naive ones."""
    if not settings.USE_TZ and timezone.is_aware(value):
        return timezone.make_naive(value)
    return value


def _truncate(value: object, limit: int) -> str:
    """``value`` as text a database column accepts: NUL removed (PostgreSQL refuses it), capped."""
    text = "" if value is None else str(value)
    return text.replace("\x00", "")[:limit]


def _ip_or_none(value: object) -> str | None:
    if not value:
        return None
    try:
        return str(ipaddress.ip_address(str(value)))
    except ValueError:
        return None


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
        Pending calls count in ``total_calls`` but have no duration.
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
                total_calls=row["total_calls"],
                success_count=row["success_count"],
                failed_count=row["failed_count"],
                timeout_count=row["timeout_count"],
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

        ``username`` is the value of the user model's ``USERNAME_FIELD``.
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
                total_calls=row["total_calls"],
                success_count=row["success_count"],
                failed_count=row["failed_count"],
                timeout_count=row["timeout_count"],
                caller_ip_count=row["caller_ip_count"],
            )
            for row in rows
        ]
        stats.sort(key=lambda item: (-item["total_calls"], str(item["username"] or "")))
        return stats

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
            id=call_log_id(correlation_id, started_at),
            **_started_values(correlation_id, method, params, user, caller_ip, user_agent),
            created_at=_stored_datetime(started_at),
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
        )
        if self.filter(pk=log_id).update(**outcome):
            return
        self.create(
            id=log_id,
            **_started_values(correlation_id, method, params, user, caller_ip, user_agent),
            created_at=_stored_datetime(started_at),
            **outcome,
        )


def outcome_values(
    *,
    status: str,
    response: Any,
    error_code: str | None,
    error_message: str | None,
    duration_ms: float | None,
    completed_at: datetime,
) -> dict[str, Any]:
    """Column values known when a call ends, made safe to store."""
    return {
        "status": status,
        "response": None if response is None else to_jsonable(response),
        "error_code": _truncate(error_code, 100),
        "error_message": _truncate(error_message, 1_000_000),
        "duration_ms": duration_ms,
        "completed_at": _stored_datetime(completed_at),
    }


def _started_values(
    correlation_id: str,
    method: str,
    params: Any,
    user: Any,
    caller_ip: str | None,
    user_agent: str | None,
) -> dict[str, Any]:
    """Column values known when a call starts, made safe to store whatever the caller passed."""
    user_pk = getattr(user, "pk", None) if isinstance(user, models.Model) else None
    return {
        "correlation_id": _truncate(correlation_id, 64),
        "method": _truncate(method, 255),
        "params": to_jsonable(params) if params is not None else {},
        "user_id": user_pk,
        "caller_ip": _ip_or_none(caller_ip),
        "user_agent": _truncate(user_agent, 100_000),
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
)


def is_finished_event(event: Mapping[str, Any]) -> bool:
    """True for ``rpc_finished``'s arguments, false for ``rpc_started``'s."""
    return "status" in event


def event_row_values(event: Mapping[str, Any]) -> dict[str, Any]:
    """Every column of the row an ``rpc_started`` or ``rpc_finished`` event stands for.

    A started event gives a ``pending`` row; a finished one (which repeats the started keys)
    the whole row in its final state. Keys the helpers do not take are ignored, so events
    may carry more than today's keys.
    """
    started_at = event["started_at"]
    started: dict[str, Any] = {key: event.get(key) for key in STARTED_KEYS}
    values: dict[str, Any] = {
        "id": call_log_id(event["correlation_id"], started_at),
        **_started_values(**started),
        "created_at": _stored_datetime(started_at),
    }
    if is_finished_event(event):
        outcome: dict[str, Any] = {key: event.get(key) for key in OUTCOME_KEYS}
        values.update(outcome_values(**outcome))
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
    from psycopg.types.json import Jsonb

    model = queryset.model
    fields = list(model._meta.concrete_fields)
    defaults = {f.attname: f.get_default() for f in fields}
    json_columns = {f.attname for f in fields if isinstance(f, models.JSONField)}
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
                values = event_row_values(event)
                row = []
                for name in attnames:
                    value = values.get(name, defaults[name])
                    if name in json_columns and value is not None:
                        value = Jsonb(value)
                    row.append(value)
                copy.write_row(row)
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
