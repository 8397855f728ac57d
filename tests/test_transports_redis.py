"""The Redis transport against a real Redis, answered by a small stand-in for the django-ipc server.

The stand-in (:class:`Responder`) reads the test's own request stream the way django-ipc does
(``XREADGROUP`` in group ``rpc_group``) and ``LPUSH``es replies in django-ipc's format, which has
no ``type`` key. Tests against the real server are in ``test_ipc_server.py``.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

import pytest
import redis
import redis.asyncio
from asgiref.sync import SyncToAsync, sync_to_async
from django.db import connections

from django_rpc_audit import get_rpc_client
from django_rpc_audit.context import rpc_context
from django_rpc_audit.exceptions import (
    RPCConnectionError,
    RPCProtocolError,
    RPCRemoteError,
    RPCTimeoutError,
)
from django_rpc_audit.models import RPCLog
from scripts.ipc_server import free_port
from tests.factories import UserFactory

pytestmark = pytest.mark.redis

Request = dict[str, Any]
Answer = Callable[[Request], "dict[str, Any] | str | None"]

PASSWORD = "s3cretpw"


# -- the stand-in server ----------------------------------------------------------------------


def reply(
    request: Request,
    *,
    success: bool = True,
    result: dict[str, Any] | None = None,
    error: str | None = None,
    error_code: str | None = None,
) -> dict[str, Any]:
    """A reply in django-ipc's format (no ``type`` key: ``success`` says how the call ended)."""
    return {
        "correlation_id": request["correlation_id"],
        "timestamp": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        "success": success,
        "error": error,
        "error_code": error_code,
        "result": result,
    }


def echo(request: Request) -> dict[str, Any]:
    return reply(request, result={"echo": request["params"]})


class Responder:
    """Answers the requests on ``stream`` from a thread with its own Redis connection.

    Each request's ``payload`` is parsed and kept in ``requests``; ``answer(request)`` is pushed
    to its ``reply_to``: a dict as JSON, a str as it is, ``None`` not at all.
    """

    group = "rpc_group"

    def __init__(self, redis_url: str, stream: str, answer: Answer) -> None:
        self.stream = stream
        self.answer = answer
        self.requests: list[Request] = []
        self.client = redis.Redis.from_url(redis_url, socket_timeout=5)
        self._stopping = threading.Event()
        self._errors: list[BaseException] = []
        self._thread = threading.Thread(target=self._run, name=f"responder {stream}", daemon=True)

    def start(self) -> Responder:
        self.client.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=10)
        self.client.close()
        assert not self._thread.is_alive(), "the responder thread did not stop"
        if self._errors:
            raise self._errors[0]

    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                # A short block so that stop() is noticed; a request wakes the read at once.
                batches = self.client.xreadgroup(
                    self.group, "responder", {self.stream: ">"}, count=10, block=50
                )
                for _stream, entries in batches or ():
                    for entry_id, fields in entries:
                        self._handle(entry_id, fields)
        except BaseException as exc:
            self._errors.append(exc)

    def _handle(self, entry_id: bytes, fields: dict[bytes, bytes]) -> None:
        request = json.loads(fields[b"payload"])
        self.requests.append(request)
        answer = self.answer(request)
        if answer is not None:
            body = answer if isinstance(answer, str) else json.dumps(answer)
            self.client.lpush(request["reply_to"], body)
            self.client.expire(request["reply_to"], 60)
        self.client.xack(self.stream, self.group, entry_id)


@pytest.fixture
def respond(redis_transport: str, redis_url: str) -> Iterator[Callable[..., Responder]]:
    """``respond(answer)`` starts a :class:`Responder` on the test's stream (default: echo)."""
    responders: list[Responder] = []

    def start(answer: Answer = echo) -> Responder:
        responder = Responder(redis_url, redis_transport, answer).start()
        responders.append(responder)
        return responder

    yield start
    for responder in responders:
        responder.stop()


class CommandLog:
    """Redis ``MONITOR`` on a connection of its own: every command as the server received it."""

    def __init__(self, redis_url: str) -> None:
        # The timeout turns a command that never comes into an error instead of a hang.
        self._client = redis.Redis.from_url(redis_url, socket_timeout=5)
        self._monitor = self._client.monitor()

    def __enter__(self) -> CommandLog:
        self._monitor.__enter__()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._monitor.__exit__(*exc_info)
        self._client.close()

    def until(self, predicate: Callable[[str], bool]) -> list[str]:
        """The commands seen up to and including the first one ``predicate`` accepts."""
        seen: list[str] = []
        while True:
            command = self._monitor.next_command()["command"]
            seen.append(command)
            if predicate(command):
                return seen


