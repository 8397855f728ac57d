"""The database system checks: a database that cannot hold the log table stops ``migrate``."""

from __future__ import annotations

import types
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from django.core.management import call_command
from django.core.management.base import SystemCheckError
from django.db import connection, connections

from django_rpc_audit import checks, get_rpc_client
from django_rpc_audit.databases import (
    PAYLOAD_FIELDS,
    backend_problems,
    charset_problems,
    largest_row_bytes,
    lz4_available,
    mysql_driver_problems,
    packet_problems,
    payload_compression,
    set_payload_compression,
    time_zone_problems,
    version_problems,
)
from django_rpc_audit.models import RPCLog
from django_rpc_audit.writers import BufferedLogWriter
from django_rpc_audit.writers.sink import _STAGING_TABLE
from tests.conftest import unavailable

on_mysql = pytest.mark.skipif(connection.vendor != "mysql", reason="MySQL / MariaDB's server")
on_postgresql = pytest.mark.skipif(connection.vendor != "postgresql", reason="PostgreSQL's TOAST")


def ids(messages: list[Any]) -> list[str]:
    return [message.id for message in messages]


@pytest.mark.django_db
def test_the_test_database_passes_every_database_check() -> None:
    assert checks.check_database_backend() == []
    assert checks.check_database_server(databases=["default"]) == []
    call_command("check", "--database", "default", "--fail-level", "WARNING")


def test_the_server_is_only_asked_when_the_checks_are_given_databases() -> None:
    assert checks.check_database_server() == []  # no database access in this test


@pytest.fixture
def unsupported_alias() -> Iterator[str]:
    """A database alias whose backend django-rpc-audit has no SQL for (Django's dummy)."""
    alias = "rpc_audit_unsupported"
    connections.settings[alias] = {
        **connections["default"].settings_dict,
        "ENGINE": "django.db.backends.dummy",
    }
    yield alias
    del connections.settings[alias]


