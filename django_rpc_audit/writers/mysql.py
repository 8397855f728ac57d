"""The sink's batch writes on MySQL and MariaDB: multi-row upserts through mysqlclient.

:func:`~django_rpc_audit.writers.sink.bulk_record_events` (events) and
:func:`~django_rpc_audit.writers.sink.write_rows` (stored rows, the ingest worker's) hand a
batch here when the database is MySQL or MariaDB. Django's ``bulk_create`` cannot do it there: with
``unique_fields`` it raises ``NotSupportedError``, and ``ignore_conflicts`` becomes
``INSERT IGNORE``, which turns a refused row (a value the column refuses) into a warning
and drops it silently. Instead, one ``executemany`` per kind of row, which
mysqlclient sends as multi-row statements of at most 64 KiB each:

- finished calls: ``REPLACE INTO``, the whole row in its final state whether or not its
  ``pending`` row was written before (the same row PostgreSQL's ``ON CONFLICT DO UPDATE`` of
  every column gives, without MySQL 8's deprecated ``VALUES()`` or MariaDB's lack of row
  aliases);
- pending calls: ``INSERT ... ON DUPLICATE KEY UPDATE id = id``, which changes nothing when
  the row exists, so a late pending write never turns a finished row back to ``pending``,
  and still raises on any other error.

Both are idempotent, so a batch retried after a lost commit reply writes no duplicates.

mysqlclient reports many refused rows (an unknown value, a string the column's character
set cannot hold, a row over ``max_allowed_packet``) as ``OperationalError``, the class that
also means "the server is unreachable". :func:`refused_by_server` tells them apart, so that
the buffered writer gives up on such a row instead of retrying it for ever.
"""

from __future__ import annotations

import json
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, cast

from django.db import DataError, OperationalError, models, transaction

from django_rpc_audit.status import RPCStatus
from django_rpc_audit.writers.sink import (
    _ROWS_PER_YIELD,
    _yield_the_gil,
    event_row_values,
    queue_alerts,
    unset_missing_users,
)

if TYPE_CHECKING:
    from django.db.backends.base.base import BaseDatabaseWrapper

    from django_rpc_audit.querysets import RPCLogQuerySet

_PENDING = RPCStatus.PENDING.value

#: Server errors that mean "try again later", not "this row is refused": the connection or
#: the server went away, is busy or read-only for now, or the transaction lost a lock race.
#: Client errors (2000-2999: no connection, lost connection, ...) are always transient.
TRANSIENT_SERVER_ERRORS = frozenset(
    {
        1021,  # ER_DISK_FULL
        1037,  # ER_OUTOFMEMORY
        1038,  # ER_OUT_OF_SORTMEMORY
        1040,  # ER_CON_COUNT_ERROR: too many connections
        1041,  # ER_OUT_OF_RESOURCES
        1042,  # ER_BAD_HOST_ERROR
        1043,  # ER_HANDSHAKE_ERROR
        1044,  # ER_DBACCESS_DENIED_ERROR
        1045,  # ER_ACCESS_DENIED_ERROR
        1049,  # ER_BAD_DB_ERROR: the database is not there (yet)
        1053,  # ER_SERVER_SHUTDOWN
        1077,  # ER_NORMAL_SHUTDOWN
        1078,  # ER_GOT_SIGNAL
        1079,  # ER_SHUTDOWN_COMPLETE
        1080,  # ER_FORCING_CLOSE
        1081,  # ER_IPSOCK_ERROR
        1114,  # ER_RECORD_FILE_FULL: the table is full
        1129,  # ER_HOST_IS_BLOCKED
        1130,  # ER_HOST_NOT_PRIVILEGED
        1135,  # ER_CANT_CREATE_THREAD
        1152,  # ER_ABORTING_CONNECTION
        1158,  # ER_NET_READ_ERROR
        1159,  # ER_NET_READ_INTERRUPTED
        1160,  # ER_NET_ERROR_ON_WRITE
        1161,  # ER_NET_WRITE_INTERRUPTED
        1205,  # ER_LOCK_WAIT_TIMEOUT
        1213,  # ER_LOCK_DEADLOCK
        1290,  # ER_OPTION_PREVENTS_STATEMENT: --read-only (a failover in progress)
        1317,  # ER_QUERY_INTERRUPTED
        1836,  # ER_READ_ONLY_MODE
        1927,  # ER_CONNECTION_KILLED (MariaDB)
        1969,  # ER_STATEMENT_TIMEOUT (MariaDB max_statement_time)
        3024,  # ER_QUERY_TIMEOUT (MySQL max_execution_time)
        4031,  # ER_CLIENT_INTERACTION_TIMEOUT (MySQL 8.0.24+)
    }
)


