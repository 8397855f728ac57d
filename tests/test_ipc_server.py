"""The real django-ipc server as the peer: replies, its error texts, timeouts, concurrency.

The server runs from its own virtualenv (``scripts/ipc_server.py``) on a stream of its own.
Without that interpreter or Redis the tests are skipped (``RPC_AUDIT_STRICT=1``: they fail).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from django.db import connections

from django_rpc_audit import get_rpc_client
from django_rpc_audit.context import rpc_context
from django_rpc_audit.exceptions import RPCRemoteError, RPCTimeoutError
from django_rpc_audit.models import RPCLog
from django_rpc_audit.writers import get_writer
from scripts.ipc_server import IPCServer, ipc_python
from tests.conftest import REDIS_URL, unavailable
from tests.factories import UserFactory

pytestmark = [pytest.mark.redis, pytest.mark.ipc]


def _running_server() -> Iterator[IPCServer]:
    """Start a django-ipc server on a fresh stream; stop it and drop the stream afterwards."""
    if ipc_python() is None:
        unavailable("No interpreter with django-ipc (.venv-ipc or RPC_AUDIT_IPC_PYTHON)")
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1)
    try:
        client.ping()
    except redis.RedisError as exc:
        client.close()
        unavailable(f"Redis is not reachable at {REDIS_URL}: {exc}")
    stream = f"rpc_audit_test:ipc:{uuid.uuid4().hex}:requests"
    server = IPCServer(redis_url=REDIS_URL, stream=stream).start()
    try:
        yield server
    finally:
        if server.process is not None:
            # A stopped process would not act on the SIGTERM that stop() sends.
            os.kill(server.process.pid, signal.SIGCONT)
        server.stop()
        client.delete(stream)
        client.close()


@pytest.fixture(scope="module")
def ipc_server() -> Iterator[IPCServer]:
    """One real django-ipc server for the module."""
    yield from _running_server()


@pytest.fixture
def own_ipc_server() -> Iterator[IPCServer]:
    """A real django-ipc server for one test, which may stop its process."""
    yield from _running_server()


def use_server(rpc_settings: Callable[..., dict[str, Any]], server: IPCServer) -> IPCServer:
    rpc_settings(TRANSPORT="redis", REDIS_URL=server.redis_url, REQUEST_STREAM=server.stream)
    return server


@pytest.fixture
def ipc(rpc_settings: Callable[..., dict[str, Any]], ipc_server: IPCServer) -> IPCServer:
    """The client talks to the module's server."""
    return use_server(rpc_settings, ipc_server)


