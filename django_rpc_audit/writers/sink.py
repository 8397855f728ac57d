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
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from django.db import connections, models, transaction

from django_rpc_audit.conf import get_config
from django_rpc_audit.costs import call_cost
from django_rpc_audit.databases import lz4_available
from django_rpc_audit.payload import Deferred
from django_rpc_audit.sanitize import cap_text, clean_text, stored_json_and_text
from django_rpc_audit.status import RPCStatus
from django_rpc_audit.utils import stored_datetime

if TYPE_CHECKING:
    from django_rpc_audit.alerts.slow import SlowVerdict
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
    if type(value) is str and len(value) <= limit and value.isascii() and "\x00" not in value:
        return value  # what the steps below return for it: an id, a method name
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


#: ``_started_row_of``'s params when the caller gives none.
_UNSET: Any = object()


def _started_row_of(
    started: Mapping[str, Any], *, for_copy: bool = False, params: Any = _UNSET
) -> dict[str, Any]:
    """The ``pending`` row of a call, from ``rpc_started``'s keyword arguments (or
    ``rpc_finished``'s, which repeat them; keys it does not take are ignored): its id, the
    column values known when a call starts, made safe to store whatever the caller passed,
    and ``created_at``.

    The params are sanitized (:func:`~django_rpc_audit.sanitize.sanitize`) and capped at
    ``MAX_PARAMS_BYTES`` (``params``, when given: their stored value, used as it is); the
    user agent at ``MAX_USER_AGENT_BYTES``. With ``for_copy`` the id is hex digits and the
    JSON columns JSON text, as ``COPY`` takes them.
    """
    config = get_config()
    get = started.get
    correlation_id: Any = get("correlation_id")
    started_at = started["started_at"]
    if params is _UNSET:
        params = get("params")
        if params is None:
            params = "{}" if for_copy else {}
        else:
            to_json = stored_json_text if for_copy else stored_json
            params = to_json(params, config.max_params_bytes)
    user_pk, username = _user_columns(get("user"))
    return {
        "id": (call_log_id_hex if for_copy else call_log_id)(correlation_id, started_at),
        "correlation_id": _truncate(correlation_id, 64),
        "method": _truncate(get("method"), 255),
        "params": params,
        "user_id": user_pk,
        "username": username,
        "caller_ip": _ip_or_none(get("caller_ip")),
        "user_agent": _capped_text(get("user_agent"), config.max_user_agent_bytes),
        "trace_id": _truncate(get("trace_id"), 32),
        "span_id": _truncate(get("span_id"), 16),
        "created_at": stored_datetime(started_at),
    }


# -- single rows (synchronous writer, manual logging) -------------------------------------------


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
    row = None
    if get_config().costs:
        row = _started_row_of(started)
        outcome["cost"] = stored_cost(started, {**row, **outcome})
    if not queryset.filter(pk=log_id).update(**outcome):
        row = row or _started_row_of(started)
        queryset.create(**_without_missing_user(queryset, row), **outcome)
    event = {key: started.get(key) for key in ("correlation_id", "method", "params", "user")}
    event |= {"started_at": started["started_at"], "status": status, "response": response}
    event |= {"slow": slow, "error_code": error_code, "error_message": error_message}
    queue_alerts(queryset.db, [event | {"duration_ms": duration_ms, "completed_at": completed_at}])


# -- bulk writes (buffered writer) ------------------------------------------------------------