@pytest.fixture
def command_log(redis_url: str) -> Iterator[CommandLog]:
    with CommandLog(redis_url) as log:
        yield log


def stream_payloads(client: redis.Redis, stream: str) -> list[dict[bytes, bytes]]:
    return [fields for _id, fields in client.xrange(stream)]


def down_url() -> str:
    """A Redis URL with a password, on a loopback port nothing listens on."""
    return f"redis://:{PASSWORD}@127.0.0.1:{free_port()}/0"


def assert_no_password(exc: BaseException) -> None:
    assert PASSWORD not in str(exc)
    assert PASSWORD not in repr(exc)
    assert PASSWORD not in "".join(traceback.format_exception(exc))


# -- the request on the wire ------------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("rpc_timeout", "timeout", "wire_timeout"),
    [(2.5, None, 3), (5, 0.3, 1), (5, 7, 7)],
    ids=["setting-2.5s", "call-0.3s", "call-7s"],
)
def test_request_wire_format(
    rpc_settings, respond, redis_client, redis_transport, rpc_timeout, timeout, wire_timeout
):
    rpc_settings(RPC_TIMEOUT=rpc_timeout)
    responder = respond()
    params = {"n": 1, "when": date(2024, 5, 17), "amount": Decimal("1.50"), "nested": {"a": [1]}}

    get_rpc_client().call("notify.user", params, timeout=timeout)

    [fields] = stream_payloads(redis_client, redis_transport)
    assert set(fields) == {b"payload"}
    payload = json.loads(fields[b"payload"])
    assert set(payload) == {"type", "method", "params", "correlation_id", "reply_to", "timeout"}
    assert payload["type"] == "rpc"
    assert payload["method"] == "notify.user"
    assert payload["params"] == {
        "n": 1,
        "when": "2024-05-17",
        "amount": "1.50",
        "nested": {"a": [1]},
    }
    assert uuid.UUID(payload["correlation_id"]).version == 4
    assert str(uuid.UUID(payload["correlation_id"])) == payload["correlation_id"]
    assert payload["reply_to"] == f"list:response:{payload['correlation_id']}"
    assert payload["timeout"] == wire_timeout
    assert isinstance(payload["timeout"], int)
    assert responder.requests == [payload]


@pytest.mark.django_db
def test_reply_key_uses_configured_prefix(rpc_settings, respond, redis_client, redis_transport):
    rpc_settings(RESPONSE_KEY_PREFIX="rpc_audit_test:reply:")
    responder = respond()

    assert get_rpc_client().call("system.echo", {"x": 1}) == {"echo": {"x": 1}}

    [request] = responder.requests
    assert request["reply_to"] == f"rpc_audit_test:reply:{request['correlation_id']}"
    assert not redis_client.exists(request["reply_to"])


@pytest.mark.django_db
def test_xadd_trims_stream_approximately(rpc_settings, redis_transport, command_log):
    rpc_settings(STREAM_MAXLEN=25)

    get_rpc_client().fire_and_forget("system.ping")

    xadd = f"XADD {redis_transport} "
    [command] = command_log.until(lambda command: command.startswith(xadd))[-1:]
    assert command.startswith(f"{xadd}MAXLEN ~ 25 * payload ")


@pytest.mark.django_db
def test_stream_length_stays_near_maxlen(rpc_settings, redis_client, redis_transport):
    rpc_settings(STREAM_MAXLEN=10)
    node_entries = int(
        redis_client.config_get("stream-node-max-entries")["stream-node-max-entries"]
    )
    client = get_rpc_client()

    for n in range(300):
        client.fire_and_forget("system.ping", {"n": n})

    # "~" trims whole stream nodes only, so up to one node more than MAXLEN may remain.
    assert 10 <= redis_client.xlen(redis_transport) <= 10 + node_entries
    assert redis_client.xlen(redis_transport) < 300
    assert RPCLog.objects.succeeded().count() == 300


# -- sync call outcomes -----------------------------------------------------------------------


