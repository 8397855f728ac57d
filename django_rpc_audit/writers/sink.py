"""The sink: call events become ``RPCLog`` rows. Every writer ends here.

- Column values made safe to store whatever the caller passed (:func:`event_row_values`):
  sanitized and capped JSON, capped text, canonical IPs, deterministic row ids.
- Single-row writes on the caller's connection (:func:`record_started`,
  :func:`record_finished`), for the synchronous writer and manual logging.
- Idempotent batch writes (:func:`bulk_record_events`): ``COPY`` and an upsert on PostgreSQL,
  multi-row upserts on MySQL and MariaDB (:mod:`~django_rpc_audit.writers.mysql`),
  ``bulk_create`` with conflict handling elsewhere, for the buffered writer.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import json
import time
import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from django.db import connections, models, transaction

from django_rpc_audit.conf import get_config
from django_rpc_audit.sanitize import cap_text, clean_text, stored_json_and_text
from django_rpc_audit.status import RPCStatus
from django_rpc_audit.utils import stored_datetime

if TYPE_CHECKING:
    from django_rpc_audit.models import RPCLog
    from django_rpc_audit.querysets import RPCLogQuerySet

# -- row ids ------------------------------------------------------------------------------------

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


# -- column values ------------------------------------------------------------------------------


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


def outcome_values(
    *,
    status: str,
    response: Any,
    error_code: str | None,
    error_message: str | None,
    duration_ms: float | None,
    completed_at: datetime,
    sample_rate: float = 1.0,
    slow: Any = None,
    json_text: bool = False,
) -> dict[str, Any]:
    """Column values known when a call ends, made safe to store (sanitized, capped).

    ``sample_rate`` is the share of such calls that are logged (1.0 unless sampled); ``slow``
    the slow-call verdict (``rpc_finished``'s). With ``json_text`` the JSON column holds its
    compact JSON text instead (for ``COPY``).
    """
    config = get_config()
    to_json = stored_json_text if json_text else stored_json
    return {
        "status": status,
        "response": None if response is None else to_json(response, config.max_response_bytes),
        "error_code": _truncate(error_code, 100),
        "error_message": _capped_text(error_message, config.max_error_message_bytes),
        # A call its rate limit refused never ran: no duration to skew the latency figures.
        "duration_ms": None if status == RPCStatus.RATE_LIMITED else duration_ms,
        "completed_at": stored_datetime(completed_at),
        "sample_rate": sample_rate,
        "is_slow": slow is not None,
    }


def _user_columns(user: Any) -> tuple[Any, str]:
    """The ``user`` foreign key and the username snapshot of the user a call is attributed to.

    The snapshot (``get_username()``, no query: the instance is loaded) keeps who made the call
    once the user is deleted and the key is unset.
    """
    if not isinstance(user, models.Model):
        return None, ""
    try:
        username = str(user.get_username())  # type: ignore[attr-defined]
    except Exception:  # a user model without it, or one that fails: the key is enough
        username = ""
    return user.pk, _truncate(username, _USERNAME_MAX_LENGTH)


#: ``RPCLog.username``'s ``max_length``.
_USERNAME_MAX_LENGTH = 255


def _existing_user_pks(queryset: RPCLogQuerySet, pks: set[Any]) -> set[Any]:
    """Which of ``pks`` are users still in the database (one indexed query), read in the
    writing transaction: a row must not point at a user deleted before it is written (the
    foreign key would refuse it, at commit since the constraint is deferred)."""
    if not pks:
        return set()
    user_model = queryset.model._meta.get_field("user").related_model
    manager = user_model._base_manager.using(queryset.db)
    return set(manager.filter(pk__in=pks).values_list("pk", flat=True))


def _without_missing_user(queryset: RPCLogQuerySet, values: dict[str, Any]) -> dict[str, Any]:
    """``values`` with the user unset if it no longer exists (the username snapshot stays)."""
    user_pk = values.get("user_id")
    if user_pk is not None and not _existing_user_pks(queryset, {user_pk}):
        values["user_id"] = None
    return values


def _started_values(
    correlation_id: str,
    method: str,
    params: Any,
    user: Any,
    caller_ip: str | None,
    user_agent: str | None,
    json_text: bool = False,
    trace_id: str | None = None,
    span_id: str | None = None,
) -> dict[str, Any]:
    """Column values known when a call starts, made safe to store whatever the caller passed.

    Params are sanitized (:func:`~django_rpc_audit.sanitize.sanitize`) and capped at
    ``MAX_PARAMS_BYTES``; the user agent at ``MAX_USER_AGENT_BYTES``. With ``json_text``
    the JSON column holds its compact JSON text instead (for ``COPY``).
    """
    config = get_config()
    user_pk, username = _user_columns(user)
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
        "username": username,
        "caller_ip": _ip_or_none(caller_ip),
        "user_agent": _capped_text(user_agent, config.max_user_agent_bytes),
        "trace_id": _truncate(trace_id, 32),
        "span_id": _truncate(span_id, 16),
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
    trace_id: str | None = None,
    span_id: str | None = None,
) -> dict[str, Any]:
    """The ``pending`` row of a call: its id, :func:`_started_values` and ``created_at``.

    With ``for_copy`` the id is hex digits and the JSON columns JSON text, as ``COPY`` takes
    them.
    """
    return {
        "id": (call_log_id_hex if for_copy else call_log_id)(correlation_id, started_at),
        **_started_values(
            correlation_id,
            method,
            params,
            user,
            caller_ip,
            user_agent,
            json_text=for_copy,
            trace_id=trace_id,
            span_id=span_id,
        ),
        "created_at": stored_datetime(started_at),
    }


# -- single rows (synchronous writer, manual logging) -------------------------------------------


def _started_row_of(started: Mapping[str, Any], *, for_copy: bool = False) -> dict[str, Any]:
    """:func:`_started_row` of ``rpc_started``'s keyword arguments (or ``rpc_finished``'s,
    which repeat them); keys it does not take are ignored."""
    values: dict[str, Any] = {key: started.get(key) for key in STARTED_KEYS}
    return _started_row(**values, started_at=started["started_at"], for_copy=for_copy)


def record_started(queryset: RPCLogQuerySet, **started: Any) -> RPCLog:
    """Insert the ``pending`` row of a call that has just started (``rpc_started``'s kwargs:
    ``correlation_id``, ``method``, ``params``, ``user``, ``caller_ip``, ``user_agent``,
    ``started_at``, and optionally ``trace_id`` and ``span_id``)."""
    return queryset.create(**_without_missing_user(queryset, _started_row_of(started)))


def record_finished(
    queryset: RPCLogQuerySet,
    *,
    status: str,
    response: Any,
    error_code: str | None,
    error_message: str | None,
    duration_ms: float | None,
    completed_at: datetime,
    sample_rate: float = 1.0,
    slow: Any = None,
    **started: Any,
) -> None:
    """Complete the row of a finished call (``rpc_finished``'s kwargs: the outcome here, the
    call's ``rpc_started`` kwargs in ``started``), and queue its alerts.

    If the ``pending`` row is missing (its write failed, or nobody wrote it), the whole row is
    inserted now: a finished call never loses its row.
    """
    log_id = call_log_id(started["correlation_id"], started["started_at"])
    outcome = outcome_values(
        status=status,
        response=response,
        error_code=error_code,
        error_message=error_message,
        duration_ms=duration_ms,
        completed_at=completed_at,
        sample_rate=sample_rate,
        slow=slow,
    )
    if not queryset.filter(pk=log_id).update(**outcome):
        queryset.create(**_without_missing_user(queryset, _started_row_of(started)), **outcome)
    event = {key: started.get(key) for key in ("correlation_id", "method", "params", "user")}
    event |= {"started_at": started["started_at"], "status": status, "response": response}
    event |= {"slow": slow, "error_code": error_code, "error_message": error_message}
    queue_alerts(queryset.db, [event | {"duration_ms": duration_ms, "completed_at": completed_at}])


# -- bulk writes (buffered writer) ------------------------------------------------------------

#: The event keys :func:`_started_values` takes. Adding a key to an event is one line here.
STARTED_KEYS: tuple[str, ...] = (
    "correlation_id",
    "method",
    "params",
    "user",
    "caller_ip",
    "user_agent",
    "trace_id",
    "span_id",
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
    "slow",
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
    # The client's events carry their JSON already in stored form (capped, redacted) and its
    # text: used as they are instead of being made again.
    params_json = event.get("params_json")
    if params_json is not None:
        started["params"] = None
    values = _started_row(**started, started_at=event["started_at"], for_copy=for_copy)
    if params_json is not None:
        values["params"] = params_json if for_copy else event["params"]
    if is_finished_event(event):
        # rpc_finished always sends the outcome; the receivers add sample_rate (default 1.0).
        outcome: dict[str, Any] = {key: event[key] for key in OUTCOME_KEYS if key in event}
        response_json = event.get("response_json")
        if response_json is not None:
            outcome["response"] = None
        values.update(outcome_values(**outcome, json_text=for_copy))
        if response_json is not None:
            values["response"] = response_json if for_copy else event["response"]
    return values


#: What one buffered call costs beyond its texts: the event dict, datetimes, ids (an estimate).
EVENT_OVERHEAD_BYTES = 1_024


def event_bytes(event: dict[str, Any]) -> int:
    """The memory an event holds in a buffer, estimated from its texts: the stored JSON of its
    params and response (counted twice: the objects and their text), its error message and
    user agent, plus :data:`EVENT_OVERHEAD_BYTES`.

    The client's events carry their stored JSON (already capped); for an event that does not
    (one handed to a writer directly), it is made here and kept in the event, so the writer
    does not make it again.
    """
    config = get_config()
    size = EVENT_OVERHEAD_BYTES
    for key, text_key, cap in (
        ("params", "params_json", config.max_params_bytes),
        ("response", "response_json", config.max_response_bytes),
    ):
        text = event.get(text_key)
        if text is None and event.get(key) is not None:
            value, text = stored_json_and_text(event[key], cap)
            event[key], event[text_key] = value, text
        if text is not None:
            size += 2 * len(text)
    for key in ("error_message", "user_agent"):
        text = event.get(key)
        if isinstance(text, str):
            size += len(text)
    return size


def bulk_record_events(queryset: RPCLogQuerySet, events: Sequence[Mapping[str, Any]]) -> int:
    """Write the rows of ``events`` (at most one per call) in one transaction; return the count.

    Idempotent, so a batch can be retried after a partial failure or a lost commit reply:
    finished calls are upserted (``INSERT ... ON CONFLICT (id) DO UPDATE``), pending ones
    inserted unless their row exists (``ON CONFLICT DO NOTHING``), so a late pending write
    never turns a finished row back to ``pending``.
    """
    connection = connections[queryset.db]
    if connection.vendor == "mysql":  # MySQL and MariaDB
        from django_rpc_audit.writers import mysql

        return mysql.bulk_record_events(queryset, connection, events)
    if connection.vendor == "postgresql" and _copy_supported(connection):
        with transaction.atomic(using=queryset.db):
            written = _copy_record_events(queryset, connection, events)
            queue_alerts(queryset.db, events)
            return written
    model = queryset.model
    finished: list[RPCLog] = []
    pending: list[RPCLog] = []
    with transaction.atomic(using=queryset.db):
        live_users = live_user_pks(queryset, events)
        for event in events:
            values = event_row_values(event)
            if values["user_id"] not in live_users:
                values["user_id"] = None
            (finished if is_finished_event(event) else pending).append(model(**values))
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
        queue_alerts(queryset.db, events)
    return len(finished) + len(pending)


def _user_pks(events: Sequence[Mapping[str, Any]]) -> set[Any]:
    """The primary keys of the users the ``events`` are attributed to."""
    return {user.pk for event in events if isinstance(user := event.get("user"), models.Model)}


def live_user_pks(queryset: RPCLogQuerySet, events: Sequence[Mapping[str, Any]]) -> set[Any]:
    """Of the users ``events`` are attributed to, those still in the database: one query per
    batch, in its transaction. A row whose user is not among them is written with the user
    unset (and its username snapshot), never refused for its dangling key."""
    return _existing_user_pks(queryset, _user_pks(events))


def queue_alerts(using: str, events: Sequence[Mapping[str, Any]]) -> None:
    """Put the alerts (webhooks) of the finished calls among ``events`` in the outbox, in the
    transaction writing their rows: see :mod:`django_rpc_audit.alerts.outbox`."""
    from django_rpc_audit.alerts.outbox import enqueue_alerts

    enqueue_alerts(using, events)


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
    live_users = live_user_pks(queryset, events)
    with connection.cursor() as cursor:
        cursor.execute(
            f"CREATE TEMPORARY TABLE IF NOT EXISTS {staging} "
            f"(LIKE {table} INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
        )
        # psycopg's own COPY, past Django's cursor wrapper: wrap its errors the way Django
        # wraps every other query's, so that a cancelled COPY or a dropped connection is an
        # OperationalError (an outage, retried) and not a bare psycopg exception.
        with (
            connection.wrap_database_errors,
            cursor.cursor.copy(f"COPY {staging} ({columns}) FROM STDIN") as copy,
        ):
            for n, event in enumerate(events, 1):
                values = event_row_values(event, for_copy=True)
                if values["user_id"] not in live_users:
                    values["user_id"] = None
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