def refused_by_server(exc: OperationalError) -> bool:
    """True if MySQL or MariaDB refused the statement itself (its data), false if the error
    says the server cannot be used right now (retrying later may succeed).

    mysqlclient's error carries the server's error number first; an error without one is
    taken as transient, so nothing is given up on a guess.
    """
    code = exc.args[0] if exc.args else None
    if not isinstance(code, int) or isinstance(code, bool):
        return False
    if 2000 <= code < 3000:  # CR_*: the client lost or could not make the connection
        return False
    return code not in TRANSIENT_SERVER_ERRORS


def bulk_record_events(
    queryset: RPCLogQuerySet,
    connection: BaseDatabaseWrapper,
    events: Sequence[Mapping[str, Any]],
) -> int:
    """The MySQL / MariaDB path of :func:`~django_rpc_audit.writers.sink.bulk_record_events`:
    write the rows of ``events`` in one transaction and return their count.

    The finished calls' alerts go to the outbox in the same transaction.

    :raises DataError: the server refused a row (see :func:`refused_by_server`); the batch
        is rolled back, and the buffered writer retries its rows one by one.
    :raises OperationalError: the server cannot be used now; the batch is rolled back.
    """
    rows = (event_row_values(event, for_copy=True) for event in events)
    return write_rows(queryset, connection, rows, lambda: queue_alerts(queryset.db, events))


def write_rows(
    queryset: RPCLogQuerySet,
    connection: BaseDatabaseWrapper,
    rows: Iterable[dict[str, Any]],
    in_transaction: Callable[[], object] | None = None,
) -> int:
    """Write stored rows (:func:`~django_rpc_audit.writers.sink.event_row_values` with
    ``for_copy``; a lazy iterable is only consumed once connected) in one transaction and
    return their count: finished ones with ``REPLACE``, pending ones unless their row exists.
    ``in_transaction`` runs in that transaction after the rows (the outbox's alerts).

    :raises DataError: the server refused a row (see :func:`refused_by_server`).
    :raises OperationalError: the server cannot be used now; nothing is written.
    """
    model = queryset.model
    fields = list(model._meta.concrete_fields)
    quote = connection.ops.quote_name
    # A concrete field always has a column (django-stubs types it as optional).
    columns = ", ".join(quote(cast("str", f.column)) for f in fields)
    placeholders = ", ".join(["%s"] * len(fields))
    table = quote(model._meta.db_table)
    pk = quote(cast("str", model._meta.pk.column))
    row_of = _row_maker(fields, connection)
    finished: list[list[Any]] = []
    pending: list[list[Any]] = []
    # Identifiers come from the model, quoted; every value is bound.
    values = f"INTO {table} ({columns}) VALUES ({placeholders})"
    try:
        # Connected first: while the server is unreachable a retry fails at once, without
        # building its rows again (CPU and garbage, hence collector pauses, for the callers).
        with transaction.atomic(using=queryset.db), connection.cursor() as cursor:
            stored = list(rows)
            unset_missing_users(queryset, stored)
            for n, row in enumerate(stored, 1):
                is_pending = row.get("status", _PENDING) == _PENDING
                (pending if is_pending else finished).append(row_of(row))
                if n % _ROWS_PER_YIELD == 0:
                    _yield_the_gil()
            _refuse_oversized_rows(
                connection.connection, cursor, [*finished, *pending], len(values) + 2 * len(pk) + 64
            )
            if finished:
                cursor.executemany(f"REPLACE {values}", finished)
            if pending:
                cursor.executemany(f"INSERT {values} ON DUPLICATE KEY UPDATE {pk} = {pk}", pending)
            if in_transaction is not None:
                in_transaction()
    except OperationalError as exc:
        if refused_by_server(exc):
            raise DataError(*exc.args) from exc
        raise
    return len(finished) + len(pending)