@pytest.mark.django_db
def test_success_returns_result_and_logs_row(respond, signals):
    def answer(request: Request) -> dict[str, Any]:
        result = {"delivered": True, "user_id": request["params"]["user_id"]}
        return reply(request, result=result)

    responder = respond(answer)
    user = UserFactory()

    with rpc_context(user=user, caller_ip="203.0.113.9", user_agent="agent/1.0"):
        result = get_rpc_client().call("send_notification", {"user_id": "42"})

    assert result == {"delivered": True, "user_id": "42"}
    [request] = responder.requests
    log = RPCLog.objects.get()
    assert log.correlation_id == request["correlation_id"]
    assert log.status == "success"
    assert log.method == "send_notification"
    assert log.params == {"user_id": "42"}
    assert log.response == {"delivered": True, "user_id": "42"}
    assert log.user == user
    assert log.caller_ip == "203.0.113.9"
    assert log.user_agent == "agent/1.0"
    assert log.error_code == ""
    assert log.error_message == ""
    assert log.duration_ms > 0
    assert log.completed_at is not None
    assert log.completed_at >= log.created_at
    assert [event["status"] for event in signals.finished] == ["success"]


@pytest.mark.django_db
def test_null_result_is_an_empty_dict(respond):
    respond(lambda request: reply(request, result=None))

    assert get_rpc_client().call("system.ping") == {}
    assert RPCLog.objects.get().status == "success"


@pytest.mark.django_db
def test_remote_error_carries_the_servers_code_and_text(respond, signals):
    sent: list[dict[str, Any]] = []

    def answer(request: Request) -> dict[str, Any]:
        body = reply(
            request, success=False, error_code="rate_limited", error="Too many calls for 42"
        )
        sent.append(body)
        return body

    respond(answer)

    with pytest.raises(RPCRemoteError) as excinfo:
        get_rpc_client().call("send_notification", {"user_id": "42"})

    assert "type" not in sent[0]  # django-ipc's real reply format
    assert excinfo.value.code == "rate_limited"
    assert excinfo.value.message == "Too many calls for 42"
    log = RPCLog.objects.get()
    assert log.status == "failed"
    assert log.error_code == "rate_limited"
    assert log.error_message == "Too many calls for 42"
    assert log.response is None
    assert log.completed_at is not None
    assert "Response has no result field" not in log.error_message
    [finished] = signals.finished
    assert (finished["status"], finished["error_code"]) == ("failed", "rate_limited")


@pytest.mark.django_db
def test_remote_error_without_code_is_unknown_error(respond):
    respond(lambda request: reply(request, success=False, error="boom"))

    with pytest.raises(RPCRemoteError) as excinfo:
        get_rpc_client().call("system.ping")

    assert (excinfo.value.code, excinfo.value.message) == ("unknown_error", "boom")
    log = RPCLog.objects.get()
    assert (log.status, log.error_code, log.error_message) == ("failed", "unknown_error", "boom")


@pytest.mark.django_db
def test_timeout_without_reply(redis_transport, command_log, signals):
    started = time.perf_counter()
    with pytest.raises(RPCTimeoutError) as excinfo:
        get_rpc_client().call("system.ping", timeout=0.3)
    elapsed = time.perf_counter() - started

    assert excinfo.value.timeout == 0.3
    assert 0.3 <= elapsed < 2.3
    log = RPCLog.objects.get()
    assert log.status == "timeout"
    assert log.error_code == "timeout"
    assert log.duration_ms >= 300
    assert log.completed_at is not None
    assert [event["status"] for event in signals.finished] == ["timeout"]
    # The client drops the reply key once it gave up, so a late reply is not left behind.
    reply_to = f"list:response:{log.correlation_id}"
    seen = command_log.until(lambda command: command.startswith(f"DEL {reply_to}"))
    on_reply_key = [command.split()[0] for command in seen if command.split()[1:2] == [reply_to]]
    assert on_reply_key == ["BLPOP", "DEL"]


@pytest.mark.django_db
@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(lambda request: "this is not JSON", id="not-json"),
        pytest.param(
            lambda request: {"correlation_id": request["correlation_id"], "result": {"a": 1}},
            id="no-success",
        ),
        pytest.param(lambda request: {**reply(request), "success": "true"}, id="success-not-bool"),
        pytest.param(lambda request: ["success", True], id="not-an-object"),
        pytest.param(
            lambda request: {**reply(request), "correlation_id": str(uuid.uuid4())},
            id="other-correlation-id",
        ),
        pytest.param(lambda request: reply(request, result=[1, 2]), id="result-not-object"),
    ],
)
def test_malformed_reply_is_protocol_error(respond, answer):
    def encoded(request: Request) -> str:
        body = answer(request)
        return body if isinstance(body, str) else json.dumps(body)

    respond(encoded)

    with pytest.raises(RPCProtocolError):
        get_rpc_client().call("system.ping", timeout=5)

    log = RPCLog.objects.get()
    assert log.status == "failed"
    assert log.error_code == "protocol_error"
    assert log.completed_at is not None