#: The event keys :func:`_started_row_of` takes.
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
    takes them. A payload the client deferred (:class:`~django_rpc_audit.payload.Deferred`)
    is made into its stored form here, in the event itself (see :func:`resolve_payloads`).
    """
    if isinstance(event, dict):
        resolve_payloads(event)
    # The client's events carry their JSON already in stored form (capped, redacted) and its
    # text: used as they are instead of being made again.
    params_json = event.get("params_json")
    params: Any = _UNSET
    if params_json is not None:
        params = params_json if for_copy else event["params"]
    values = _started_row_of(event, for_copy=for_copy, params=params)
    if is_finished_event(event):
        # rpc_finished always sends the outcome; the receivers add sample_rate (default 1.0).
        outcome: dict[str, Any] = {key: event[key] for key in OUTCOME_KEYS if key in event}
        response_json = event.get("response_json")
        if response_json is not None:
            outcome["response"] = None
        values.update(outcome_values(**outcome, json_text=for_copy))
        if response_json is not None:
            values["response"] = response_json if for_copy else event["response"]
        values["cost"] = stored_cost(event, values)
    return values


_PAYLOAD_KEYS = (("params", "params_json"), ("response", "response_json"))


def resolve_payloads(event: dict[str, Any]) -> int:
    """Replace the deferred payloads of ``event`` by their stored form and its text, in place
    (so the alerts queued with the row read them too); return the characters parsed."""
    work = 0
    for key, text_key in _PAYLOAD_KEYS:
        value = event.get(key)
        if isinstance(value, Deferred):
            work += value.size
            result = value.resolve()
            event[key], event[text_key] = result.value, result.text
    return work


def stored_cost(event: Mapping[str, Any], values: Mapping[str, Any]) -> Decimal | None:
    """The cost of the finished call ``event`` (``COSTS``), whose row holds ``values``.

    A price costs a lookup; a function gets the stored params and response (redacted and
    capped, as the row holds them, parsed back from their JSON text when needed) and is only
    called for a billable outcome. Never raises (see :func:`~django_rpc_audit.costs.call_cost`).
    """
    config = get_config()
    if not config.costs:
        return None

    def call_values() -> dict[str, Any]:
        return {
            "params": _stored_value(event, values, "params"),
            "response": _stored_value(event, values, "response"),
            "error_code": values.get("error_code") or "",
            "duration_ms": values.get("duration_ms"),
            "user_id": values.get("user_id"),
            "username": values.get("username") or "",
        }

    return call_cost(config, method=values["method"], status=values["status"], values=call_values)


def _stored_value(event: Mapping[str, Any], values: Mapping[str, Any], key: str) -> Any:
    """The stored JSON value of ``key`` (params or response): the event's when it carries its
    stored form (``<key>_json``), else the row's, parsed back if it is JSON text."""
    if event.get(f"{key}_json") is not None:
        return event.get(key)
    value = values.get(key)
    return json.loads(value) if isinstance(value, str) else value


#: What one buffered call costs beyond its texts: the event dict, datetimes, ids (an estimate).
EVENT_OVERHEAD_BYTES = 1_024


def event_bytes(event: dict[str, Any]) -> int:
    """The memory an event holds in a buffer, estimated from its texts: the stored JSON of its
    params and response (counted twice: the objects and their text), its error message and
    user agent, plus :data:`EVENT_OVERHEAD_BYTES`.

    The client's events carry their stored JSON (already capped) or a :class:`Deferred`
    payload (its text counted once: it is parsed later); for an event that carries neither
    (one handed to a writer directly), the stored form is made here and kept in the event, so
    the writer does not make it again.
    """
    size = EVENT_OVERHEAD_BYTES
    for key, text_key in _PAYLOAD_KEYS:
        text = event.get(text_key)
        if text is None:
            value = event.get(key)
            if value is None:
                continue
            if isinstance(value, Deferred):
                size += value.size
                continue
            config = get_config()
            cap = config.max_params_bytes if key == "params" else config.max_response_bytes
            event[key], text = stored_json_and_text(value, cap)
            event[text_key] = text
        size += 2 * len(text)
    error_message, user_agent = event.get("error_message"), event.get("user_agent")
    if isinstance(error_message, str):
        size += len(error_message)
    if isinstance(user_agent, str):
        size += len(user_agent)
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
        rows = []
        for n, event in enumerate(events, 1):
            rows.append(event_row_values(event, for_copy=True))
            if n % _ROWS_PER_YIELD == 0:
                _yield_the_gil()
        with transaction.atomic(using=queryset.db):
            unset_missing_users(queryset, rows)
            written = _copy_rows(queryset, connection, rows)
            queue_alerts(queryset.db, events)
            return written
    with transaction.atomic(using=queryset.db):
        written = _bulk_create_rows(queryset, [event_row_values(event) for event in events])
        queue_alerts(queryset.db, events)
        return written


