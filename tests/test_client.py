"""RPCClient over the local transport: signals, outcomes, arguments, the logging switch."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import time
import uuid
from collections.abc import Iterator
from types import MappingProxyType
from typing import Any

import pytest

from django_rpc_audit import get_rpc_client, rpc_context
from django_rpc_audit.client import RPCClient
from django_rpc_audit.exceptions import RPCProtocolError, RPCRemoteError, RPCTimeoutError
from django_rpc_audit.models import RPCLog
from django_rpc_audit.signals import RPCSignal, idle_when, rpc_finished, rpc_started
from tests.factories import UserFactory

pytestmark = pytest.mark.django_db


@contextlib.contextmanager
def idle_receiver_of(signal: RPCSignal) -> Iterator[None]:
    """A receiver that says it is idle (``idle_when``), connected to ``signal`` for the block."""
    idle = idle_when(lambda: True)(lambda **kwargs: None)
    signal.connect(idle, weak=False, dispatch_uid="tests.idle")
    try:
        yield
    finally:
        signal.disconnect(dispatch_uid="tests.idle")


STARTED_KEYS = {
    "sender",
    "signal",
    "correlation_id",
    "method",
    "params",
    "params_json",
    "user",
    "caller_ip",
    "user_agent",
    "started_at",
    "trace_id",
    "span_id",
}
FINISHED_KEYS = STARTED_KEYS | {
    "status",
    "response",
    "response_json",
    "error_code",
    "error_message",
    "duration_ms",
    "completed_at",
    "slow",
}


@pytest.mark.usefixtures("echo_handler")
def test_successful_call_returns_result_and_sends_both_signals_once(signals):
    result = get_rpc_client().call("test.echo", {"a": 1})

    assert result == {"echo": {"a": 1}}
    assert len(signals.started) == 1
    assert len(signals.finished) == 1
    started, finished = signals.started[0], signals.finished[0]
    assert set(started) == STARTED_KEYS
    assert set(finished) == FINISHED_KEYS
    assert started["sender"] is RPCClient
    assert finished["correlation_id"] == started["correlation_id"]
    assert uuid.UUID(started["correlation_id"]).version == 4
    assert finished["status"] == "success"
    assert finished["response"] == {"echo": {"a": 1}}
    assert finished["error_code"] is None
    assert (started["trace_id"], started["span_id"]) == (None, None)  # tracing is off
    assert finished["duration_ms"] > 0
    assert finished["completed_at"] >= started["started_at"]


@pytest.mark.usefixtures("echo_handler")
def test_successful_call_is_logged():
    get_rpc_client().call("test.echo", {"a": 1})
    log = RPCLog.objects.get()
    assert (log.method, log.status, log.params, log.response) == (
        "test.echo",
        "success",
        {"a": 1},
        {"echo": {"a": 1}},
    )
    assert log.duration_ms > 0
    assert log.completed_at >= log.created_at
    assert log.error_code == ""


def test_handler_error_is_failed_with_its_text(local_handler, signals):
    def broken(params):
        raise ValueError("inventory is empty")

    local_handler("test.broken", broken)
    with pytest.raises(RPCRemoteError) as excinfo:
        get_rpc_client().call("test.broken")
    assert (excinfo.value.code, excinfo.value.message) == ("internal_error", "inventory is empty")
    log = RPCLog.objects.get()
    assert (log.status, log.error_code, log.error_message) == (
        "failed",
        "internal_error",
        "inventory is empty",
    )
    assert log.response is None
    assert [f["status"] for f in signals.finished] == ["failed"]


def test_handler_can_answer_with_its_own_error_code(local_handler):
    def offline(params):
        raise RPCRemoteError("user_offline", "User 7 is not connected")

    local_handler("test.offline", offline)
    with pytest.raises(RPCRemoteError, match="not connected"):
        get_rpc_client().call("test.offline")
    assert RPCLog.objects.get().error_code == "user_offline"


def test_unknown_method_is_failed_like_the_server_says():
    with pytest.raises(RPCRemoteError) as excinfo:
        get_rpc_client().call("no.such.method")
    assert excinfo.value.message == "Unknown RPC method: no.such.method"
    assert RPCLog.objects.get().status == "failed"


def test_slow_handler_is_a_timeout_with_the_measured_duration(local_handler, signals):
    local_handler("test.slow", lambda params: time.sleep(0.25) or {"late": True})
    with pytest.raises(RPCTimeoutError) as excinfo:
        get_rpc_client().call("test.slow", timeout=0.1)
    assert excinfo.value.timeout == 0.1
    log = RPCLog.objects.get()
    assert log.status == "timeout"
    assert log.error_code == "timeout"
    assert log.duration_ms >= 250
    assert signals.finished[0]["status"] == "timeout"


def test_handler_returning_a_non_dict_is_a_protocol_error(local_handler):
    local_handler("test.list", lambda params: [1, 2])
    with pytest.raises(RPCProtocolError):
        get_rpc_client().call("test.list")
    assert RPCLog.objects.get().error_code == "protocol_error"


@pytest.mark.usefixtures("echo_handler")
def test_a_raising_receiver_does_not_break_the_call(caplog):
    def explode(sender, **kwargs):
        raise RuntimeError("receiver bug")

    rpc_started.connect(explode, dispatch_uid="tests.explode.started")
    rpc_finished.connect(explode, dispatch_uid="tests.explode.finished")
    try:
        with caplog.at_level(logging.ERROR, logger="django.dispatch"):
            assert get_rpc_client().call("test.echo", {"x": 1}) == {"echo": {"x": 1}}
    finally:
        rpc_started.disconnect(dispatch_uid="tests.explode.started")
        rpc_finished.disconnect(dispatch_uid="tests.explode.finished")
    assert RPCLog.objects.get().status == "success"
    assert sum("receiver bug" in record.getMessage() for record in caplog.records) == 2


@pytest.mark.usefixtures("echo_handler")
@pytest.mark.parametrize("asynchronous", [False, True])
def test_the_builtin_receivers_alone_get_their_events_without_the_signals(
    monkeypatch, rpc_log_writer, asynchronous
):
    """With only the built-in log receivers connected (and a writer that buffers), the client
    hands the two events straight to their work: no signal sent, the same events, the same
    rows. Another receiver connected, even an idle one, brings the signals back."""
    sent: list[str] = []
    for name, signal in (("started", rpc_started), ("finished", rpc_finished)):
        for method in ("send_robust", "asend_robust", "send_robust_on_loop"):
            original = getattr(signal, method)
            monkeypatch.setattr(
                signal,
                method,
                lambda *a, _n=name, _o=original, **k: sent.append(_n) or _o(*a, **k),
            )
    handed: list[dict[str, Any]] = []
    for name in ("started", "finished"):
        original = getattr(rpc_log_writer, name)
        monkeypatch.setattr(
            rpc_log_writer,
            name,
            lambda event, _original=original: handed.append(dict(event)) or _original(event),
        )
    client = get_rpc_client()

    def call() -> object:
        if asynchronous:
            return asyncio.run(client.acall("test.echo", {"n": 1}))
        return client.call("test.echo", {"n": 1})

    assert call() == {"echo": {"n": 1}}
    assert sent == []
    direct = handed[:]
    handed.clear()
    with idle_receiver_of(rpc_finished):
        assert call() == {"echo": {"n": 1}}
    assert set(sent) == {"started", "finished"}
    # The same events, but for what identifies and times each call (and the deferred
    # payloads, objects made per call: their stored form is in the rows below).
    own = {"correlation_id", "started_at", "completed_at", "duration_ms", "params", "response"}
    assert [sorted(event) for event in handed] == [sorted(event) for event in direct]
    assert [{k: v for k, v in e.items() if k not in own} for e in handed] == [
        {k: v for k, v in e.items() if k not in own} for e in direct
    ]
    assert rpc_log_writer.flush() is True
    rows = [(log.status, log.params, log.response) for log in RPCLog.objects.all()]
    assert rows == [("success", {"n": 1}, {"echo": {"n": 1}})] * 2


@pytest.mark.usefixtures("echo_handler")
def test_a_raising_writer_handed_the_events_directly_does_not_break_the_call(
    caplog, monkeypatch, rpc_log_writer
):
    def explode(event):
        raise RuntimeError("writer bug")

    monkeypatch.setattr(rpc_log_writer, "started", explode)
    monkeypatch.setattr(rpc_log_writer, "finished", explode)
    with caplog.at_level(logging.ERROR, logger="django.dispatch"):
        assert get_rpc_client().call("test.echo", {"x": 1}) == {"echo": {"x": 1}}
    # Logged as send_robust logs a receiver's exception: once per event.
    assert sum("writer bug" in record.getMessage() for record in caplog.records) == 2


@pytest.mark.usefixtures("echo_handler")
def test_explicit_attribution_overrides_the_context(signals):
    context_user, explicit_user = UserFactory(), UserFactory()
    with rpc_context(user=context_user, caller_ip="10.0.0.1", user_agent="context-agent"):
        get_rpc_client().call("test.echo")
        get_rpc_client().call(
            "test.echo", user=explicit_user, caller_ip="10.0.0.2", user_agent="explicit-agent"
        )
    implicit, explicit = RPCLog.objects.order_by("created_at")
    assert (implicit.user, implicit.caller_ip, implicit.user_agent) == (
        context_user,
        "10.0.0.1",
        "context-agent",
    )
    assert (explicit.user, explicit.caller_ip, explicit.user_agent) == (
        explicit_user,
        "10.0.0.2",
        "explicit-agent",
    )


@pytest.mark.usefixtures("echo_handler")
def test_given_correlation_id_is_used():
    correlation_id = str(uuid.uuid4())
    get_rpc_client().call("test.echo", correlation_id=correlation_id)
    assert RPCLog.objects.get().correlation_id == correlation_id


@pytest.mark.usefixtures("echo_handler")
def test_params_may_be_any_mapping_and_django_types_are_encoded():
    params = MappingProxyType(
        {
            "id": uuid.UUID(int=1),
            "when": datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.UTC),
        }
    )
    expected = {"id": str(uuid.UUID(int=1)), "when": "2026-01-02T03:04:05Z"}
    assert get_rpc_client().call("test.echo", params) == {"echo": expected}
    assert RPCLog.objects.get().params == expected


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"method": ""}, ValueError),
        ({"method": "m", "params": ["not", "a", "mapping"]}, TypeError),
        ({"method": "m", "params": {"x": object()}}, TypeError),
        ({"method": "m", "params": {"x": float("nan")}}, TypeError),
        ({"method": "m", "timeout": 0}, ValueError),
        ({"method": "m", "timeout": float("inf")}, ValueError),
        ({"method": "m", "timeout": float("nan")}, ValueError),
        ({"method": "m", "correlation_id": "not-a-uuid"}, ValueError),
    ],
)
def test_bad_arguments_raise_before_anything_is_sent(signals, kwargs, error):
    with pytest.raises(error):
        get_rpc_client().call(**kwargs)
    assert signals.started == []
    assert signals.finished == []
    assert not RPCLog.objects.exists()


def test_fire_and_forget_reports_the_send(local_handler, signals):
    received = []
    local_handler("test.record", received.append)
    correlation_id = get_rpc_client().fire_and_forget("test.record", {"n": 1})
    assert received == [{"n": 1}]
    assert signals.finished[0]["correlation_id"] == correlation_id
    log = RPCLog.objects.get()
    assert (log.status, log.response) == ("success", None)


@pytest.mark.usefixtures("echo_handler")
def test_logging_switched_off_in_the_environment_writes_no_rows(rpc_env, signals):
    rpc_env("ENABLE_LOGGING", "false")
    assert get_rpc_client().call("test.echo", {"a": 1}) == {"echo": {"a": 1}}
    assert not RPCLog.objects.exists()
    # Other apps' receivers still hear about the call.
    assert len(signals.finished) == 1


@pytest.mark.usefixtures("echo_handler")
def test_logging_switched_off_in_settings_writes_no_rows(rpc_settings):
    rpc_settings(ENABLE_LOGGING=False)
    get_rpc_client().call("test.echo")
    assert not RPCLog.objects.exists()


@pytest.mark.usefixtures("echo_handler")
@pytest.mark.parametrize("asynchronous", [False, True])
def test_logging_off_with_no_other_receiver_builds_no_stored_form(
    rpc_settings, monkeypatch, asynchronous
):
    """Off is off: with only the built-in (idle) receivers, neither the params' nor the
    response's stored form is built and no signal is sent; a receiver connected brings both
    back, since it reads them."""
    from django_rpc_audit import client as client_module

    built = []
    original = client_module.stored
    monkeypatch.setattr(
        client_module,
        "stored",
        lambda *args, **kwargs: built.append(1) or original(*args, **kwargs),
    )
    sent = []
    monkeypatch.setattr(rpc_started, "send_robust", lambda *a, **k: sent.append(1) or [])

    async def asend(*args, **kwargs):
        sent.append(1)
        return []

    monkeypatch.setattr(rpc_started, "asend_robust", asend)
    rpc_settings(ENABLE_LOGGING=False)

    def call() -> object:
        client = get_rpc_client()
        if asynchronous:
            return asyncio.run(client.acall("test.echo", {"a": 1}))
        return client.call("test.echo", {"a": 1})

    assert call() == {"echo": {"a": 1}}
    assert (built, sent) == ([], [])
    # A receiver of one's own that says it is idle counts as not connected either.
    with idle_receiver_of(rpc_finished):
        assert call() == {"echo": {"a": 1}}
    assert (built, sent) == ([], [])

    heard = []
    rpc_finished.connect(lambda **kwargs: heard.append(kwargs), weak=False, dispatch_uid="t.h")
    try:
        assert call() == {"echo": {"a": 1}}
    finally:
        rpc_finished.disconnect(dispatch_uid="t.h")
    assert len(built) == 2  # the params and the response
    assert heard[0]["params"] == {"a": 1}
    assert heard[0]["response"] == {"echo": {"a": 1}}
    assert not RPCLog.objects.exists()


def test_builtin_receivers_are_connected_exactly_once():
    from django.apps import apps

    def count(signal) -> int:
        return sum(
            1 for key, *_ in signal.receivers if key[0] and str(key[0]).startswith("django_rpc")
        )

    assert count(rpc_started) == 1
    assert count(rpc_finished) == 1
    apps.get_app_config("django_rpc_audit").ready()
    assert count(rpc_started) == 1
    assert count(rpc_finished) == 1


@pytest.mark.usefixtures("echo_handler")
def test_a_failing_log_write_loses_nothing_and_breaks_nothing(monkeypatch, caplog):
    from django_rpc_audit.writers import sink

    def refuse(queryset, **kwargs):
        raise RuntimeError("database said no")

    monkeypatch.setattr(sink, "record_started", refuse)
    with caplog.at_level(logging.ERROR, logger="django_rpc_audit.writers"):
        assert get_rpc_client().call("test.echo", {"a": 2}) == {"echo": {"a": 2}}
    # The pending write failed; the finished write inserted the whole row.
    log = RPCLog.objects.get()
    assert (log.status, log.params, log.response) == ("success", {"a": 2}, {"echo": {"a": 2}})
    assert "database said no" in caplog.text


@pytest.mark.django_db(transaction=True)
@pytest.mark.asyncio
async def test_acall_local_async_handler_and_timeout(local_handler, signals):
    async def slow(params):
        await asyncio.sleep(5)

    async def quick(params):
        return {"quick": params}

    local_handler("test.slow", slow)
    local_handler("test.quick", quick)
    assert await get_rpc_client().acall("test.quick", {"a": 1}) == {"quick": {"a": 1}}
    started = time.monotonic()
    with pytest.raises(RPCTimeoutError):
        await get_rpc_client().acall("test.slow", timeout=0.1)
    # The async handler is cancelled at the timeout, not awaited to its end.
    assert time.monotonic() - started < 2
    statuses = sorted([log.status async for log in RPCLog.objects.all()])
    assert statuses == ["success", "timeout"]
    assert [f["status"] for f in signals.finished] == ["success", "timeout"]


async def cancel_a_hanging_acall(local_handler) -> None:
    """Start an ``acall()`` whose handler hangs, cancel it once the handler runs, and see the
    cancellation come out of it."""
    entered = asyncio.Event()

    async def hang(params):
        entered.set()
        await asyncio.sleep(30)

    local_handler("test.hang", hang)
    task = asyncio.create_task(get_rpc_client().acall("test.hang", timeout=60))
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


@pytest.mark.django_db(transaction=True)
@pytest.mark.asyncio
async def test_cancelled_acall_still_reports_once(local_handler, signals):
    await cancel_a_hanging_acall(local_handler)
    assert len(signals.finished) == 1
    assert (signals.finished[0]["status"], signals.finished[0]["error_code"]) == (
        "failed",
        "cancelled",
    )
    log = await RPCLog.objects.aget()
    assert log.status == "failed"


@pytest.mark.asyncio
@pytest.mark.usefixtures("echo_handler")
async def test_blocking_call_on_the_event_loop_is_refused(signals):
    with pytest.raises(RuntimeError, match="acall"):
        get_rpc_client().call("test.echo")
    with pytest.raises(RuntimeError, match="acall"):
        get_rpc_client().fire_and_forget("test.echo")
    assert signals.started == []


@pytest.mark.usefixtures("echo_handler")
def test_rows_are_written_when_use_tz_is_off(settings):
    settings.USE_TZ = False
    get_rpc_client().call("test.echo")
    log = RPCLog.objects.get()
    assert log.status == "success"
    assert log.created_at.tzinfo is None


# -- cancelled while the rpc_started receivers run ----------------------------------------------


@pytest.fixture
def slow_started_receiver():
    """A synchronous ``rpc_started`` receiver (so ``acall()`` runs it in a worker thread) that
    holds the call until the test lets it go."""
    import threading

    entered, release = threading.Event(), threading.Event()

    def slow(sender, **kwargs):
        entered.set()
        release.wait(10)

    rpc_started.connect(slow, dispatch_uid="tests.slow_started")
    yield entered, release
    release.set()
    rpc_started.disconnect(dispatch_uid="tests.slow_started")


@pytest.mark.django_db(transaction=True)
@pytest.mark.asyncio
@pytest.mark.usefixtures("echo_handler")
@pytest.mark.parametrize("write_mode", ["sync", "buffered"])
async def test_cancelled_while_started_receivers_run_still_reports_once(
    rpc_settings, signals, slow_started_receiver, write_mode
):
    """README: ``rpc_finished`` exactly once, also on cancellation, wherever it lands."""
    from asgiref.sync import sync_to_async

    from django_rpc_audit.writers import flush

    rpc_settings(WRITE_MODE=write_mode)
    entered, release = slow_started_receiver
    task = asyncio.create_task(get_rpc_client().acall("test.echo", {"n": 1}))
    assert await asyncio.to_thread(entered.wait, 10)
    task.cancel()
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    # The slow receiver finishes in its thread; rpc_finished follows it there, in order.
    for _ in range(200):
        if signals.finished:
            break
        await asyncio.sleep(0.01)
    [finished] = signals.finished
    assert (finished["status"], finished["error_code"]) == ("failed", "cancelled")
    assert finished["duration_ms"] == 0.0  # the transport was never reached
    assert await sync_to_async(flush)(30)
    log = await RPCLog.objects.aget()
    assert (log.status, log.error_code) == ("failed", "cancelled")


@pytest.mark.usefixtures("echo_handler")
def test_interrupted_while_started_receivers_run_still_reports_once(signals):
    """The sync twin: Ctrl-C (``KeyboardInterrupt``) inside an ``rpc_started`` receiver."""

    def interrupted(sender, **kwargs):
        raise KeyboardInterrupt

    rpc_started.connect(interrupted, dispatch_uid="tests.interrupted")
    try:
        with pytest.raises(KeyboardInterrupt):
            get_rpc_client().call("test.echo", {"n": 1})
    finally:
        rpc_started.disconnect(dispatch_uid="tests.interrupted")
    [finished] = signals.finished
    assert (finished["status"], finished["error_code"]) == ("failed", "cancelled")
    assert RPCLog.objects.get().status == "failed"


# -- acall() reports on the event loop ----------------------------------------------------------


@pytest.mark.django_db(transaction=True)
@pytest.mark.asyncio
@pytest.mark.usefixtures("echo_handler")
async def test_acall_with_only_loop_safe_receivers_reports_without_a_task(rpc_settings):
    """With the buffered writer and only the built-in receivers, ``rpc_finished`` is sent on
    the event loop as the call ends: no task of its own (a shielded task per call cost more
    than the receivers), and the row is the same."""
    from asgiref.sync import sync_to_async

    from django_rpc_audit.writers import flush

    rpc_settings(WRITE_MODE="buffered")
    client = get_rpc_client()
    await client.acall("test.echo", {"n": 0})  # warm: the writer and its thread exist
    loop = asyncio.get_running_loop()
    tasks = []
    default_factory = loop.get_task_factory()

    def counting_factory(loop, coro, **kwargs):
        tasks.append(coro)
        if default_factory is not None:
            return default_factory(loop, coro, **kwargs)
        return asyncio.Task(coro, loop=loop, **kwargs)

    loop.set_task_factory(counting_factory)
    try:
        assert await client.acall("test.echo", {"n": 1}) == {"echo": {"n": 1}}
    finally:
        loop.set_task_factory(default_factory)
    assert tasks == []
    assert await sync_to_async(flush)(30)
    assert await RPCLog.objects.filter(status="success").acount() == 2


@pytest.mark.django_db(transaction=True)
@pytest.mark.asyncio
async def test_cancelled_acall_with_only_the_built_in_receivers_keeps_its_row(
    local_handler, rpc_settings
):
    """The report sent on the loop cannot be interrupted by the cancellation: the row says
    how the call ended."""
    from asgiref.sync import sync_to_async

    from django_rpc_audit.writers import flush

    rpc_settings(WRITE_MODE="buffered")
    await cancel_a_hanging_acall(local_handler)
    assert await sync_to_async(flush)(30)
    log = await RPCLog.objects.aget()
    assert (log.status, log.error_code) == ("failed", "cancelled")


def test_send_robust_on_loop_calls_every_receiver_or_none():
    """All loop-safe receivers: each called, their responses returned. One that is not (or an
    async one): ``None``, and none of them called, so ``asend_robust`` sends to them all."""
    from django_rpc_audit.signals import loop_safe

    signal = RPCSignal()
    heard: list[str] = []
    safe = loop_safe()(lambda sender, **kwargs: heard.append("safe") or "ok")
    signal.connect(safe, weak=False)
    assert signal.send_robust_on_loop(sender=RPCClient, n=1) == [(safe, "ok")]
    assert heard == ["safe"]

    def blocking(sender, **kwargs):
        heard.append("blocking")

    signal.connect(blocking, weak=False)
    assert signal.send_robust_on_loop(sender=RPCClient, n=1) is None
    assert heard == ["safe"]
    signal.disconnect(blocking)

    async def asynchronous(sender, **kwargs):
        heard.append("async")

    signal.connect(asynchronous, weak=False)
    assert signal.send_robust_on_loop(sender=RPCClient, n=1) is None
    assert heard == ["safe"]


@pytest.mark.usefixtures("echo_handler")
def test_receivers_connected_or_disconnected_between_calls_are_heard_or_not(signals):
    """The signals cache their live receivers per sender: connecting and disconnecting
    between calls still takes effect at the next call."""
    heard: list[str] = []

    def late(sender, **kwargs):
        heard.append(kwargs["method"])

    client = get_rpc_client()
    client.call("test.echo")
    rpc_finished.connect(late, dispatch_uid="tests.late")
    try:
        client.call("test.echo", {"n": 1})
    finally:
        rpc_finished.disconnect(dispatch_uid="tests.late")
    client.call("test.echo", {"n": 2})
    assert heard == ["test.echo"]
    assert len(signals.finished) == 3


@pytest.mark.parametrize("sender", [None, "a string", RPCClient])
def test_the_signals_take_any_sender(sender):
    """Their receivers are cached by sender, yet a project may send them with any sender
    (``None`` in its own tests, say), and each send reaches the receivers connected then."""
    signal = RPCSignal()
    heard: list[Any] = []

    def receiver(sender, **kwargs):
        heard.append(sender)

    for _ in range(2):
        signal.send(sender=sender)
        signal.send_robust(sender=sender)
    signal.connect(receiver, weak=False)
    signal.send(sender=sender)
    signal.send_robust(sender=sender)
    signal.disconnect(receiver)
    signal.send(sender=sender)
    assert heard == [sender, sender]