@contextlib.contextmanager
def frozen(server: IPCServer) -> Iterator[None]:
    """The server's process is stopped (SIGSTOP) inside the block: it cannot answer anything."""
    assert server.process is not None
    os.kill(server.process.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(server.process.pid, signal.SIGCONT)


def late_reply(client: redis.Redis, correlation_id: str) -> dict[str, Any]:
    """Wait for the reply the server sends after the client gave up (it ignores ``timeout``)."""
    popped = client.blpop([f"list:response:{correlation_id}"], timeout=10)
    assert popped is not None, "the server never answered"
    reply: dict[str, Any] = json.loads(popped[1])
    return reply


# -- replies ----------------------------------------------------------------------------------


@pytest.mark.django_db
def test_echo_is_logged_as_success(ipc):
    data = {"greeting": "hello", "nested": {"n": [1, 2, 3]}}
    user = UserFactory()

    with rpc_context(user=user, caller_ip="192.0.2.10", user_agent="ipc-test"):
        result = get_rpc_client().call("system.echo", {"data": data})

    assert result["echo"] == data
    assert result["type"] == "dict"
    assert result["size"] == len(json.dumps(data))
    assert isinstance(result["timestamp"], float)
    log = RPCLog.objects.get()
    assert log.status == "success"
    assert log.method == "system.echo"
    assert log.params == {"data": data}
    assert log.response == result
    assert (log.user, log.caller_ip, log.user_agent) == (user, "192.0.2.10", "ipc-test")
    assert log.duration_ms > 0
    assert log.completed_at is not None


@pytest.mark.django_db
def test_send_notification_is_logged_as_success(ipc):
    params = {"user_id": "42", "type": "info", "title": "Hello", "message": "Your export is ready"}

    result = get_rpc_client().call("send_notification", params)

    # Nobody is connected over WebSocket, so the server reports it could not deliver.
    assert result["user_id"] == "42"
    assert result["delivered"] is False
    assert result["connections"] == 0
    log = RPCLog.objects.get()
    assert log.status == "success"
    assert log.params == params
    assert log.response == result


@pytest.mark.django_db
def test_unknown_method_is_remote_error_with_servers_text(ipc, redis_client):
    with pytest.raises(RPCRemoteError) as excinfo:
        get_rpc_client().call("no.such.method", {"x": 1})

    assert excinfo.value.code == "internal_error"
    assert excinfo.value.message == "Unknown RPC method: no.such.method"
    log = RPCLog.objects.get()
    assert log.status == "failed"
    assert log.error_code == "internal_error"
    assert log.error_message == "Unknown RPC method: no.such.method"
    assert "Response has no result field" not in log.error_message
    assert log.response is None
    # The server's quirk: a request whose handler failed is never acknowledged.
    pending = redis_client.xpending_range(ipc.stream, "rpc_group", min="-", max="+", count=1000)
    pending_ids = {
        json.loads(fields[b"payload"])["correlation_id"]
        for entry in pending
        for _id, fields in redis_client.xrange(ipc.stream, entry["message_id"], entry["message_id"])
    }
    assert log.correlation_id in pending_ids


@pytest.mark.django_db
def test_invalid_params_report_the_servers_validation_text(ipc):
    with pytest.raises(RPCRemoteError) as excinfo:
        get_rpc_client().call("system.echo", {"no_data": True})

    assert excinfo.value.code == "internal_error"
    assert "validation_error" in excinfo.value.message
    assert "Field required" in excinfo.value.message
    log = RPCLog.objects.get()
    assert (log.status, log.error_message) == ("failed", excinfo.value.message)


# -- no reply in time -------------------------------------------------------------------------


@pytest.mark.django_db
def test_stopped_server_gives_timeout(rpc_settings, own_ipc_server, redis_client):
    use_server(rpc_settings, own_ipc_server)

    with frozen(own_ipc_server):
        started = time.perf_counter()
        with pytest.raises(RPCTimeoutError):
            get_rpc_client().call("system.echo", {"data": {"n": 1}}, timeout=0.5)
        elapsed = time.perf_counter() - started

    assert 0.5 <= elapsed < 2.5
    log = RPCLog.objects.get()
    assert log.status == "timeout"
    assert log.error_code == "timeout"
    assert log.duration_ms >= 500
    assert log.completed_at is not None
    # Resumed, the server still runs the stale request and answers into a list nobody reads.
    reply = late_reply(redis_client, log.correlation_id)
    assert (reply["correlation_id"], reply["success"]) == (log.correlation_id, True)


@pytest.mark.django_db
def test_slow_method_gives_timeout(ipc, redis_client):
    started = time.perf_counter()
    with pytest.raises(RPCTimeoutError):
        get_rpc_client().call("system.ping", {"delay_ms": 1500}, timeout=0.5)
    elapsed = time.perf_counter() - started

    assert 0.5 <= elapsed < 2.5
    log = RPCLog.objects.get()
    assert (log.status, log.error_code) == ("timeout", "timeout")
    assert log.duration_ms >= 500
    reply = late_reply(redis_client, log.correlation_id)
    assert reply["success"] is True
    assert reply["result"]["delay_ms"] == 1500


# -- acall ------------------------------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_acall_echo_is_logged_as_success(ipc):
    data = {"async": True, "items": ["a", "b"]}

    result = await get_rpc_client().acall("system.echo", {"data": data})

    assert result["echo"] == data
    log = await RPCLog.objects.aget()
    assert log.status == "success"
    assert log.response == result
    assert log.duration_ms > 0


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_acall_unknown_method_is_remote_error(ipc):
    with pytest.raises(RPCRemoteError) as excinfo:
        await get_rpc_client().acall("no.such.async.method")

    assert excinfo.value.code == "internal_error"
    assert excinfo.value.message == "Unknown RPC method: no.such.async.method"
    log = await RPCLog.objects.aget()
    assert (log.status, log.error_code, log.error_message) == (
        "failed",
        "internal_error",
        "Unknown RPC method: no.such.async.method",
    )


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_acall_stopped_server_gives_timeout(rpc_settings, own_ipc_server, redis_client):
    use_server(rpc_settings, own_ipc_server)

    with frozen(own_ipc_server):
        started = time.perf_counter()
        with pytest.raises(RPCTimeoutError):
            await get_rpc_client().acall("system.echo", {"data": {"n": 2}}, timeout=0.5)
        elapsed = time.perf_counter() - started

    assert 0.5 <= elapsed < 2.5
    log = await RPCLog.objects.aget()
    assert (log.status, log.error_code) == ("timeout", "timeout")
    assert log.duration_ms >= 500
    reply = await asyncio.to_thread(late_reply, redis_client, log.correlation_id)
    assert reply["correlation_id"] == log.correlation_id


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_acall_slow_method_gives_timeout(ipc, redis_client):
    with pytest.raises(RPCTimeoutError):
        await get_rpc_client().acall("system.ping", {"delay_ms": 1500}, timeout=0.5)

    log = await RPCLog.objects.aget()
    assert (log.status, log.error_code) == ("timeout", "timeout")
    assert log.duration_ms >= 500
    reply = await asyncio.to_thread(late_reply, redis_client, log.correlation_id)
    assert reply["result"]["delay_ms"] == 1500


# -- concurrency ------------------------------------------------------------------------------

CONCURRENT_CALLS = 8


@pytest.fixture
def sqlite_writes_take_turns(monkeypatch: pytest.MonkeyPatch) -> None:
    """On SQLite, the log writes of concurrent threads take turns; the calls still overlap.

    The in-memory test database is shared between threads through SQLite's shared cache, which
    answers a second writer "database table is locked" at once instead of waiting for it.
    """
    if connections["default"].vendor != "sqlite":
        return
    lock = threading.Lock()
    writer = get_writer()

    class TakingTurns:
        def started(self, event: dict[str, Any]) -> None:
            with lock:
                writer.started(event)

        def finished(self, event: dict[str, Any]) -> None:
            with lock:
                writer.finished(event)

    monkeypatch.setattr("django_rpc_audit.receivers.get_writer", TakingTurns)


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("sqlite_writes_take_turns")
def test_concurrent_threads_get_their_own_replies(ipc):
    client = get_rpc_client()
    start = threading.Barrier(CONCURRENT_CALLS)
    results: dict[int, dict[str, Any]] = {}
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            start.wait(timeout=10)
            results[n] = client.call("system.echo", {"data": {"n": n}}, timeout=10)
        except BaseException as exc:
            errors.append(exc)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(CONCURRENT_CALLS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    assert errors == []
    assert {n: result["echo"] for n, result in results.items()} == {
        n: {"n": n} for n in range(CONCURRENT_CALLS)
    }
    logs = list(RPCLog.objects.all())
    assert len(logs) == CONCURRENT_CALLS
    assert len({log.correlation_id for log in logs}) == CONCURRENT_CALLS
    for log in logs:
        assert log.status == "success"
        assert log.response["echo"] == log.params["data"]


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_concurrent_acalls_get_their_own_replies(ipc):
    client = get_rpc_client()

    results = await asyncio.gather(
        *(client.acall("system.echo", {"data": {"n": n}}) for n in range(CONCURRENT_CALLS))
    )

    assert [result["echo"] for result in results] == [{"n": n} for n in range(CONCURRENT_CALLS)]
    logs = [log async for log in RPCLog.objects.all()]
    assert len(logs) == CONCURRENT_CALLS
    assert len({log.correlation_id for log in logs}) == CONCURRENT_CALLS
    for log in logs:
        assert log.status == "success"
        assert log.response["echo"] == log.params["data"]


# -- trace context on the wire (OTEL_TRACES) ----------------------------------------------------


def sent_messages(client: redis.Redis, stream: str) -> dict[str, dict[str, Any]]:
    """The request messages on ``stream``, by correlation id."""
    messages = (json.loads(fields[b"payload"]) for _, fields in client.xrange(stream))
    return {message["correlation_id"]: message for message in messages}


@pytest.mark.django_db
def test_the_server_answers_requests_that_carry_trace_context(
    ipc, rpc_settings, otel_sdk, redis_client
):
    """django-ipc 1.0 reads the fields it knows and ignores ``traceparent`` / ``tracestate``."""
    rpc_settings(OTEL_TRACES=True)
    data = {"traced": True}

    result = get_rpc_client().call("system.echo", {"data": data})
    with pytest.raises(RPCRemoteError) as excinfo:
        get_rpc_client().call("no.such.traced.method")

    assert result["echo"] == data
    assert excinfo.value.message == "Unknown RPC method: no.such.traced.method"
    logs = {log.method: log for log in RPCLog.objects.all()}
    messages = sent_messages(redis_client, ipc.stream)
    spans = {span.name: span for span in otel_sdk.spans()}
    for method, status in (("system.echo", "success"), ("no.such.traced.method", "failed")):
        log = logs[method]
        assert log.status == status
        message = messages[log.correlation_id]
        assert message["traceparent"].split("-")[1:3] == [log.trace_id, log.span_id]
        assert f"{spans[method].context.span_id:016x}" == log.span_id


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_acall_with_trace_context_is_answered(ipc, rpc_settings, otel_sdk, redis_client):
    rpc_settings(OTEL_TRACES=True)

    result = await get_rpc_client().acall("system.echo", {"data": {"n": 1}})

    assert result["echo"] == {"n": 1}
    log = await RPCLog.objects.aget()
    assert log.status == "success"
    assert "traceparent" in sent_messages(redis_client, ipc.stream)[log.correlation_id]
    (span,) = otel_sdk.spans()
    assert span.attributes["server.address"] == "127.0.0.1"