def write_rows(
    queryset: RPCLogQuerySet,
    rows: Sequence[dict[str, Any]],
    slow: Mapping[str, SlowVerdict] | None = None,
) -> int:
    """Write stored rows (:func:`event_row_values` with ``for_copy``) in one transaction, and
    queue the alerts of the finished calls among them in it (``slow``: the verdicts of the slow
    calls, by row id; see :func:`row_alert_events`).

    What the ingest worker writes: the rows arrive already made safe to store, so only the
    write is left. Idempotent like :func:`bulk_record_events`, alerts included; a row whose
    ``status`` is ``pending`` never overwrites an existing row; a row whose user was deleted is
    written with the user unset (``rows`` are changed so). At most one row per ``id``.
    """
    connection = connections[queryset.db]

    def queue_row_alerts() -> None:
        if get_config().webhooks:
            queue_alerts(queryset.db, row_alert_events(queryset, rows, slow or {}))

    if connection.vendor == "mysql":  # MySQL and MariaDB
        from django_rpc_audit.writers import mysql

        return mysql.write_rows(queryset, connection, rows, queue_row_alerts)
    with transaction.atomic(using=queryset.db):
        if connection.vendor == "postgresql" and _copy_supported(connection):
            unset_missing_users(queryset, rows)
            written = _copy_rows(queryset, connection, rows)
        else:
            model = queryset.model
            written = _bulk_create_rows(queryset, [_model_values(model, row) for row in rows])
        queue_row_alerts()
        return written


_ALERTING_STATUSES = frozenset({RPCStatus.FAILED.value, RPCStatus.TIMEOUT.value})


def row_alert_events(
    queryset: RPCLogQuerySet,
    rows: Sequence[Mapping[str, Any]],
    slow: Mapping[str, SlowVerdict],
) -> list[dict[str, Any]]:
    """The ``rpc_finished`` arguments the outbox needs
    (:func:`~django_rpc_audit.alerts.outbox.enqueue_alerts`) of the stored rows that raise an
    alert: failed and timed-out calls, and the slow ones (``slow``: verdicts by row id).

    Made from the stored values, which are those the other writers' events carry (the client
    stores and redacts before it sends ``rpc_finished``): JSON parsed back, an empty error
    code or message ``None`` again, the users loaded in one query, ``log_id`` the row's id.
    """
    alerting = [
        row
        for row in rows
        if row.get("status") in _ALERTING_STATUSES or (slow and row["id"] in slow)
    ]
    if not alerting:
        return []
    user_field = queryset.model._meta.get_field("user")
    user_ids = {row["user_id"] for row in alerting if row.get("user_id") is not None}
    users: dict[Any, Any] = {}
    if user_ids:
        manager = user_field.related_model._base_manager.db_manager(queryset.db)
        users = manager.in_bulk(user_ids, field_name=user_field.target_field.attname)
    events = []
    for row in alerting:
        response = row.get("response")
        events.append(
            {
                "log_id": uuid.UUID(hex=row["id"]),
                "correlation_id": row["correlation_id"],
                "method": row["method"],
                "params": json.loads(row["params"]),
                "response": None if response is None else json.loads(response),
                "user": users.get(row.get("user_id")),
                "started_at": row["created_at"],
                "completed_at": row["completed_at"],
                "status": row["status"],
                "error_code": row.get("error_code") or None,
                "error_message": row.get("error_message") or None,
                "duration_ms": row.get("duration_ms"),
                "slow": slow.get(row["id"]),
            }
        )
    return events


def _model_values(model: type[RPCLog], row: Mapping[str, Any]) -> dict[str, Any]:
    """A stored row (``COPY``'s forms) as model field values: JSON parsed, the id a UUID."""
    values = dict(row)
    values["id"] = uuid.UUID(hex=values["id"])
    for name in _json_attnames(model):
        if isinstance(values.get(name), str):
            values[name] = json.loads(values[name])
    return values