def test_an_unsupported_vendor_is_e101(
    unsupported_alias: str, settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    messages = backend_problems(unsupported_alias)
    assert ids(messages) == ["django_rpc_audit.E101"]
    assert "django.db.backends.dummy" in messages[0].msg

    class LogsElsewhere:
        def db_for_write(self, model: Any, **hints: Any) -> str | None:
            return unsupported_alias if model._meta.app_label == "django_rpc_audit" else None

        db_for_read = db_for_write

    monkeypatch.setattr("django.db.router.routers", [LogsElsewhere()])
    assert ids(checks.check_database_backend()) == ["django_rpc_audit.E101"]
    # (Only the checks that need no database: Django 6 would run the server checks too.)
    with pytest.raises(SystemCheckError, match="E101"):
        call_command("check", "--tag", "compatibility")


def test_mysql_needs_mysqlclient_not_a_stand_in() -> None:
    pymysql = types.ModuleType("pymysql")  # what pymysql.install_as_MySQLdb() puts there
    assert ids(mysql_driver_problems("default", pymysql)) == ["django_rpc_audit.E102"]
    assert mysql_driver_problems("default", types.ModuleType("MySQLdb")) == []


@on_mysql
def test_the_real_mysql_backend_and_driver_pass() -> None:
    assert backend_problems("default") == []


@pytest.mark.parametrize(
    ("is_mariadb", "version", "expected"),
    [
        (True, (10, 4, 34), ["django_rpc_audit.E103"]),
        (True, (10, 5, 0), []),
        (True, (11, 8, 2), []),
        (False, (5, 7, 44), ["django_rpc_audit.E103"]),
        (False, (8, 0, 11), []),
        (False, (9, 1, 0), []),
    ],
)
def test_server_versions_below_the_floor_are_e103(
    is_mariadb: bool, version: tuple[int, ...], expected: list[str]
) -> None:
    assert ids(version_problems("default", is_mariadb, version)) == expected


@on_mysql
@pytest.mark.django_db(transaction=True)
def test_a_column_that_cannot_hold_every_character_is_e104(utf8mb3_user_agent: None) -> None:
    messages = charset_problems("default", connection)
    assert ids(messages) == ["django_rpc_audit.E104"]
    assert "user_agent" in messages[0].msg
    assert ids(checks.check_database_server(databases=["default"])) == ["django_rpc_audit.E104"]


@on_mysql
@pytest.mark.django_db
def test_time_zone_tables_the_server_lacks_are_e105() -> None:
    """Asked with a zone no server knows; CI loads the real tables (see .ci/run)."""
    messages = time_zone_problems("default", connection, "Nowhere/Atlantis")
    assert ids(messages) == ["django_rpc_audit.E105"]
    assert "mariadb-tzinfo-to-sql" in messages[0].hint
    if time_zone_problems("default", connection, "Asia/Kolkata"):
        unavailable("MariaDB's time zone tables are not loaded (see .ci/run)")


@on_mysql
@pytest.mark.django_db
def test_time_zones_are_checked_when_the_site_uses_one(settings: Any) -> None:
    settings.TIME_ZONE = "Asia/Kolkata"
    expected = ids(time_zone_problems("default", connection, "Asia/Kolkata"))
    assert ids(checks.check_database_server(databases=["default"])) == expected


@on_mysql
@pytest.mark.django_db
def test_a_packet_smaller_than_the_largest_row_is_w101(
    rpc_settings: Callable[..., Any],
) -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT @@max_allowed_packet")
        (limit,) = cursor.fetchone()
    assert largest_row_bytes() < limit  # the default caps fit MariaDB's default 16 MiB
    assert packet_problems("default", connection) == []
    rpc_settings(MAX_RESPONSE_BYTES=limit // 2)
    messages = packet_problems("default", connection)
    assert ids(messages) == ["django_rpc_audit.W101"]
    assert "MAX_*_BYTES" in messages[0].msg


# -- PostgreSQL: LZ4 for the payload columns (migration 0010) ---------------------------------

TABLE = RPCLog._meta.db_table


@on_postgresql
@pytest.mark.django_db
def test_migrations_leave_the_payload_columns_compressed_with_lz4() -> None:
    if not lz4_available(connection):
        unavailable("this PostgreSQL server was built without LZ4")
    methods = payload_compression(connection, TABLE)
    assert {name: methods[name] for name in PAYLOAD_FIELDS} == {"params": "lz4", "response": "lz4"}
    # Only the payloads: the other compressible columns keep the server's default.
    assert methods["error_message"] == methods["user_agent"] == ""


@on_postgresql
@pytest.mark.django_db(transaction=True)
def test_migration_0010_goes_back_to_the_default_and_forward_to_lz4() -> None:
    """The migration's own SQL, both ways (it does not use the helpers of ``databases.py``)."""
    if not lz4_available(connection):
        unavailable("this PostgreSQL server was built without LZ4")
    try:
        call_command("migrate", "django_rpc_audit", "0009", verbosity=0)
        methods = payload_compression(connection, TABLE)
        assert {methods[name] for name in PAYLOAD_FIELDS} == {""}
    finally:
        call_command("migrate", "django_rpc_audit", verbosity=0)
    methods = payload_compression(connection, TABLE)
    assert {name: methods[name] for name in PAYLOAD_FIELDS} == {"params": "lz4", "response": "lz4"}


@on_postgresql
@pytest.mark.django_db
def test_a_large_payload_is_stored_compressed_with_lz4(
    echo_handler: None, rpc_log_writer: BufferedLogWriter
) -> None:
    if not lz4_available(connection):
        unavailable("this PostgreSQL server was built without LZ4")
    document = " ".join(["the quick brown fox jumps over the lazy dog"] * 300)  # 13 KB
    get_rpc_client().call("test.echo", {"body": document})
    assert rpc_log_writer.flush() is True
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT pg_column_compression(params), pg_column_compression(response) FROM {TABLE}"
        )
        assert cursor.fetchall() == [("lz4", "lz4")]
    # The writer's staging table (this session's: the flush ran on the test's connection)
    # holds the same texts before the upsert, compressed the same way.
    staged = payload_compression(connection, _STAGING_TABLE)
    assert {name: staged[name] for name in PAYLOAD_FIELDS} == {"params": "lz4", "response": "lz4"}
    log = RPCLog.objects.get()
    assert log.params == {"body": document}
    assert log.response == {"echo": {"body": document}}


@on_postgresql
@pytest.mark.django_db
def test_the_compression_can_be_set_back_to_the_servers_default() -> None:
    if not lz4_available(connection):
        unavailable("this PostgreSQL server was built without LZ4")
    assert set_payload_compression(connection, TABLE, PAYLOAD_FIELDS, "default") is True
    assert {payload_compression(connection, TABLE)[name] for name in PAYLOAD_FIELDS} == {""}
    assert set_payload_compression(connection, TABLE, PAYLOAD_FIELDS, "lz4") is True
    assert {payload_compression(connection, TABLE)[name] for name in PAYLOAD_FIELDS} == {"lz4"}


@pytest.mark.skipif(connection.vendor == "postgresql", reason="the other databases")
@pytest.mark.django_db
def test_other_databases_have_no_column_compression_to_set() -> None:
    assert set_payload_compression(connection, TABLE, PAYLOAD_FIELDS, "lz4") is False
