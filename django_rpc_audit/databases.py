"""The databases that can hold the log table, and what each needs from its server.

The facts behind the database system checks (registered in ``django_rpc_audit.checks``):
a database django-rpc-audit cannot write to must stop ``migrate`` with an error, never leave
a site with an empty table. PostgreSQL, MySQL / MariaDB (Django's backend with mysqlclient)
and SQLite are supported; see ``docs/databases.md``.

- :func:`backend_problems` (no connection needed): the vendor, and on MySQL the backend and
  the driver.
- :func:`server_problems` (asks the server; MySQL and MariaDB only): the version, the
  character set of the log table, the time zone tables, ``max_allowed_packet``.
- :func:`set_payload_compression` and :func:`payload_compression` (PostgreSQL): LZ4 for the
  payload columns, set by migration ``0010_payload_lz4_compression``.
"""

from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.core.checks import CheckMessage, Error, Warning
from django.core.exceptions import ImproperlyConfigured
from django.db import DatabaseError, connections, router

from django_rpc_audit.conf import SETTING_NAME, get_config

if TYPE_CHECKING:
    from django.db.backends.base.base import BaseDatabaseWrapper

#: The vendors whose SQL the writers and analytics speak (``connection.vendor``).
SUPPORTED_VENDORS = {"postgresql": "PostgreSQL", "mysql": "MySQL / MariaDB", "sqlite": "SQLite"}
#: Oldest MariaDB supported: window functions (percentiles) and Django 5.2's floor.
MINIMUM_MARIADB = (10, 5)
#: Oldest MySQL supported: window functions (percentiles) and Django 5.2's floor.
MINIMUM_MYSQL = (8, 0, 11)

_DOCS = "See docs/databases.md in django-rpc-audit."


def log_aliases() -> list[str]:
    """The database aliases the log table is written to and read from (the routers' choice)."""
    from django_rpc_audit.models import RPCLog

    aliases = [router.db_for_write(RPCLog), router.db_for_read(RPCLog)]
    return list(dict.fromkeys(alias or "default" for alias in aliases))


# -- without a connection ---------------------------------------------------------------------


def backend_problems(alias: str) -> list[CheckMessage]:
    """E101: a database vendor django-rpc-audit does not support; E102: on MySQL, a backend
    other than Django's or a driver other than mysqlclient."""
    try:
        connection = connections[alias]
        vendor = connection.vendor
    except ImproperlyConfigured as exc:
        return [_unsupported(alias, f"its backend cannot be loaded: {exc}")]
    if vendor not in SUPPORTED_VENDORS:
        engine = connection.settings_dict.get("ENGINE")
        return [_unsupported(alias, f"{engine!r} (vendor {vendor!r}) is not one of them")]
    if vendor != "mysql":
        return []
    try:
        from django.db.backends.mysql import base as mysql_backend
    except ImproperlyConfigured as exc:  # mysqlclient is not installed
        return [_mysql_driver_error(alias, str(exc))]
    if not isinstance(connection, mysql_backend.DatabaseWrapper):
        backend = type(connection).__module__
        return [_mysql_driver_error(alias, f"its backend is {backend!r}, not Django's")]
    # The module Django's backend imported as MySQLdb (django-stubs does not declare it).
    driver = mysql_backend.Database  # type: ignore[attr-defined]
    return mysql_driver_problems(alias, driver)


def mysql_driver_problems(alias: str, driver: ModuleType) -> list[CheckMessage]:
    """E102 unless ``driver`` (what Django's MySQL backend imported as ``MySQLdb``) is
    mysqlclient: PyMySQL can stand in for it (``install_as_MySQLdb()``), untested here."""
    name = getattr(driver, "__name__", repr(driver))
    if name != "MySQLdb":
        return [_mysql_driver_error(alias, f"its driver is {name!r}")]
    return []


def _unsupported(alias: str, reason: str) -> Error:
    supported = ", ".join(SUPPORTED_VENDORS.values())
    return Error(
        f"The RPC log table's database {alias!r} is not supported ({supported}): {reason}. "
        "Its rows would not be written.",
        hint=f"Route django_rpc_audit to a supported database. {_DOCS}",
        id="django_rpc_audit.E101",
    )