@functools.cache
def _json_attnames(model: type[RPCLog]) -> tuple[str, ...]:
    return tuple(f.attname for f in model._meta.concrete_fields if isinstance(f, models.JSONField))


def _bulk_create_rows(queryset: RPCLogQuerySet, values: Sequence[dict[str, Any]]) -> int:
    """The other databases' path: ``bulk_create`` with conflict handling, in one transaction."""
    model = queryset.model
    finished: list[RPCLog] = []
    pending: list[RPCLog] = []
    with transaction.atomic(using=queryset.db):
        unset_missing_users(queryset, values)
        for row in values:
            is_pending = row.get("status", _PENDING) == _PENDING
            (pending if is_pending else finished).append(model(**row))
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


def unset_missing_users(queryset: RPCLogQuerySet, rows: Sequence[dict[str, Any]]) -> None:
    """Unset the user of the stored ``rows`` whose user is no longer in the database: one
    query per batch, in its transaction. Such a row is written with the user unset (and its
    username snapshot), never refused for its dangling key."""
    live = _existing_user_pks(
        queryset, {row["user_id"] for row in rows if row.get("user_id") is not None}
    )
    for row in rows:
        if row.get("user_id") is not None and row["user_id"] not in live:
            row["user_id"] = None


def queue_alerts(using: str, events: Sequence[Mapping[str, Any]]) -> None:
    """Put the alerts (webhooks) of the finished calls among ``events`` in the outbox, in the
    transaction writing their rows: see :mod:`django_rpc_audit.alerts.outbox`."""
    from django_rpc_audit.alerts.outbox import enqueue_alerts

    enqueue_alerts(using, events)


_PENDING = RPCStatus.PENDING.value


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


#: Session-local staging table of the PostgreSQL path, emptied at each commit. The version
#: changes with its columns: a pooler in session mode can hand a server session (and the temporary
#: table an older release made in it) to another client.
_STAGING_TABLE = "django_rpc_audit_incoming_v3"


def _copy_supported(connection: Any) -> bool:
    """psycopg 3 (``COPY`` from Python rows); psycopg2 takes the ``bulk_create`` path."""
    from django.db.backends.postgresql.psycopg_any import is_psycopg3

    return bool(is_psycopg3)


#: Column types ``COPY``'s binary format sends as they are; every other column travels as text
#: and is cast by the server (``jsonb``, ``inet``, ``uuid``, the user's key).
_BINARY_TYPES = {
    "double precision": "float8",
    "timestamp with time zone": "timestamptz",
    "timestamp": "timestamp",
}


@dataclass(frozen=True, slots=True)
class _CopyPlan:
    """The SQL and per-column conversions of the PostgreSQL path, made once per model."""

    #: ``(attname, default)`` of each column, in ``COPY``'s order.
    columns: tuple[tuple[str, Any], ...]
    #: Positions of the text columns whose value may not be ``str`` yet (the user's key).
    stringify: tuple[int, ...]
    types: tuple[str, ...]
    create_staging: str
    copy: str
    upsert_finished: str
    insert_pending: str
    empty_staging: str


def _copy_plan(model: type[RPCLog], connection: Any) -> _CopyPlan:
    key = (model, connection.alias, connection.settings_dict.get("NAME"))
    plan = _copy_plans.get(key)
    if plan is None:
        plan = _copy_plans[key] = _make_copy_plan(model, connection)
    return plan


_copy_plans: dict[tuple[Any, ...], _CopyPlan] = {}


