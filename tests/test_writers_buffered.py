"""The buffered writer: one write per call, bounded memory, outside the caller's transaction.

Tests marked ``inline`` use the writer without its thread (``flush()`` writes on the test's
connection) and run on every database. Tests of the background thread need a database other
threads can write to while the test holds its own connection: they run on PostgreSQL and
MariaDB (SQLite's shared in-memory test database locks tables across threads); the process
tests in ``test_writers_process.py`` run the thread on a SQLite file too.
"""

from __future__ import annotations

import contextlib
import logging
import re
import statistics
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.conf import settings as django_settings
from django.contrib.auth import get_user_model
from django.core.exceptions import ImproperlyConfigured
from django.db import connection, connections
from django.db.backends.base.base import BaseDatabaseWrapper
from django.test import Client
from django.test.utils import CaptureQueriesContext

from django_rpc_audit import get_rpc_client
from django_rpc_audit.conf import DjangoCfgRPCConfig, get_config
from django_rpc_audit.exceptions import RPCRemoteError
from django_rpc_audit.models import RPCLog
from django_rpc_audit.signals import loop_safe, rpc_finished
from django_rpc_audit.testing import capture_rpc_logs
from django_rpc_audit.writers import (
    BufferedLogWriter,
    SyncLogWriter,
    WriterStats,
    flush,
    get_writer,
    use_writer,
    writer_never_blocks,
    writer_stats,
)
from django_rpc_audit.writers.sink import call_log_id
from tests.calls import calls_for
from tests.factories import UserFactory
from tests.tcp_proxy import TCPProxy
from tests.views import ViewFailed

on_server_database = pytest.mark.skipif(
    "sqlite" in django_settings.DATABASES["default"]["ENGINE"],
    reason="the writer thread needs a server database (SQLite: see test_writers_process.py)",
)
on_postgres = pytest.mark.skipif(
    "postgresql" not in django_settings.DATABASES["default"]["ENGINE"],
    reason="PostgreSQL's own COPY path and server functions",
)


def started_event(**overrides: Any) -> dict[str, Any]:
    event: dict[str, Any] = {
        "correlation_id": str(uuid.uuid4()),
        "method": "test.echo",
        "params": {"n": 1},
        "user": None,
        "caller_ip": "10.0.0.1",
        "user_agent": "pytest",
        "started_at": datetime.now(UTC),
    }
    return {**event, **overrides}


def finished_event(
    started: dict[str, Any], status: str = "success", **extra: Any
) -> dict[str, Any]:
    failed = status != "success"
    return {
        **started,
        "status": status,
        "response": None if failed else {"ok": True},
        "error_code": status if failed else None,
        "error_message": f"it {status}" if failed else None,
        "duration_ms": 1.5,
        "completed_at": datetime.now(UTC),
        **extra,
    }


def key(event: dict[str, Any]) -> tuple[str, datetime]:
    return (event["correlation_id"], event["started_at"])


# -- settings and selection ----------------------------------------------------------------


def test_buffered_is_the_default_write_mode() -> None:
    assert DjangoCfgRPCConfig().write_mode == "buffered"


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("WRITE_MODE", "async"),
        ("BUFFER_SIZE", 0),
        ("BUFFER_SIZE", True),
        ("BUFFER_BATCH_SIZE", "100"),
        ("BUFFER_FLUSH_INTERVAL", 0),
        ("BUFFER_MAX_RETRY_DELAY", -1),
        ("BUFFER_SHUTDOWN_TIMEOUT", None),
        # Beyond what a thread can wait for: the writer thread would die of an OverflowError.
        ("BUFFER_FLUSH_INTERVAL", float("inf")),
        ("BUFFER_MAX_RETRY_DELAY", 1e12),
        ("BUFFER_SHUTDOWN_TIMEOUT", float("nan")),
    ],
)
def test_invalid_buffer_settings_name_the_key(key: str, value: Any) -> None:
    with pytest.raises(ImproperlyConfigured, match=key):
        DjangoCfgRPCConfig.from_mapping({key: value})


def test_environment_sets_the_write_mode_and_buffer(rpc_env: Callable[[str, str], None]) -> None:
    rpc_env("WRITE_MODE", "buffered")
    rpc_env("BUFFER_SIZE", "500")
    rpc_env("BUFFER_FLUSH_INTERVAL", "0.25")
    config = get_config()
    assert (config.write_mode, config.buffer_size, config.buffer_flush_interval) == (
        "buffered",
        500,
        0.25,
    )