@pytest.mark.django_db
def test_redis_down_is_connection_error_without_password(rpc_settings, signals):
    rpc_settings(TRANSPORT="redis", REDIS_URL=down_url())
    client = get_rpc_client()

    with pytest.raises(RPCConnectionError) as excinfo:
        client.call("system.ping", timeout=1)

    assert_no_password(excinfo.value)
    assert isinstance(excinfo.value.__cause__, redis.ConnectionError)
    assert PASSWORD not in repr(client)
    log = RPCLog.objects.get()
    assert log.status == "failed"
    assert log.error_code == "connection_error"
    assert PASSWORD not in log.error_message
    assert not RPCLog.objects.pending().exists()
    [finished] = signals.finished
    assert finished["error_code"] == "connection_error"
    assert PASSWORD not in finished["error_message"]


@pytest.mark.django_db
def test_fire_and_forget_with_redis_down_raises_connection_error(rpc_settings):
    rpc_settings(TRANSPORT="redis", REDIS_URL=down_url())

    with pytest.raises(RPCConnectionError) as excinfo:
        get_rpc_client().fire_and_forget("system.ping")

    assert_no_password(excinfo.value)
    log = RPCLog.objects.get()
    assert (log.status, log.error_code) == ("failed", "connection_error")


# -- fire and forget, logging off -------------------------------------------------------------


@pytest.mark.django_db
def test_fire_and_forget_puts_one_request_and_returns_its_id(redis_client, redis_transport):
    correlation_id = get_rpc_client().fire_and_forget("broadcast", {"room": "lobby"})

    [fields] = stream_payloads(redis_client, redis_transport)
    payload = json.loads(fields[b"payload"])
    assert payload["correlation_id"] == correlation_id
    assert payload["method"] == "broadcast"
    assert payload["params"] == {"room": "lobby"}
    assert payload["reply_to"] == f"list:response:{correlation_id}"
    log = RPCLog.objects.get()
    assert (log.correlation_id, log.status, log.response) == (correlation_id, "success", None)


@pytest.mark.django_db
def test_logging_disabled_by_environment_writes_no_rows(rpc_env, respond, signals):
    rpc_env("ENABLE_LOGGING", "false")
    responder = respond()

    assert get_rpc_client().call("system.echo", {"x": 1}) == {"echo": {"x": 1}}

    assert len(responder.requests) == 1
    assert not RPCLog.objects.exists()
    assert len(signals.started) == 1
    assert [event["status"] for event in signals.finished] == ["success"]