def _mysql_driver_error(alias: str, reason: str) -> Error:
    return Error(
        f"The RPC log table's database {alias!r} is MySQL / MariaDB, which django-rpc-audit "
        f"supports through Django's own backend and mysqlclient only: {reason}.",
        hint=(
            "Use ENGINE 'django.db.backends.mysql' and install mysqlclient "
            f"(pip install 'django-rpc-audit[mysql]'). {_DOCS}"
        ),
        id="django_rpc_audit.E102",
    )


# -- asking the server ------------------------------------------------------------------------


def server_problems(alias: str) -> list[CheckMessage]:
    """E103-E105 and W101 for a MySQL or MariaDB database (nothing for other vendors, nor
    when the server cannot be reached: connecting is not this check's business)."""
    connection = connections[alias]
    if connection.vendor != "mysql":
        return []
    try:
        server: Any = connection  # Django's MySQL wrapper (backend_problems checked it)
        problems = version_problems(alias, server.mysql_is_mariadb, server.mysql_version)
        if problems:
            return problems  # the other answers would not mean much
        problems += charset_problems(alias, connection)
        if settings.USE_TZ and connection.timezone_name != settings.TIME_ZONE:
            problems += time_zone_problems(alias, connection, settings.TIME_ZONE)
        problems += packet_problems(alias, connection)
    except DatabaseError:
        return []
    return problems


def version_problems(alias: str, is_mariadb: bool, version: tuple[int, ...]) -> list[CheckMessage]:
    """E103: a MariaDB older than :data:`MINIMUM_MARIADB` or MySQL older than
    :data:`MINIMUM_MYSQL`."""
    name, minimum = ("MariaDB", MINIMUM_MARIADB) if is_mariadb else ("MySQL", MINIMUM_MYSQL)
    if tuple(version) >= minimum:
        return []
    found, needed = ".".join(map(str, version)), ".".join(map(str, minimum))
    return [
        Error(
            f"The RPC log table's database {alias!r} is {name} {found}; django-rpc-audit needs "
            f"{name} {needed} or newer (window functions, JSON columns).",
            hint=_DOCS,
            id="django_rpc_audit.E103",
        )
    ]


def charset_problems(alias: str, connection: BaseDatabaseWrapper) -> list[CheckMessage]:
    """E104: the log table's text columns, or the connection, cannot hold every character
    (MySQL's old 3-byte ``utf8``): a row with an emoji in it would be refused."""
    from django_rpc_audit.models import RPCLog

    table = RPCLog._meta.db_table
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT COLUMN_NAME, CHARACTER_SET_NAME FROM information_schema.COLUMNS "
            "WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = %s",
            [table],
        )
        columns = cursor.fetchall()
        cursor.execute("SELECT @@character_set_database, @@character_set_connection")
        database_charset, connection_charset = cursor.fetchone()
    parts = []
    if columns:
        narrow = [name for name, charset in columns if charset not in (None, "utf8mb4")]
        if narrow:
            parts.append(f"the columns {', '.join(narrow)} of {table}")
    elif database_charset != "utf8mb4":  # not migrated yet: the table will take this one
        parts.append(f"the database (character set {database_charset}) that will hold {table}")
    if connection_charset != "utf8mb4":
        parts.append(f"the connection (character set {connection_charset})")
    if not parts:
        return []
    where = " and ".join(parts)
    return [
        Error(
            f"In database {alias!r}, {where} cannot hold 4-byte UTF-8 characters (emoji, "
            "many CJK characters): RPC log rows holding one would be refused.",
            hint=(
                f"ALTER TABLE {table} CONVERT TO CHARACTER SET utf8mb4 (or create the database "
                "with CHARACTER SET utf8mb4), and leave OPTIONS 'charset' at Django's utf8mb4."
            ),
            id="django_rpc_audit.E104",
        )
    ]