def test_write_mode_selects_the_writer(rpc_settings: Callable[..., Any]) -> None:
    rpc_settings(WRITE_MODE="sync")
    assert isinstance(get_writer(), SyncLogWriter)
    rpc_settings(WRITE_MODE="buffered", BUFFER_SIZE=1234)
    writer = get_writer()
    assert isinstance(writer, BufferedLogWriter)
    assert writer.buffer_size == 1234
    rpc_settings(BUFFER_SIZE=1234, RPC_TIMEOUT=7)  # other keys changed: the same writer
    assert get_writer() is writer
    rpc_settings(BUFFER_SIZE=99)  # its own settings changed: a new writer
    assert get_writer() is not writer
    assert get_writer().buffer_size == 99  # type: ignore[attr-defined]


@pytest.mark.django_db
def test_flush_and_stats_are_no_ops_with_the_sync_writer(echo_handler: None) -> None:
    get_rpc_client().call("test.echo", {"n": 1})
    assert flush() is True
    assert writer_stats().written == 0
    assert RPCLog.objects.get().status == "success"


# -- one write per call (inline: no thread, the test's connection) -------------------------


@pytest.mark.django_db
def test_a_call_finished_before_the_flush_is_inserted_once_in_its_final_state(
    echo_handler: None, rpc_log_writer: BufferedLogWriter
) -> None:
    get_rpc_client().call("test.echo", {"who": "ada"})
    assert not RPCLog.objects.exists()  # buffered, not written
    with CaptureQueriesContext(connection) as queries:
        assert rpc_log_writer.flush() is True
    # Django logs an executemany() (the MySQL path) as "<n> times: <statement>".
    statements = [re.sub(r"^\d+ times: ", "", q["sql"]) for q in queries]
    writes = [sql for sql in statements if sql.startswith(("INSERT", "REPLACE", "UPDATE"))]
    assert len(writes) == 1
    assert writes[0].startswith(("INSERT", "REPLACE"))  # MySQL's REPLACE: an insert of the row
    log = RPCLog.objects.get()
    assert (log.status, log.params) == ("success", {"who": "ada"})
    assert log.response == {"echo": {"who": "ada"}}
    assert rpc_log_writer.stats().written == 1
    assert rpc_log_writer.stats().buffered == 0


@pytest.mark.django_db
def test_a_call_in_flight_at_flush_time_is_pending_then_completed(
    local_handler: Callable[[str, Any], None], rpc_log_writer: BufferedLogWriter
) -> None:
    seen: list[str] = []

    def slow(params: dict[str, Any]) -> dict[str, Any]:
        rpc_log_writer.flush()  # a flush while the call is still running
        seen.append(RPCLog.objects.get().status)
        return {"done": True}

    local_handler("test.slow", slow)
    get_rpc_client().call("test.slow")
    assert seen == ["pending"]
    rpc_log_writer.flush()
    log = RPCLog.objects.get()
    assert (log.status, log.response) == ("success", {"done": True})
    assert log.completed_at is not None
    assert rpc_log_writer.stats().written == 2


@pytest.mark.django_db
def test_rows_match_the_sync_writers_rows(echo_handler: None, local_handler: Any) -> None:
    """The same call logged by either writer gives the same row, column for column."""

    def refuse(params: dict[str, Any]) -> dict[str, Any]:
        raise RPCRemoteError("nope", "refused \x00 here")

    local_handler("test.refuse", refuse)
    user = UserFactory()
    rows = {}
    for mode in ("sync", "buffered"):
        buffered = BufferedLogWriter(background=False)
        with use_writer(SyncLogWriter() if mode == "sync" else buffered):
            ids = []
            for method in ("test.echo", "test.refuse"):
                cid = str(uuid.uuid4())
                with contextlib.suppress(RPCRemoteError):
                    get_rpc_client().call(
                        method, {"d": "x"}, user=user, caller_ip="::1", correlation_id=cid
                    )
                ids.append(cid)
        assert buffered.flush()
        rows[mode] = [
            RPCLog.objects.filter(correlation_id=cid)
            .values(
                "method",
                "params",
                "response",
                "status",
                "error_code",
                "error_message",
                "user_id",
                "caller_ip",
                "user_agent",
            )
            .get()
            for cid in ids
        ]
    assert rows["sync"] == rows["buffered"]
    # PostgreSQL refuses NUL in text; the sanitizer stores U+FFFD in its place, in both writers.
    assert rows["buffered"][1]["error_message"] == "refused \ufffd here"


@pytest.mark.django_db
def test_a_retried_batch_writes_no_duplicates_and_keeps_the_final_state(
    rpc_log_writer: BufferedLogWriter,
) -> None:
    """Writes are idempotent: a batch written twice (lost commit reply) changes nothing."""
    from django_rpc_audit.writers.sink import bulk_record_events

    started = started_event()
    finished = finished_event(started, "timeout")
    other = started_event()
    bulk_record_events(RPCLog.objects.all(), [finished, other])
    bulk_record_events(RPCLog.objects.all(), [finished, other])
    bulk_record_events(RPCLog.objects.all(), [started])  # a late pending write
    assert RPCLog.objects.count() == 2
    assert RPCLog.objects.get(correlation_id=started["correlation_id"]).status == "timeout"
    assert RPCLog.objects.get(correlation_id=other["correlation_id"]).status == "pending"