# -- acall ------------------------------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_acall_success_returns_result_and_logs_row(respond, signals):
    responder = respond()
    user = await sync_to_async(UserFactory)()

    with rpc_context(user=user, caller_ip="2001:db8::7", user_agent="async-agent"):
        result = await get_rpc_client().acall("system.echo", {"data": {"k": "v"}})

    assert result == {"echo": {"data": {"k": "v"}}}
    [request] = responder.requests
    log = await RPCLog.objects.aget()
    assert log.correlation_id == request["correlation_id"]
    assert log.status == "success"
    assert log.response == {"echo": {"data": {"k": "v"}}}
    assert log.user_id == user.pk
    assert log.caller_ip == "2001:db8::7"
    assert log.user_agent == "async-agent"
    assert log.duration_ms > 0
    assert log.completed_at is not None
    assert [event["status"] for event in signals.finished] == ["success"]


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_acall_remote_error(respond):
    respond(
        lambda request: reply(
            request, success=False, error_code="internal_error", error="Unknown RPC method: x.y"
        )
    )

    with pytest.raises(RPCRemoteError) as excinfo:
        await get_rpc_client().acall("x.y")

    assert (excinfo.value.code, excinfo.value.message) == (
        "internal_error",
        "Unknown RPC method: x.y",
    )
    log = await RPCLog.objects.aget()
    assert (log.status, log.error_code, log.error_message) == (
        "failed",
        "internal_error",
        "Unknown RPC method: x.y",
    )


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_acall_timeout_does_not_block_the_event_loop(redis_client, redis_transport, signals):
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    ticker = asyncio.create_task(tick())
    started = time.perf_counter()
    try:
        with pytest.raises(RPCTimeoutError):
            await get_rpc_client().acall("system.ping", timeout=0.3)
    finally:
        ticker.cancel()
    elapsed = time.perf_counter() - started

    # ~30 ticks if the loop ran during the wait; a blocking wait would allow one or two.
    assert ticks >= 10
    assert 0.3 <= elapsed < 2.3
    log = await RPCLog.objects.aget()
    assert log.status == "timeout"
    assert log.error_code == "timeout"
    assert log.duration_ms >= 300
    assert not redis_client.exists(f"list:response:{log.correlation_id}")
    assert [event["status"] for event in signals.finished] == ["timeout"]


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_acall_malformed_reply_is_protocol_error(respond):
    respond(lambda request: "<html>502</html>")

    with pytest.raises(RPCProtocolError):
        await get_rpc_client().acall("system.ping")

    log = await RPCLog.objects.aget()
    assert (log.status, log.error_code) == ("failed", "protocol_error")


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_acall_redis_down_is_connection_error_without_password(rpc_settings, signals):
    rpc_settings(TRANSPORT="redis", REDIS_URL=down_url())

    with pytest.raises(RPCConnectionError) as excinfo:
        await get_rpc_client().acall("system.ping", timeout=1)

    assert_no_password(excinfo.value)
    log = await RPCLog.objects.aget()
    assert (log.status, log.error_code) == ("failed", "connection_error")
    assert PASSWORD not in log.error_message
    assert not await RPCLog.objects.pending().aexists()
    assert [event["error_code"] for event in signals.finished] == ["connection_error"]


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_cancelled_acall_is_reported_once(redis_url, redis_transport, signals):
    correlation_id = str(uuid.uuid4())
    blpop = f"BLPOP list:response:{correlation_id} "
    with CommandLog(redis_url) as command_log:
        call = asyncio.create_task(
            get_rpc_client().acall("system.ping", timeout=30, correlation_id=correlation_id)
        )
        # Redis shows the BLPOP once it holds it; a few loop turns later the call is past its
        # send step (see test_cancellation_is_never_lost) and blocked on its reply.
        await asyncio.to_thread(command_log.until, lambda command: command.startswith(blpop))
        for _ in range(5):
            await asyncio.sleep(0)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call

    assert len(signals.started) == 1
    [finished] = signals.finished
    assert finished["correlation_id"] == correlation_id
    assert finished["status"] == "failed"
    assert finished["error_code"] == "cancelled"
    assert finished["duration_ms"] < 30_000
    log = await RPCLog.objects.aget()
    assert log.status == "failed"
    assert log.error_code == "cancelled"
    assert log.completed_at is not None
    assert not await RPCLog.objects.pending().aexists()


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_cancellation_is_never_lost(redis_url, redis_transport, signals):
    """A call cancelled at any point of its exchange with Redis ends ``cancelled`` at once.

    Each call is cancelled a few loop turns (0 to 5, twice over) after its request reached the
    stream, so some cancellations arrive while the reply wait (BLPOP) is being sent. A client
    with redis-py's default 5 s socket timeout sends through ``asyncio.wait_for``, which on
    Python 3.11 drops a cancellation arriving as the send completes: the call then goes on and
    ends 5 s later as a ``connection_error`` instead.
    """
    watcher = redis.asyncio.Redis.from_url(redis_url)
    last_id: bytes | str = "0-0"
    call: asyncio.Task[Any] | None = None
    turns = [*range(6), *range(6)]
    try:
        for attempt, turns_late in enumerate(turns, start=1):
            call = asyncio.create_task(get_rpc_client().acall("system.ping", timeout=30))
            entries = await watcher.xread({redis_transport: last_id}, block=10_000)
            assert entries, "the request never reached the stream"
            last_id = entries[0][1][-1][0]
            for _ in range(turns_late):
                await asyncio.sleep(0)
            call.cancel()
            # An honoured cancellation ends the call within milliseconds.
            done, _pending = await asyncio.wait({call}, timeout=2)
            assert done, (
                f"cancellation {attempt} ({turns_late} loop turns after the request was "
                "queued) was lost: the call went on after cancel()"
            )
            assert call.cancelled()
    finally:
        if call is not None and not call.done():
            # Let the runaway call finish (and write its row) before the test ends.
            await asyncio.gather(call, return_exceptions=True)
        await watcher.aclose()

    assert len(signals.finished) == len(turns)
    assert {(event["status"], event["error_code"]) for event in signals.finished} == {
        ("failed", "cancelled")
    }
    assert await RPCLog.objects.filter(error_code="cancelled").acount() == len(turns)


