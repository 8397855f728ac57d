"""The sink's MySQL / MariaDB path (``writers/mysql.py``), against the real MariaDB.

Which server errors refuse a row and which mean "retry later" is checked with errors the real
server raises; the batch tests write through the buffered writer as a site does.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Callable
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.db import DatabaseError, OperationalError, connection, transaction

from django_rpc_audit.models import RPCLog
from django_rpc_audit.writers import BufferedLogWriter
from django_rpc_audit.writers.mysql import refused_by_server
from django_rpc_audit.writers.sink import bulk_record_events
from tests.test_writers_buffered import finished_event, started_event

pytestmark = pytest.mark.skipif(
    connection.vendor != "mysql", reason="the MySQL / MariaDB path of the sink"
)
# mysqlclient, which only the MariaDB run installs for sure (the ``mysql`` extra).
MySQLdb = pytest.importorskip("MySQLdb")


def raw_connection() -> Any:
    settings = connection.settings_dict
    return MySQLdb.connect(
        host=settings["HOST"] or "127.0.0.1",
        port=int(settings["PORT"] or 3306),
        user=settings["USER"],
        password=settings["PASSWORD"],
    )


def server_error(run: Callable[[], object]) -> OperationalError:
    """The error ``run`` raises, as Django raises it."""
    with pytest.raises(MySQLdb.OperationalError) as caught:
        run()
    return OperationalError(*caught.value.args)


# -- which errors refuse a row ------------------------------------------------------------------


def test_a_statement_the_server_refuses_is_a_refused_row() -> None:
    raw = raw_connection()
    try:
        error = server_error(lambda: raw.cursor().execute("SELECT no_such_column FROM DUAL"))
        assert error.args[0] == 1054
        assert refused_by_server(error)
    finally:
        raw.close()


def test_a_lost_or_refused_connection_is_not_a_refused_row() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    refused = server_error(lambda: MySQLdb.connect(host="127.0.0.1", port=port))
    assert 2000 <= refused.args[0] < 3000  # a client error: CR_CONN_HOST_ERROR, ...
    assert not refused_by_server(refused)

    victim, killer = raw_connection(), raw_connection()
    try:
        cursor = victim.cursor()
        cursor.execute("SELECT CONNECTION_ID()")
        killer.cursor().execute(f"KILL CONNECTION {int(cursor.fetchone()[0])}")
        lost = server_error(lambda: victim.cursor().execute("SELECT 1"))
        assert lost.args[0] in (2006, 2013, 4031, 1927)
        assert not refused_by_server(lost)
    finally:
        killer.close()
        with contextlib.suppress(MySQLdb.Error):
            victim.close()


@pytest.mark.parametrize(
    ("code", "refused"),
    [(1205, False), (1213, False), (1040, False), (1366, True), (1153, True), (4025, True)],
)
def test_transient_server_errors_are_not_refusals(code: int, refused: bool) -> None:
    """Lock timeouts, deadlocks and a full server are retried; data errors are given up."""
    assert refused_by_server(OperationalError(code, "...")) is refused


def test_an_error_without_a_number_is_retried() -> None:
    assert not refused_by_server(OperationalError("no number"))


# -- batches ------------------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_a_pending_row_the_database_refuses_raises_instead_of_being_skipped(
    utf8mb3_user_agent: None,
) -> None:
    """``INSERT IGNORE`` (Django's ``ignore_conflicts`` here) would drop this row silently.
    (A dangling user used to be the refused value here: such a row is now kept, with the user
    unset; see test_a_deleted_users_row_is_kept_with_the_user_unset.)"""
    with pytest.raises(DatabaseError), transaction.atomic():
        bulk_record_events(RPCLog.objects.all(), [started_event(user_agent="bot \U0001f916")])
    assert not RPCLog.objects.exists()


@pytest.mark.django_db
def test_a_deleted_users_row_is_kept_with_the_user_unset() -> None:
    """The MySQL path checks the users like the others: a dangling key is unset, the row and
    its username snapshot kept (a foreign key error would lose the row)."""
    ghost = get_user_model()(pk=987_654, username="ghost")  # never saved: a dangling key
    with transaction.atomic():
        bulk_record_events(RPCLog.objects.all(), [started_event(user=ghost)])
    assert list(RPCLog.objects.values_list("user_id", "username")) == [(None, "ghost")]


@pytest.mark.django_db
def test_a_batch_bigger_than_one_statement_is_written_whole() -> None:
    """mysqlclient splits a batch into statements of at most 64 KiB: none is lost."""
    starts = [started_event(params={"blob": "é" * 2_000, "n": n}) for n in range(300)]
    events = [finished_event(e) if n % 3 else e for n, e in enumerate(starts)]
    assert bulk_record_events(RPCLog.objects.all(), events) == 300
    assert RPCLog.objects.count() == 300
    assert RPCLog.objects.filter(status="pending").count() == 100
    assert sorted(RPCLog.objects.values_list("params__n", flat=True)) == list(range(300))
    # Written again with every pending call finished: no duplicates, nothing pending.
    bulk_record_events(RPCLog.objects.all(), [finished_event(e) for e in starts])
    assert RPCLog.objects.count() == 300
    assert not RPCLog.objects.filter(status="pending").exists()


def assert_only_the_second_is_written(
    refused: dict[str, Any], kept: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    """Both calls through an inline buffered writer: the first row is given up (logged,
    counted as failed, never retried), the second written."""
    writer = BufferedLogWriter(background=False)
    writer.finished(finished_event(refused))
    writer.finished(finished_event(kept))
    with caplog.at_level(logging.ERROR, logger="django_rpc_audit.writers"):
        assert writer.flush() is True
    written = list(RPCLog.objects.values_list("correlation_id", flat=True))
    assert written == [kept["correlation_id"]]
    assert (writer.stats().failed, writer.stats().retries) == (1, 0)


@pytest.fixture
def packet_limit() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT @@max_allowed_packet")
        return int(cursor.fetchone()[0])


@pytest.mark.django_db
def test_a_row_over_max_allowed_packet_is_refused_before_it_is_sent(
    rpc_settings: Callable[..., Any], packet_limit: int, caplog: pytest.LogCaptureFixture
) -> None:
    """Sent, a row just over the limit is refused (error 1153), but one several times it
    only breaks the connection (2006, "unreachable"): it would be retried for ever and hold
    back every other row. Such rows are refused before they are sent."""
    rpc_settings(MAX_PARAMS_BYTES=4 * packet_limit, BUFFER_MAX_BYTES=64 * packet_limit)
    big = started_event(params={"x": "y" * (packet_limit + 1000)})
    assert_only_the_second_is_written(big, started_event(), caplog)
    assert "does not fit in max_allowed_packet" in caplog.text  # not the server's 1153


@pytest.mark.django_db(transaction=True)
def test_a_character_the_column_cannot_hold_refuses_that_row_only(
    utf8mb3_user_agent: None, caplog: pytest.LogCaptureFixture
) -> None:
    """MySQL reports it as an ``OperationalError`` (1366), the class of a lost connection: it
    is told apart, so the writer gives the row up instead of retrying it for ever."""
    emoji = started_event(user_agent="bot \U0001f916")
    assert_only_the_second_is_written(emoji, started_event(), caplog)
    assert "Incorrect string value" in caplog.text