def time_zone_problems(
    alias: str, connection: BaseDatabaseWrapper, tzname: str
) -> list[CheckMessage]:
    """E105: the server cannot convert to ``tzname`` (its time zone tables are empty), so
    ``Trunc`` and ``__date`` lookups give ``NULL``: an empty dashboard timeline and admin date
    hierarchy in that time zone."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT CONVERT_TZ('2000-01-01 00:00:00', %s, %s)", [connection.timezone_name, tzname]
        )
        (converted,) = cursor.fetchone()
    if converted is not None:
        return []
    return [
        Error(
            f"The MySQL / MariaDB server of database {alias!r} cannot convert times to the time "
            f"zone {tzname!r}: its time zone tables are not loaded, so the dashboard's timeline "
            "and the admin's date hierarchy would be empty.",
            hint=(
                "Load them: mariadb-tzinfo-to-sql /usr/share/zoneinfo | mariadb -u root mysql "
                f"(mysql_tzinfo_to_sql on MySQL). {_DOCS}"
            ),
            id="django_rpc_audit.E105",
        )
    ]


#: Bytes of a row besides its capped columns (method, ids, numbers, dates, SQL), escaped.
_ROW_OVERHEAD = 4 * (255 + 64 + 100 + 39) + 4_096


def largest_row_bytes() -> int:
    """The most bytes one log row can take in an ``INSERT`` with the configured caps:
    escaping can double the capped UTF-8 text."""
    config = get_config()
    caps = (
        config.max_params_bytes
        + config.max_response_bytes
        + config.max_error_message_bytes
        + config.max_user_agent_bytes
    )
    return 2 * caps + _ROW_OVERHEAD


def packet_problems(alias: str, connection: BaseDatabaseWrapper) -> list[CheckMessage]:
    """W101: ``max_allowed_packet`` is below :func:`largest_row_bytes`."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT @@max_allowed_packet")
        (limit,) = cursor.fetchone()
    largest = largest_row_bytes()
    if largest <= int(limit):
        return []
    return [
        Warning(
            f"max_allowed_packet of database {alias!r} ({limit} bytes) is below the largest RPC "
            f"log row the {SETTING_NAME} MAX_*_BYTES caps allow ({largest} bytes): such rows "
            "are refused and counted as failed.",
            hint="Raise max_allowed_packet on the server or lower the caps.",
            id="django_rpc_audit.W101",
        )
    ]


# -- PostgreSQL: how the payload columns are compressed -----------------------------------------

#: The log table's columns whose values PostgreSQL compresses (TOAST) when they are large.
PAYLOAD_FIELDS = ("params", "response")


def lz4_available(connection: BaseDatabaseWrapper) -> bool:
    """Can this PostgreSQL server compress column values with LZ4 (built ``--with-lz4``, as the
    Debian, Ubuntu, Docker and cloud builds are)? The allowed values of the
    ``default_toast_compression`` setting say."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT %s = ANY(enumvals) FROM pg_settings WHERE name = 'default_toast_compression'",
            ["lz4"],
        )
        row = cursor.fetchone()
    return bool(row and row[0])


def set_payload_compression(
    connection: BaseDatabaseWrapper, table: str, columns: tuple[str, ...], method: str
) -> bool:
    """``ALTER COLUMN ... SET COMPRESSION method`` for ``columns`` of ``table`` on PostgreSQL
    (``method``: ``"lz4"``, ``"pglz"`` or ``"default"``, the server's
    ``default_toast_compression``). Only new values take it; stored ones keep theirs.

    Does nothing and returns ``False`` on the other databases, and for LZ4 on a server built
    without it. A change of the catalog alone: the lock it takes lasts no longer than that.
    """
    if connection.vendor != "postgresql" or (method == "lz4" and not lz4_available(connection)):
        return False
    quote = connection.ops.quote_name
    changes = ", ".join(
        f"ALTER COLUMN {quote(column)} SET COMPRESSION {method}" for column in columns
    )
    with connection.cursor() as cursor:
        cursor.execute(f"ALTER TABLE {quote(table)} {changes}")
    return True


def payload_compression(connection: BaseDatabaseWrapper, table: str) -> dict[str, str]:
    """How PostgreSQL compresses the columns of ``table`` that it may compress: column name to
    ``"lz4"``, ``"pglz"``, or ``""`` (the server's ``default_toast_compression``)."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT attname, attcompression FROM pg_attribute"
            " WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped"
            " AND attstorage IN ('x', 'm')",
            [connection.ops.quote_name(table)],
        )
        methods = {"l": "lz4", "p": "pglz"}
        return {name: methods.get(code, "") for name, code in cursor.fetchall()}