@pytest.mark.django_db
def test_events_with_unknown_keys_are_written(rpc_log_writer: BufferedLogWriter) -> None:
    """Events may carry keys the writer does not know (a newer client's): they are ignored."""
    started = started_event(trace_id="abc")
    rpc_log_writer.started(started)
    rpc_log_writer.finished(finished_event(started, sample_rate=0.5))
    assert rpc_log_writer.flush()
    assert RPCLog.objects.get(pk=call_log_id(started["correlation_id"], started["started_at"]))


@pytest.mark.django_db(transaction=True)
@pytest.mark.asyncio
async def test_acall_only_enqueues(echo_handler: None) -> None:
    """On the async path the receivers buffer the events; no row is written until a flush."""
    with capture_rpc_logs() as writer:
        await get_rpc_client().acall("test.echo", {"n": 1})
        assert writer.stats().buffered == 1
        assert await RPCLog.objects.acount() == 0
        assert await sync_to_async(writer.flush)()
        assert await RPCLog.objects.filter(status="success").acount() == 1


@pytest.mark.django_db(transaction=True)
@pytest.mark.asyncio
async def test_acall_calls_the_builtin_receivers_on_the_event_loop(
    echo_handler: None, caplog: pytest.LogCaptureFixture
) -> None:
    """No thread hop for receivers that only enqueue; other sync receivers still get one."""
    threads: dict[str, list[int]] = {"writer": [], "plain": [], "marked": []}

    def plain(sender: type, **kwargs: Any) -> None:
        threads["plain"].append(threading.get_ident())

    @loop_safe()
    def marked(sender: type, **kwargs: Any) -> None:
        threads["marked"].append(threading.get_ident())
        raise RuntimeError("a broken loop-safe receiver")

    rpc_finished.connect(plain, dispatch_uid="tests.plain")
    rpc_finished.connect(marked, dispatch_uid="tests.marked")
    try:
        with capture_rpc_logs() as writer:
            put = writer._put

            def spy(event: dict[str, Any]) -> None:
                threads["writer"].append(threading.get_ident())
                put(event)

            writer._put = spy  # type: ignore[method-assign]
            result = await get_rpc_client().acall("test.echo", {"n": 1})
    finally:
        rpc_finished.disconnect(dispatch_uid="tests.plain")
        rpc_finished.disconnect(dispatch_uid="tests.marked")
    loop_thread = threading.get_ident()
    assert result == {"echo": {"n": 1}}
    assert threads["writer"] == [loop_thread, loop_thread]  # started and finished
    assert threads["marked"] == [loop_thread]
    assert threads["plain"] != [loop_thread]
    assert len(threads["plain"]) == 1
    assert "a broken loop-safe receiver" in caplog.text


@pytest.mark.django_db(transaction=True)
@pytest.mark.asyncio
async def test_acall_with_the_sync_writer_writes_off_the_event_loop(
    echo_handler: None, rpc_settings: Callable[..., Any]
) -> None:
    rpc_settings(WRITE_MODE="sync")
    assert not writer_never_blocks()
    await get_rpc_client().acall("test.echo", {"n": 1})
    assert await RPCLog.objects.filter(status="success").acount() == 1


# -- bounded memory ------------------------------------------------------------------------


def test_a_full_buffer_drops_successes_first_and_keeps_failures(
    caplog: pytest.LogCaptureFixture,
) -> None:
    writer = BufferedLogWriter(buffer_size=3, batch_size=3, background=False)
    successes = [started_event() for _ in range(3)]
    for event in successes:
        writer.started(event)
        writer.finished(finished_event(event))
    assert writer.stats().buffered == 3
    # Full: a started event is not buffered (nothing lost: its finished event makes the row),
    late = started_event()
    writer.started(late)
    assert writer.stats() == WriterStats(buffered=3)
    # a successful call is dropped,
    writer.finished(finished_event(late))
    assert writer.stats().dropped == 1
    # and a failure or a timeout takes the place of the oldest success.
    failures = [finished_event(started_event(), status) for status in ("failed", "timeout")]
    for event in failures:
        writer.finished(event)
    assert writer.stats().dropped == 3
    assert list(writer._buffer) == [key(successes[2]), *(key(event) for event in failures)]
    # A failure replaces the last success; then, with no success left, a failure is dropped.
    writer.finished(finished_event(started_event(), "failed"))
    writer.finished(finished_event(started_event(), "failed"))
    assert writer.stats().dropped == 5
    assert [e[1]["status"] for e in writer._buffer.values()] == ["failed", "timeout", "failed"]
    with caplog.at_level(logging.WARNING, logger="django_rpc_audit.writers"):
        writer._report_drops()
    assert "dropped 5 call(s), 5 in all" in caplog.text