def _make_copy_plan(model: type[RPCLog], connection: Any) -> _CopyPlan:
    quote = connection.ops.quote_name
    fields = list(model._meta.concrete_fields)
    # The JSON texts are TOASTed in the staging table too before the upsert copies them:
    # compressed with LZ4 there as in the log table (migration 0010), not the default pglz.
    payload_compression = " COMPRESSION lz4" if lz4_available(connection) else ""
    defaults = []
    types = []
    staged = []
    selected = []
    stringify = []
    text_fields = (
        models.CharField,
        models.TextField,
        models.JSONField,
        models.GenericIPAddressField,
    )
    for position, f in enumerate(fields):
        default = f.get_default()
        if isinstance(f, models.JSONField) and default is not None:
            # JSON columns are copied as JSON text (the server parses it), not adapted objects.
            default = json.dumps(default)
        defaults.append(default)
        db_type = f.db_type(connection) or "text"
        binary = _BINARY_TYPES.get(db_type)
        types.append(binary or "text")
        if not binary and not isinstance(f, text_fields):
            stringify.append(position)
        column = quote(f.column)
        compression = payload_compression if isinstance(f, models.JSONField) else ""
        staged.append(f"{column} {binary or 'text'}{compression}")
        if binary or db_type == "text" or db_type.startswith("varchar"):
            selected.append(column)
        else:
            selected.append(f"CAST({column} AS {db_type})")
    table = quote(model._meta.db_table)
    staging = quote(_STAGING_TABLE)
    columns = ", ".join(quote(f.column) for f in fields)
    updates = ", ".join(
        f"{quote(f.column)} = EXCLUDED.{quote(f.column)}" for f in fields if not f.primary_key
    )
    # Identifiers come from the model, quoted; values are bound or copied, never formatted.
    select = (
        f"INSERT INTO {table} ({columns}) SELECT {', '.join(selected)} "  # noqa: S608
        f"FROM {staging} WHERE {quote('status')} "
    )
    return _CopyPlan(
        columns=tuple(zip((f.attname for f in fields), defaults, strict=True)),
        stringify=tuple(stringify),
        types=tuple(types),
        create_staging=(
            f"CREATE TEMPORARY TABLE IF NOT EXISTS {staging} ({', '.join(staged)}) "
            "ON COMMIT DELETE ROWS"
        ),
        copy=f"COPY {staging} ({columns}) FROM STDIN (FORMAT BINARY)",
        upsert_finished=f"{select}<> %s ON CONFLICT (id) DO UPDATE SET {updates}",
        insert_pending=f"{select}= %s ON CONFLICT (id) DO NOTHING",
        empty_staging=f"DELETE FROM {staging}",  # noqa: S608
    )


def copy_values(plan: _CopyPlan, row: Mapping[str, Any]) -> list[Any]:
    """One stored row as the values binary ``COPY`` sends, in the plan's column order."""
    get = row.get
    values = [get(name, default) for name, default in plan.columns]
    for position in plan.stringify:
        value = values[position]
        if value is not None and not isinstance(value, str):
            values[position] = str(value)
    return values


def _copy_rows(queryset: RPCLogQuerySet, connection: Any, rows: Sequence[Mapping[str, Any]]) -> int:
    """The PostgreSQL path: binary ``COPY`` into a staging table, then one upsert of the
    finished rows and one insert of the pending ones, both idempotent.

    ``COPY`` costs a fraction of an ``INSERT`` with thousands of bound parameters, and its
    binary format spares formatting every value as text; the server casts the text columns
    (JSON, addresses, ids) once per row in the upsert. Runs inside the caller's transaction.
    """
    plan = _copy_plan(queryset.model, connection)
    pending = 0
    with connection.cursor() as cursor:
        cursor.execute(plan.create_staging)
        # psycopg's own COPY, past Django's cursor wrapper: wrap its errors the way Django
        # wraps every other query's, so that a cancelled COPY or a dropped connection is an
        # OperationalError (an outage, retried) and not a bare psycopg exception.
        with connection.wrap_database_errors, cursor.cursor.copy(plan.copy) as copy:
            copy.set_types(plan.types)
            for row in rows:
                copy.write_row(copy_values(plan, row))
                pending += row.get("status", _PENDING) == _PENDING
        if pending < len(rows):
            cursor.execute(plan.upsert_finished, [_PENDING])
        if pending:
            cursor.execute(plan.insert_pending, [_PENDING])
        if connection.savepoint_ids:
            # Inside a longer transaction (a test's, a flush within an atomic block): empty it
            # now. Otherwise the commit right after empties it (ON COMMIT DELETE ROWS), which
            # costs nothing per row.
            cursor.execute(plan.empty_staging)
    return len(rows)