#: ``max_allowed_packet`` of each open connection (it is read once per connection).
_packet_limits: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()


def _refuse_oversized_rows(
    raw: Any, cursor: Any, rows: Sequence[Sequence[Any]], overhead: int
) -> None:
    """Raise :class:`DataError` if a row would not fit in one statement of at most the
    server's ``max_allowed_packet`` bytes (``raw``: the driver's connection).

    Such a row must not be sent: the server refuses it and drops the connection, and when the
    row is several times the limit, the client only sees the connection lost (error 2006),
    which reads as "unreachable", so the writer would retry it for ever and write nothing
    else. Each value takes at most four bytes per character once escaped, so only rows whose
    text is a quarter of the limit are measured exactly.
    """
    limit = _packet_limits.get(raw)
    if limit is None:
        cursor.execute("SELECT @@max_allowed_packet")
        limit = _packet_limits[raw] = int(cursor.fetchone()[0])
    for row in rows:
        rough = sum(4 * len(value) + 3 for value in row if isinstance(value, str))
        if rough + 32 * len(row) + overhead <= limit:
            continue
        exact = sum(len(raw.literal(value)) + 2 for value in row) + overhead
        if exact > limit:
            raise DataError(
                f"An RPC log row of {exact} bytes does not fit in max_allowed_packet "
                f"({limit} bytes): raise it, or lower DJANGO_CFG_RPC's MAX_*_BYTES caps."
            )


def _row_maker(
    fields: Sequence[models.Field[Any, Any]], connection: BaseDatabaseWrapper
) -> Callable[[Mapping[str, Any]], list[Any]]:
    """A function from a stored row (:func:`~django_rpc_audit.writers.sink.event_row_values`
    with ``for_copy``) to its values in the order of ``fields``, as the driver takes them: JSON
    columns as the sink's compact JSON text, the others as :func:`_prep_for` says (datetimes
    naive in the connection's time zone, ...)."""
    defaults: dict[str, Any] = {}
    preps: list[tuple[str, Callable[[Any], Any] | None]] = []
    for field in fields:
        default = field.get_default()
        if isinstance(field, models.JSONField):
            defaults[field.attname] = None if default is None else json.dumps(default)
            preps.append((field.attname, None))  # the sink's JSON text, as it is
        else:
            defaults[field.attname] = default
            preps.append((field.attname, _prep_for(field, connection)))

    def row_of(values: Mapping[str, Any]) -> list[Any]:
        row = []
        for name, prep in preps:
            value = values.get(name, defaults[name])
            row.append(value if prep is None or value is None else prep(value))
        return row

    return row_of


#: Columns whose value from the sink (``for_copy``) is already what the driver takes: text,
#: numbers, canonical IP text, and the id as 32 hex digits (what Django stores in a char(32)
#: column, and what MariaDB's uuid type accepts).
_AS_THEY_ARE = (
    models.CharField,
    models.TextField,
    models.FloatField,
    models.GenericIPAddressField,
    models.UUIDField,
)


def _prep_for(
    field: models.Field[Any, Any], connection: BaseDatabaseWrapper
) -> Callable[[Any], Any] | None:
    """How a column's value goes to the driver: ``None`` for as it is. Django's
    ``get_db_prep_save`` does it for any field but costs about 5 µs a column, most of the
    row's cost: the log table's own columns take shortcuts, checked against the ORM's rows
    by ``tests/test_fast_paths.py``."""
    if isinstance(field, _AS_THEY_ARE):
        return None
    if isinstance(field, models.ForeignKey) and isinstance(field.target_field, models.IntegerField):
        return None  # an integer user id
    if isinstance(field, models.DateTimeField):
        # Django's adapt_datetimefield_value(): naive, in the connection's time zone (an
        # aware value only comes with USE_TZ, which gives the connection a time zone).
        zone = connection.timezone

        def naive(value: datetime) -> datetime:
            return value.astimezone(zone).replace(tzinfo=None) if value.tzinfo else value

        return naive

    def prep(value: Any) -> Any:
        return field.get_db_prep_save(value, connection)

    return prep