def test_a_flood_of_rate_limited_calls_never_pushes_failures_out() -> None:
    """Refused calls are as expendable as successes: a caller hammering a limit cannot evict
    the failures from a full buffer."""
    writer = BufferedLogWriter(buffer_size=3, batch_size=3, background=False)
    failure = finished_event(started_event(), "failed")
    writer.finished(failure)
    refused = [finished_event(started_event(), "rate_limited") for _ in range(2)]
    for event in refused:
        writer.finished(event)
    for _ in range(50):
        writer.finished(finished_event(started_event(), "rate_limited"))
    assert writer.stats().dropped == 50
    assert list(writer._buffer) == [key(failure), *(key(event) for event in refused)]
    # A timeout takes the place of the oldest refused call.
    timeout = finished_event(started_event(), "timeout")
    writer.finished(timeout)
    assert list(writer._buffer) == [key(failure), key(refused[1]), key(timeout)]


def test_a_full_buffer_never_blocks_the_caller() -> None:
    writer = BufferedLogWriter(buffer_size=100, batch_size=10, background=False)
    clock = time.perf_counter()
    for _ in range(20_000):
        event = started_event()
        writer.started(event)
        writer.finished(finished_event(event))
    elapsed = time.perf_counter() - clock
    assert writer.stats().buffered == 100
    assert writer.stats().dropped == 19_900
    assert elapsed < 5  # 40,000 events; about 1 µs each when nothing is written


# -- the test helpers ----------------------------------------------------------------------


def test_the_fixture_is_registered_by_the_pytest_plugin(request: pytest.FixtureRequest) -> None:
    writer = request.getfixturevalue("rpc_log_writer")
    assert isinstance(writer, BufferedLogWriter)
    assert writer.background is False
    assert get_writer() is writer


def test_capture_restores_the_configured_writer(rpc_settings: Callable[..., Any]) -> None:
    rpc_settings(WRITE_MODE="sync")
    with capture_rpc_logs() as writer:
        assert get_writer() is writer
    assert isinstance(get_writer(), SyncLogWriter)


# -- the background thread (PostgreSQL, MariaDB) ------------------------------------------


@pytest.fixture
def background_writer() -> Iterator[Callable[..., BufferedLogWriter]]:
    """Build a threaded writer and make it the process's; it is closed afterwards."""
    made: list[BufferedLogWriter] = []
    stack: list[Any] = []

    def make(**options: Any) -> BufferedLogWriter:
        writer = BufferedLogWriter(**{"flush_interval": 0.05, **options})
        made.append(writer)
        context = use_writer(writer)
        context.__enter__()
        stack.append(context)
        return writer

    yield make
    for context in reversed(stack):
        context.__exit__(None, None, None)
    for writer in made:
        assert writer.close(timeout=30)


@on_server_database
@pytest.mark.django_db(transaction=True)
def test_the_thread_writes_without_a_flush(
    echo_handler: None, background_writer: Callable[..., BufferedLogWriter]
) -> None:
    writer = background_writer()
    get_rpc_client().call("test.echo", {"n": 1})
    deadline = time.monotonic() + 10
    while not RPCLog.objects.filter(status="success").exists():
        assert time.monotonic() < deadline, "the writer thread wrote nothing in 10 s"
        time.sleep(0.02)
    assert writer._thread is not None
    assert writer._thread is not threading.current_thread()


@on_server_database
@pytest.mark.django_db(transaction=True)
def test_concurrent_callers_lose_nothing(
    echo_handler: None, background_writer: Callable[..., BufferedLogWriter]
) -> None:
    writer = background_writer(batch_size=100)
    errors: list[BaseException] = []

    def caller(who: int) -> None:
        try:
            for n in range(300):
                get_rpc_client().call("test.echo", {"who": who, "n": n})
        except BaseException as exc:  # pragma: no cover  (reported below)
            errors.append(exc)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=caller, args=(who,)) for who in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert writer.flush(timeout=30)
    assert RPCLog.objects.filter(status="success").count() == 1800
    assert writer.stats().dropped == 0


@on_server_database
@pytest.mark.django_db(transaction=True)
def test_a_row_the_database_refuses_does_not_hold_back_the_others(
    echo_handler: None,
    background_writer: Callable[..., BufferedLogWriter],
    caplog: pytest.LogCaptureFixture,
) -> None:
    writer = background_writer(flush_interval=3600)
    get_rpc_client().call("test.echo", {"n": 0})
    # A value the column cannot take (events of custom senders are not checked). A user that
    # does not exist used to serve here: such rows are now kept, with the user unset.
    writer.finished(finished_event(started_event(params={"n": 1}), duration_ms="fast"))
    get_rpc_client().call("test.echo", {"n": 2})
    with caplog.at_level(logging.ERROR, logger="django_rpc_audit.writers"):
        assert writer.flush(timeout=30)
    assert sorted(RPCLog.objects.values_list("params__n", flat=True)) == [0, 2]
    assert writer.stats().failed == 1
    assert "The database refused the RPC log row of test.echo" in caplog.text