# -- waits longer than redis-py's own socket timeout -------------------------------------------
# redis-py 8 gives every connection a 5 s socket timeout unless told otherwise. A reply wait
# (BLPOP) longer than that must still end as the call's own timeout, not as a Redis error:
# the default RPC_TIMEOUT is 30 s.

LONG_TIMEOUT = 6


@pytest.mark.django_db
def test_timeout_longer_than_redis_socket_timeout(redis_transport):
    started = time.perf_counter()
    with pytest.raises(RPCTimeoutError):
        get_rpc_client().call("system.ping", timeout=LONG_TIMEOUT)
    elapsed = time.perf_counter() - started

    assert LONG_TIMEOUT <= elapsed < LONG_TIMEOUT + 2
    log = RPCLog.objects.get()
    assert (log.status, log.error_code) == ("timeout", "timeout")
    assert log.duration_ms >= LONG_TIMEOUT * 1000


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_acall_timeout_longer_than_redis_socket_timeout(redis_transport):
    started = time.perf_counter()
    with pytest.raises(RPCTimeoutError):
        await get_rpc_client().acall("system.ping", timeout=LONG_TIMEOUT)
    elapsed = time.perf_counter() - started

    assert LONG_TIMEOUT <= elapsed < LONG_TIMEOUT + 2
    log = await RPCLog.objects.aget()
    assert (log.status, log.error_code) == ("timeout", "timeout")
    assert log.duration_ms >= LONG_TIMEOUT * 1000


# -- a Redis reached over a Unix socket -------------------------------------------------------


@pytest.fixture
def unix_socket_redis(tmp_path) -> Iterator[str]:
    """A real Redis server of the test's own, listening on a Unix socket only; its URL."""
    import shutil
    import subprocess

    server_binary = shutil.which("redis-server")
    if server_binary is None:
        pytest.skip("redis-server is not installed")  # the main Redis tests still run
    socket_path = tmp_path / "redis.sock"
    server = subprocess.Popen(
        [
            server_binary,
            "--port", "0",
            "--unixsocket", str(socket_path),
            "--save", "",
            "--appendonly", "no",
            "--dir", str(tmp_path),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"unix://{socket_path}?db=3"
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                redis.Redis.from_url(url, socket_connect_timeout=1).ping()
                break
            except redis.ConnectionError:
                assert server.poll() is None, "redis-server exited"
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=10)


# transaction=True: acall() writes its row from asgiref's worker thread, on a connection (and
# commit) of its own, which the end of the test must clean up.
@pytest.mark.django_db(transaction=True)
def test_a_unix_socket_redis_url_works_end_to_end(rpc_settings, unix_socket_redis, signals):
    """README: ``REDIS_URL`` may be ``unix:///path/to/redis.sock``; the call goes through it."""
    stream = f"rpc_audit_test:{uuid.uuid4().hex}:requests"
    rpc_settings(TRANSPORT="redis", REDIS_URL=unix_socket_redis, REQUEST_STREAM=stream)
    responder = Responder(unix_socket_redis, stream, echo).start()
    try:
        client = get_rpc_client()
        assert client.call("system.echo", {"via": "unix"}, timeout=5) == {"echo": {"via": "unix"}}
        # redis.asyncio too (its Unix connection refuses TCP options as the sync one does).
        acall = asyncio.run(client.acall("system.echo", {"via": "unix-async"}, timeout=5))
        assert acall == {"echo": {"via": "unix-async"}}
    finally:
        responder.stop()
        # The row of acall() was written from asgiref's worker thread: close its connection.
        SyncToAsync.single_thread_executor.submit(connections.close_all).result()
    assert [finished["status"] for finished in signals.finished] == ["success", "success"]
    assert sorted(RPCLog.objects.values_list("params__via", "status")) == [
        ("unix", "success"),
        ("unix-async", "success"),
    ]
    assert redis.Redis.from_url(unix_socket_redis).xlen(stream) == 2  # database 3 of that server