@on_server_database
@pytest.mark.django_db(transaction=True)
def test_a_pending_row_the_database_refuses_is_counted_not_dropped_silently(
    background_writer: Callable[..., BufferedLogWriter], caplog: pytest.LogCaptureFixture
) -> None:
    """A call still running at write time whose row is refused: logged and counted, never
    skipped without a word (as MySQL's ``INSERT IGNORE`` would)."""
    writer = background_writer(flush_interval=3600)
    # A key the user column cannot hold. (A dangling key of a user that does not exist used to
    # serve here: such rows are now kept, with the user unset.)
    bad_key = get_user_model()(pk="not-a-number", username="ghost")
    writer.started(started_event(user=bad_key))
    kept = started_event()
    writer.started(kept)
    with caplog.at_level(logging.ERROR, logger="django_rpc_audit.writers"):
        assert writer.flush(timeout=30)
    assert list(RPCLog.objects.values_list("correlation_id", flat=True)) == [kept["correlation_id"]]
    assert writer.stats().failed == 1
    assert "The database refused the RPC log row of test.echo" in caplog.text


@on_server_database
@pytest.mark.django_db(transaction=True)
def test_an_unexpected_error_does_not_end_the_writer_thread(
    echo_handler: None,
    background_writer: Callable[..., BufferedLogWriter],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A project's database router that raises once (or any bug) must not kill the thread:
    the calls after it would wait in the buffer until the process ends, or be lost with it."""
    from django.db import router

    real = router.db_for_write
    raised: list[bool] = []

    def flaky_router(model: Any, **hints: Any) -> str:
        if not raised:
            raised.append(True)
            raise RuntimeError("router down")
        return real(model, **hints)

    monkeypatch.setattr(router, "db_for_write", flaky_router)
    writer = background_writer(max_retry_delay=0.2)
    with caplog.at_level(logging.ERROR, logger="django_rpc_audit.writers"):
        get_rpc_client().call("test.echo", {"n": 1})
        deadline = time.monotonic() + 30
        while not RPCLog.objects.filter(status="success").exists():  # no flush(): the thread
            assert time.monotonic() < deadline, "the writer thread stopped writing"
            time.sleep(0.02)
    assert raised
    assert writer._thread is not None
    assert writer._thread.is_alive()
    assert "router down" in caplog.text


@on_server_database
@pytest.mark.django_db(transaction=True)
def test_rows_survive_an_atomic_request_that_fails(
    echo_handler: None,
    background_writer: Callable[..., BufferedLogWriter],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``ATOMIC_REQUESTS = True`` and a view that raises after its call: the row stays."""
    monkeypatch.setitem(connection.settings_dict, "ATOMIC_REQUESTS", True)
    writer = background_writer()
    with pytest.raises(ViewFailed):
        Client(raise_request_exception=True).get("/sync/raises/")
    assert writer.flush(timeout=30)
    log = RPCLog.objects.get()
    assert (log.method, log.status, log.params) == ("test.echo", "success", {"who": "raiser"})


@on_server_database
@pytest.mark.django_db(transaction=True)
def test_the_sync_writer_loses_the_row_with_the_atomic_request(
    echo_handler: None, rpc_settings: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The contrast that makes the test above meaningful."""
    monkeypatch.setitem(connection.settings_dict, "ATOMIC_REQUESTS", True)
    rpc_settings(WRITE_MODE="sync")
    with pytest.raises(ViewFailed):
        Client(raise_request_exception=True).get("/sync/raises/")
    assert not RPCLog.objects.exists()


# -- a 30 s database outage (through a proxy the test controls) -----------------------------

OUTAGE_SECONDS = 30.0


PROXIED = "rpc_audit_proxied"


@pytest.fixture(scope="module")
def proxied_database(django_db_setup: None) -> Iterator[TCPProxy]:
    """A database alias ``rpc_audit_proxied``: the test database, through a :class:`TCPProxy`.

    Module-scoped so that the alias exists before the test's ``django_db`` setup, which then
    lets other threads connect through it (``databases="__all__"``).
    """
    settings_dict = connections["default"].settings_dict
    vendor = connections["default"].vendor
    port = settings_dict["PORT"] or {"postgresql": 5432, "mysql": 3306}[vendor]
    proxy = TCPProxy(settings_dict["HOST"] or "127.0.0.1", int(port))
    proxy.start()
    connections.settings[PROXIED] = {
        **settings_dict,
        "HOST": "127.0.0.1",
        "PORT": str(proxy.port),
        "TEST": {**settings_dict.get("TEST", {})},
    }
    yield proxy
    proxy.stop()
    del connections.settings[PROXIED]


@on_server_database
@pytest.mark.django_db(transaction=True, databases="__all__")
def test_a_database_outage_neither_fails_nor_slows_calls_and_loses_nothing(
    proxied_database: TCPProxy,
    echo_handler: None,
    background_writer: Callable[..., BufferedLogWriter],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The database unreachable for 30 s while calls go on: no call fails or waits on the
    database, no row is lost.

    The shared database server is not stopped (other processes use it): the writer reaches
    it through a TCP proxy in this process (``tests/tcp_proxy.py``), on a database alias of
    its own (``rpc_audit_proxied``, same test database). The proxy cuts every open connection
    and closes its listening port for 30 s, so the writer's connection breaks mid-use and
    every reconnect is refused (``ECONNREFUSED``); then it listens again on the same port.
    Calls go through the local transport, one every 2 ms, the whole time. Afterwards: no call
    raised, the calling thread never opened or used a connection to the database (every
    connect attempt and query was the writer thread's), the median latency during the outage
    is within noise of the median before it, the writer retried with backoff, and every call
    has its row in the database.
    """
    proxy, alias = proxied_database, PROXIED
    caller = threading.get_ident()
    callers_database_use: list[str] = []
    ensure_connection = BaseDatabaseWrapper.ensure_connection

    def recording_ensure_connection(wrapper: BaseDatabaseWrapper) -> None:
        # Every connect and every cursor goes through here, on every thread.
        if wrapper.alias == alias and threading.get_ident() == caller:
            callers_database_use.append(wrapper.alias)
        ensure_connection(wrapper)

    monkeypatch.setattr(BaseDatabaseWrapper, "ensure_connection", recording_ensure_connection)
    writer: BufferedLogWriter | None = None
    try:
        writer = background_writer(using=alias, max_retry_delay=2.0, batch_size=500)
        client = get_rpc_client()

        before = calls_for(client, 5, "before")
        assert writer.flush(timeout=30)
        assert RPCLog.objects.filter(params__who="before").count() == len(before)

        with caplog.at_level(logging.WARNING, logger="django_rpc_audit.writers"):
            proxy.cut()
            during = calls_for(client, OUTAGE_SECONDS, "during")
            assert RPCLog.objects.filter(params__who="during").count() == 0
            assert writer.stats().retries >= 3
            proxy.restore()
            assert writer.flush(timeout=60)
        after = calls_for(client, 2, "after")
        assert writer.flush(timeout=30)

        total = len(before) + len(during) + len(after)
        assert RPCLog.objects.filter(status="success").count() == total
        assert RPCLog.objects.filter(params__who="during").count() == len(during)
        assert writer.stats().dropped == 0
        assert "the database is unreachable" in caplog.text
        assert "RPC log rows are being written again" in caplog.text
        median_before, median_during = statistics.median(before), statistics.median(during)
        # Noisy shared machine: generous, but a caller waiting on the database (a connect
        # attempt, a retry) would take milliseconds, two orders of magnitude above this.
        assert median_during < 2 * median_before + 0.000_5, (median_before, median_during)
        # No single call waited on the database either: the calling thread never touched it.
        # (A bound on the slowest call would time the machine's scheduler, not the writer.)
        assert callers_database_use == []
    finally:
        if proxy.is_cut:
            proxy.restore()
        if writer is not None:
            writer.close(timeout=30)  # closes its connection before the alias goes


@pytest.mark.django_db
def test_a_wake_writes_what_was_buffered_not_what_arrives_meanwhile() -> None:
    """The thread writes the calls buffered when it wakes, whole batches of them, then sleeps
    until a full batch or the flush interval: a steady trickle of calls does not keep it
    writing one small transaction after another (which took the callers' CPU and GIL)."""
    writer = BufferedLogWriter(batch_size=10, background=False)
    for _ in range(25):
        writer.finished(finished_event(started_event()))
    writer._write_buffered(close_on_error=False, limit=12)  # 12 buffered at the wake
    assert (RPCLog.objects.count(), writer.stats().buffered) == (20, 5)
    writer._write_buffered(close_on_error=False)  # no limit: a flush or close drains it
    assert (RPCLog.objects.count(), writer.stats().buffered) == (25, 0)


# -- the buffer-full policy: never turn a success into a lost outcome ------------------------


@pytest.mark.django_db
def test_a_full_buffer_never_evicts_the_outcome_of_a_written_pending_row() -> None:
    """Evicting a success whose pending row is already written would leave that row pending,
    and the reaper would record the success as ``timeout / outcome_lost``."""
    writer = BufferedLogWriter(buffer_size=2, batch_size=10, background=False)
    in_flight = started_event()
    writer.started(in_flight)
    assert writer.flush()  # its pending row is in the database
    writer.finished(finished_event(in_flight))  # its outcome, buffered
    quick = started_event()
    writer.finished(finished_event(quick))  # a success with no row yet: the buffer is full
    failure = finished_event(started_event(), "failed")
    writer.finished(failure)  # must take the place of ``quick``, not of ``in_flight``
    assert writer.flush()
    rows = dict(RPCLog.objects.values_list("correlation_id", "status"))
    assert rows == {in_flight["correlation_id"]: "success", failure["correlation_id"]: "failed"}
    assert not RPCLog.objects.stale(timeout=0).exists()
    assert writer.stats().dropped == 1  # ``quick``, counted


@pytest.mark.django_db
def test_a_full_buffer_of_started_events_makes_room_for_a_failure() -> None:
    """A started event can go without loss (its finished event makes the whole row); a new
    failure must not be dropped while one is buffered."""
    writer = BufferedLogWriter(buffer_size=2, batch_size=10, background=False)
    first, second = started_event(), started_event()
    writer.started(first)
    writer.started(second)
    failure = finished_event(started_event(), "timeout")
    writer.finished(failure)
    assert writer.stats().dropped == 0
    assert writer.flush()
    writer.finished(finished_event(first))  # the evicted call finishes: its row is whole
    writer.finished(finished_event(second))
    assert writer.flush()
    rows = dict(RPCLog.objects.values_list("correlation_id", "status"))
    assert rows == {
        first["correlation_id"]: "success",
        second["correlation_id"]: "success",
        failure["correlation_id"]: "timeout",
    }
    assert writer.stats().dropped == 0


@pytest.mark.django_db
def test_the_outcome_of_a_written_pending_row_gets_room_in_a_full_buffer() -> None:
    """The success completing a pending row is not dropped while a started event can go."""
    writer = BufferedLogWriter(buffer_size=2, batch_size=10, background=False)
    in_flight = started_event()
    writer.started(in_flight)
    assert writer.flush()
    writer.started(started_event())
    writer.started(started_event())  # full of started events
    writer.finished(finished_event(in_flight))
    assert writer.flush()
    assert RPCLog.objects.get(correlation_id=in_flight["correlation_id"]).status == "success"
    assert writer.stats().dropped == 0


def test_the_written_pending_bookkeeping_is_bounded() -> None:
    """Calls whose outcome never comes (logging switched off meanwhile, a killed thread) must
    not grow the writer's memory: it remembers at most ``buffer_size`` written pending rows."""
    writer = BufferedLogWriter(buffer_size=10, batch_size=100, background=False)
    for _ in range(50):
        writer._note_pending_written((str(uuid.uuid4()), datetime.now(UTC)))
    assert len(writer._pending_written) == 10


# -- flush() returns True only once the rows are in the database ------------------------------


@on_server_database
@pytest.mark.django_db(transaction=True)
def test_flush_waits_for_a_newer_event_of_a_call_it_was_asked_to_write(
    background_writer: Callable[..., BufferedLogWriter],
) -> None:
    """A call's finished event replaces its started one while ``flush()`` waits: the started
    event was never written, so ``flush()`` must wait for the finished one (the SIGTERM flush
    relies on it)."""
    writer = background_writer(flush_interval=3600)
    started = started_event()
    writer.started(started)
    outcome: dict[str, Any] = {}

    def flush_and_look() -> None:
        try:
            outcome["flushed"] = writer.flush(timeout=1)
            outcome["rows_then"] = RPCLog.objects.count()
        finally:
            connections.close_all()

    with writer._write_lock:  # the thread cannot write while the test holds this
        flusher = threading.Thread(target=flush_and_look)
        flusher.start()
        # flush() has taken its snapshot once it wakes the thread (which then waits for the lock).
        deadline = time.monotonic() + 30
        while not writer._wake.is_set():
            assert time.monotonic() < deadline, "flush() never woke the writer thread"
            time.sleep(0.005)
        writer.finished(finished_event(started))
        flusher.join()
    assert outcome == {"flushed": False, "rows_then": 0}  # nothing written: not "flushed"
    assert writer.flush(timeout=30)
    assert RPCLog.objects.get().status == "success"


# -- a call by a user deleted before its row is written ----------------------------------------


def _deleted_user() -> Any:
    """A user deleted by someone else (another request, process or admin): this instance still
    has its primary key."""
    user = UserFactory(username=f"gone-{uuid.uuid4().hex[:6]}")
    get_user_model().objects.filter(pk=user.pk).delete()
    return user


@pytest.mark.django_db(transaction=True)
def test_the_row_of_a_deleted_user_survives_the_buffered_writer(echo_handler: None) -> None:
    with capture_rpc_logs() as writer:
        alive = UserFactory()
        doomed = UserFactory(username="doomed")
        get_rpc_client().call("test.echo", {"n": 0}, user=alive)
        get_rpc_client().call("test.echo", {"n": 1}, user=doomed)
        get_rpc_client().call("test.echo", {"n": 2})
        get_user_model().objects.filter(pk=doomed.pk).delete()  # before the batch is written
        assert writer.flush()
    rows = {row.params["n"]: row for row in RPCLog.objects.all()}
    assert sorted(rows) == [0, 1, 2]
    assert (rows[1].user_id, rows[1].username, rows[1].status) == (None, "doomed", "success")
    assert (rows[0].user_id, rows[0].username) == (alive.pk, alive.username)
    assert (rows[2].user_id, rows[2].username) == (None, "")
    assert writer.stats().failed == 0


@pytest.mark.django_db(transaction=True)
def test_the_row_of_a_deleted_user_survives_the_sync_writer(echo_handler: None) -> None:
    user = _deleted_user()
    get_rpc_client().call("test.echo", {"n": 1}, user=user)
    row = RPCLog.objects.get()
    assert (row.user_id, row.username, row.status) == (None, user.username, "success")


@pytest.mark.django_db(transaction=True)
def test_a_deleted_user_never_breaks_the_callers_transaction(echo_handler: None) -> None:
    """With the sync writer a row is written inside the caller's transaction, whose commit
    checks the (deferred) foreign key: a dangling user must not fail the caller's commit."""
    from django.db import transaction

    user = _deleted_user()
    with transaction.atomic():
        get_rpc_client().call("test.echo", {"n": 1}, user=user)
    assert RPCLog.objects.get().user_id is None


@pytest.mark.django_db(transaction=True)
def test_manual_logging_keeps_the_row_of_a_deleted_user() -> None:
    from django_rpc_audit import RPCLogger

    user = _deleted_user()
    log = RPCLogger.create_log(str(uuid.uuid4()), "legacy.sync", {}, user=user)
    assert log is not None
    assert RPCLog.objects.get().username == user.username


# -- the database cut or cancelling the COPY: an outage, retried with backoff ------------------


@on_postgres
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("kill", ["pg_cancel_backend", "pg_terminate_backend"])
def test_copy_interrupted_by_the_server_is_retried_as_a_batch(
    background_writer: Callable[..., BufferedLogWriter],
    monkeypatch: pytest.MonkeyPatch,
    kill: str,
) -> None:
    """PostgreSQL cancels the COPY (``QueryCanceled``, as ``statement_timeout`` does) or drops
    the connection while it streams: psycopg raises its own exceptions there, not Django's.
    Either is an outage: the batch is kept and retried with backoff, never written row by row
    nor given up."""
    import psycopg

    from django_rpc_audit.writers import sink

    batches: list[int] = []
    real_bulk = sink.bulk_record_events

    def counting_bulk(queryset: Any, events: Any) -> int:
        batches.append(len(events))
        return real_bulk(queryset, events)

    killed: list[bool] = []
    copied: list[int] = []
    real_copy_values = sink.copy_values

    def kill_once(plan: Any, row: Any) -> Any:
        # Halfway through the first COPY (its rows are sent one by one), the server cancels it
        # or ends the connection.
        copied.append(1)
        if not killed and len(copied) == 20:
            killed.append(True)
            pid = connections[DEFAULT_DB_ALIAS].connection.info.backend_pid
            with psycopg.connect(**_libpq_params(), autocommit=True) as other:
                assert other.execute(f"SELECT {kill}(%s)", [pid]).fetchone() == (True,)
        return real_copy_values(plan, row)

    monkeypatch.setattr("django_rpc_audit.writers.buffered.bulk_record_events", counting_bulk)
    monkeypatch.setattr(sink, "copy_values", kill_once)
    writer = background_writer(flush_interval=3600, max_retry_delay=0.2)
    events = [finished_event(started_event(), "success") for _ in range(40)]
    for event in events:
        writer.finished(event)
    assert writer.flush(timeout=60)
    assert killed
    assert RPCLog.objects.count() == 40
    assert writer.stats().retries == 1
    assert writer.stats().failed == 0
    assert batches == [40, 40]  # the whole batch, twice: never one row at a time


DEFAULT_DB_ALIAS = "default"


def _libpq_params() -> dict[str, Any]:
    settings_dict = connections[DEFAULT_DB_ALIAS].settings_dict
    return {
        "host": settings_dict["HOST"] or "127.0.0.1",
        "port": settings_dict["PORT"] or 5432,
        "user": settings_dict["USER"],
        "password": settings_dict["PASSWORD"] or None,
        "dbname": settings_dict["NAME"],
    }
