"""OpenTelemetry: spans, trace context on the wire, trace ids on rows, the duration histogram.

Against the real SDK (global providers with an in-memory span exporter and metric reader, see
``conftest.OTelSDK``); the request span comes from opentelemetry-instrumentation-django.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from django.test import Client
from opentelemetry import baggage, propagate, trace
from opentelemetry import context as otel_context
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.propagators.textmap import TextMapPropagator, default_setter
from opentelemetry.trace import (
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    StatusCode,
    TraceFlags,
    TraceState,
)
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from django_rpc_audit import get_rpc_client
from django_rpc_audit.exceptions import RPCRemoteError, RPCTimeoutError
from django_rpc_audit.integrations import build_instrumentation
from django_rpc_audit.integrations.otel import (
    DURATION_BUCKETS,
    DURATION_METRIC,
    MIN_CACHED_METHODS,
)
from django_rpc_audit.models import RPCLog
from tests.conftest import OTelSDK

pytestmark = pytest.mark.django_db


@pytest.fixture
def traced(rpc_settings: Callable[..., dict[str, Any]], otel_sdk: OTelSDK) -> OTelSDK:
    """Tracing on, with the local transport and the test's rows written at once."""
    rpc_settings(OTEL_TRACES=True)
    return otel_sdk


@pytest.fixture
def measured(rpc_settings: Callable[..., dict[str, Any]], otel_sdk: OTelSDK) -> OTelSDK:
    rpc_settings(OTEL_METRICS=True)
    return otel_sdk


def unique_method(prefix: str = "otel") -> str:
    """A method name of this test only: the metric reader is cumulative over the session."""
    return f"{prefix}.{uuid.uuid4().hex[:12]}"


def client_spans(sdk: OTelSDK) -> list[Any]:
    return [span for span in sdk.spans() if span.kind is SpanKind.CLIENT]


def span_ids(span: Any) -> tuple[str, str]:
    return trace.format_trace_id(span.context.trace_id), trace.format_span_id(span.context.span_id)


def duration_ms(span: Any) -> float:
    return float((span.end_time - span.start_time) / 1_000_000)


# -- spans ------------------------------------------------------------------------------------


def test_a_call_is_a_client_span_named_after_its_method(traced, echo_handler):
    get_rpc_client().call("test.echo", {"a": 1})

    (span,) = traced.spans()
    assert span.name == "test.echo"
    assert span.kind is SpanKind.CLIENT
    assert dict(span.attributes) == {"rpc.system.name": "django_ipc", "rpc.method": "test.echo"}
    assert span.status.status_code is StatusCode.UNSET
    assert span.parent is None  # no request span around this call
    assert span.instrumentation_scope.name == "django_rpc_audit"


def test_the_row_stores_the_spans_ids_and_its_duration_is_the_spans(traced, echo_handler):
    get_rpc_client().call("test.echo", {"a": 1})

    (span,) = traced.spans()
    log = RPCLog.objects.get()
    assert (log.trace_id, log.span_id) == span_ids(span)
    assert len(log.trace_id) == 32
    assert len(log.span_id) == 16
    # The span lasts exactly what the row says the call lasted (to the nanosecond).
    assert duration_ms(span) == pytest.approx(log.duration_ms, abs=1e-6)


def test_failed_call_has_error_status_type_and_code(traced, local_handler):
    def offline(params: dict[str, Any]) -> None:
        raise RPCRemoteError("user_offline", "User 7 is offline (token=s3cr3t)")

    local_handler("notify.send", offline)

    with pytest.raises(RPCRemoteError):
        get_rpc_client().call("notify.send", {"user_id": "7"})

    (span,) = traced.spans()
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes["error.type"] == "user_offline"
    assert span.attributes["rpc.response.status_code"] == "user_offline"
    # The description is the redacted message, as the row has it: no secret in the trace.
    log = RPCLog.objects.get()
    assert span.status.description == log.error_message
    assert "s3cr3t" not in span.status.description
    assert log.status == "failed"
    assert log.trace_id == span_ids(span)[0]
    assert duration_ms(span) == pytest.approx(log.duration_ms, abs=1e-6)


def test_timed_out_call_has_error_status_and_type_timeout(traced, local_handler):
    local_handler("slow.op", lambda params: time.sleep(0.05))

    with pytest.raises(RPCTimeoutError):
        get_rpc_client().call("slow.op", timeout=0.01)

    (span,) = traced.spans()
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes["error.type"] == "timeout"
    assert RPCLog.objects.get().status == "timeout"


def test_the_status_code_attribute_key_is_configurable(traced, rpc_settings, local_handler):
    def fail(params: dict[str, Any]) -> None:
        raise RPCRemoteError("bad_input", "no")

    local_handler("op.fail", fail)
    rpc_settings(OTEL_STATUS_CODE_ATTRIBUTE="rpc.status_code")
    with pytest.raises(RPCRemoteError):
        get_rpc_client().call("op.fail")
    rpc_settings(OTEL_STATUS_CODE_ATTRIBUTE="")
    with pytest.raises(RPCRemoteError):
        get_rpc_client().call("op.fail")

    renamed, unset = traced.spans()
    assert renamed.attributes["rpc.status_code"] == "bad_input"
    assert "rpc.response.status_code" not in renamed.attributes
    assert "rpc.status_code" not in unset.attributes
    assert "rpc.response.status_code" not in unset.attributes
    assert unset.attributes["error.type"] == "bad_input"


def test_fire_and_forget_is_a_span_too(traced, echo_handler):
    correlation_id = get_rpc_client().fire_and_forget("test.echo", {"x": 1})

    (span,) = traced.spans()
    log = RPCLog.objects.get(correlation_id=correlation_id)
    assert span.name == "test.echo"
    assert log.trace_id == span_ids(span)[0]
    assert duration_ms(span) == pytest.approx(log.duration_ms, abs=1e-6)


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_acall_span_is_a_child_of_the_current_span(traced, echo_handler):
    tracer = trace.get_tracer("tests")
    with tracer.start_as_current_span("task") as parent:
        await get_rpc_client().acall("test.echo", {"a": 1})

    (span,) = client_spans(traced)
    assert span.parent.span_id == parent.get_span_context().span_id
    assert span.context.trace_id == parent.get_span_context().trace_id


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_concurrent_acalls_each_get_their_own_span_and_parent(traced, echo_handler):
    tracer = trace.get_tracer("tests")

    async def task(n: int) -> tuple[int, int]:
        with tracer.start_as_current_span(f"task-{n}") as parent:
            await get_rpc_client().acall("test.echo", {"n": n})
            return parent.get_span_context().span_id, n

    parents = dict(await asyncio.gather(*(task(n) for n in range(20))))
    spans = client_spans(traced)
    assert len(spans) == 20
    assert {span.parent.span_id for span in spans} == set(parents)


# -- the Django request span (opentelemetry-instrumentation-django) ----------------------------


@pytest.fixture
def django_instrumented() -> Iterator[None]:
    from opentelemetry.instrumentation.django import DjangoInstrumentor

    DjangoInstrumentor().instrument()
    try:
        yield
    finally:
        DjangoInstrumentor().uninstrument()


@pytest.mark.parametrize("path", ["/sync/call/", "/async/call/"])
def test_the_span_sits_under_the_django_request_span(
    traced, echo_handler, django_instrumented, path
):
    response = Client().get(path, {"who": "otel"})

    assert response.status_code == 200
    (request_span,) = [span for span in traced.spans() if span.kind is SpanKind.SERVER]
    (call_span,) = client_spans(traced)
    assert call_span.parent is not None
    assert call_span.parent.span_id == request_span.context.span_id
    assert call_span.context.trace_id == request_span.context.trace_id
    log = RPCLog.objects.get()
    assert log.trace_id == trace.format_trace_id(request_span.context.trace_id)
    assert log.span_id == span_ids(call_span)[1]


# -- trace context on the wire ----------------------------------------------------------------


def sent_message(redis_client: redis.Redis, stream: str) -> dict[str, Any]:
    ((_, fields),) = redis_client.xrange(stream)
    message: dict[str, Any] = json.loads(fields[b"payload"])
    return message


@pytest.mark.redis
def test_traceparent_goes_on_the_wire_with_the_spans_context(traced, redis_transport, redis_client):
    correlation_id = get_rpc_client().fire_and_forget("notify.send", {"user_id": "1"})

    (span,) = traced.spans()
    trace_id, span_id = span_ids(span)
    message = sent_message(redis_client, redis_transport)
    flags = span.context.trace_flags
    assert flags.sampled
    assert message["traceparent"] == f"00-{trace_id}-{span_id}-{flags:02x}"
    assert "tracestate" not in message  # none to send
    # The protocol's own fields are untouched.
    assert message["method"] == "notify.send"
    assert message["params"] == {"user_id": "1"}
    assert message["correlation_id"] == correlation_id
    assert span.attributes["server.address"] == "127.0.0.1"
    assert span.attributes["server.port"] == 6379


def remote_parent(flags: int, state: TraceState | None = None) -> Any:
    """Make a span context from an upstream service current, as an HTTP middleware would."""
    parent = SpanContext(
        trace_id=0x0AF7651916CD43DD8448EB211C80319C,
        span_id=0xB7AD6B7169203331,
        is_remote=True,
        trace_flags=TraceFlags(flags),
        trace_state=state,
    )
    return otel_context.attach(trace.set_span_in_context(NonRecordingSpan(parent)))


@pytest.mark.redis
def test_tracestate_goes_on_the_wire_when_present(traced, redis_transport, redis_client):
    token = remote_parent(TraceFlags.SAMPLED, TraceState([("vendor", "abc")]))
    try:
        get_rpc_client().fire_and_forget("notify.send")
    finally:
        otel_context.detach(token)

    message = sent_message(redis_client, redis_transport)
    assert message["tracestate"] == "vendor=abc"
    assert message["traceparent"].startswith("00-0af7651916cd43dd8448eb211c80319c-")
    assert RPCLog.objects.get().trace_id == "0af7651916cd43dd8448eb211c80319c"


@pytest.mark.redis
def test_an_unsampled_trace_is_propagated_but_not_linked_from_the_row(
    traced, redis_transport, redis_client
):
    token = remote_parent(TraceFlags.DEFAULT)  # upstream decided not to sample
    try:
        get_rpc_client().fire_and_forget("notify.send")
    finally:
        otel_context.detach(token)

    message = sent_message(redis_client, redis_transport)
    # The server learns the decision (flags 00), so it does not sample either...
    assert message["traceparent"].startswith("00-0af7651916cd43dd8448eb211c80319c-")
    assert message["traceparent"].endswith("-00")
    assert traced.spans() == []  # ... nothing was recorded here...
    log = RPCLog.objects.get()
    assert (log.trace_id, log.span_id) == ("", "")  # ... so the row links to no trace.


def sdk_wire_fields(span: Any, propagator: Any) -> dict[str, str]:
    """What ``propagator`` writes for ``span`` through the SDK's own path."""
    carrier: dict[str, str] = {}
    propagator.inject(carrier, context=trace.set_span_in_context(span))
    return carrier


@pytest.mark.parametrize(
    "parent",
    [
        pytest.param(None, id="root"),
        pytest.param((TraceFlags.SAMPLED, None), id="sampled-parent"),
        pytest.param((TraceFlags.DEFAULT, None), id="unsampled-parent"),
        pytest.param((TraceFlags.SAMPLED | 0x02, None), id="random-flag"),
        pytest.param(
            (TraceFlags.SAMPLED, TraceState([("vendor", "abc"), ("odd", 'q"u\\o te')])),
            id="tracestate-to-escape",
        ),
    ],
)
def test_the_default_propagators_fields_are_written_as_it_writes_them(
    traced, echo_handler, monkeypatch, parent
):
    """With OpenTelemetry's default propagator (W3C trace context and baggage), the tracer
    writes ``traceparent``/``tracestate`` itself: the very text the SDK's propagator writes,
    without calling it."""
    textmap = propagate.get_global_textmap()
    assert type(textmap).__name__ == "CompositePropagator"  # the default, as set up
    generic_calls: list[Any] = []
    monkeypatch.setattr(textmap, "inject", lambda *a, **k: generic_calls.append(a))
    tracer = get_rpc_client().instrumentation.tracer  # type: ignore[union-attr]
    token = remote_parent(*parent) if parent else None
    try:
        traced_call = tracer.start("otel.fast")
        members = tracer.wire_fields(traced_call)
    finally:
        if token is not None:
            otel_context.detach(token)
        traced_call.span.end()

    assert generic_calls == []  # the fast path
    written = json.loads("{" + members + "}")
    assert written == sdk_wire_fields(traced_call.span, TraceContextTextMapPropagator())
    assert set(written) == (
        {"traceparent", "tracestate"} if parent and parent[1] else {"traceparent"}
    )


def test_baggage_takes_the_propagators_own_path(traced, echo_handler):
    """The default propagator writes ``baggage`` when the context carries some: then the
    tracer leaves the writing to it."""
    token = otel_context.attach(baggage.set_baggage("tenant", "acme"))
    try:
        tracer = get_rpc_client().instrumentation.tracer  # type: ignore[union-attr]
        traced_call = tracer.start("otel.baggage")
        written = json.loads("{" + tracer.wire_fields(traced_call) + "}")
        expected = sdk_wire_fields(traced_call.span, propagate.get_global_textmap())
    finally:
        otel_context.detach(token)
        traced_call.span.end()
    assert written == expected
    assert written["baggage"] == "tenant=acme"
    assert written["traceparent"].split("-")[2] == f"{traced_call.span.context.span_id:016x}"


class VendorPropagator(TextMapPropagator):
    """A propagator of another format (as B3 or a vendor's): its own header."""

    def inject(self, carrier: Any, context: Any = None, setter: Any = default_setter) -> None:
        span_context = trace.get_current_span(context).get_span_context()
        setter.set(carrier, "x-vendor-trace", f"{span_context.trace_id:x}:{span_context.span_id:x}")

    def extract(self, carrier: Any, context: Any = None, getter: Any = None) -> Any:
        return context

    @property
    def fields(self) -> set[str]:
        return {"x-vendor-trace"}


class LoudTraceContext(TraceContextTextMapPropagator):
    """A subclass of the W3C propagator that writes something more: not the default."""

    def inject(self, carrier: Any, context: Any = None, setter: Any = default_setter) -> None:
        super().inject(carrier, context, setter)
        setter.set(carrier, "x-loud", "1")


@pytest.mark.redis
@pytest.mark.parametrize(
    ("propagator", "expected"),
    [
        pytest.param(VendorPropagator(), {"x-vendor-trace"}, id="other-format"),
        pytest.param(
            CompositePropagator([TraceContextTextMapPropagator(), VendorPropagator()]),
            {"traceparent", "x-vendor-trace"},
            id="w3c-and-another",
        ),
        pytest.param(LoudTraceContext(), {"traceparent", "x-loud"}, id="w3c-subclass"),
        pytest.param(TraceContextTextMapPropagator(), {"traceparent"}, id="w3c-alone"),
    ],
)
def test_a_configured_propagator_is_used_from_the_next_call_on(
    traced, redis_transport, redis_client, propagator, expected
):
    client = get_rpc_client()
    client.fire_and_forget("notify.send")  # the default propagator first
    redis_client.delete(redis_transport)
    previous = propagate.get_global_textmap()
    propagate.set_global_textmap(propagator)
    try:
        client.fire_and_forget("notify.send")
    finally:
        propagate.set_global_textmap(previous)

    message = sent_message(redis_client, redis_transport)
    _, span = traced.spans()
    fields = set(message) - {"type", "method", "params", "correlation_id", "reply_to", "timeout"}
    assert fields == expected
    sent = NonRecordingSpan(span.context)  # the exported span, as a live one
    assert {key: message[key] for key in fields} == sdk_wire_fields(sent, propagator)


def test_span_attributes_are_made_once_per_method_and_bounded(traced, echo_handler):
    tracer = get_rpc_client().instrumentation.tracer  # type: ignore[union-attr]
    first = tracer.span_attributes("otel.cached")
    assert tracer.span_attributes("otel.cached") is first
    with pytest.raises(TypeError):
        first["rpc.method"] = "changed"  # type: ignore[index]
    for n in range(MIN_CACHED_METHODS + 500):
        assert tracer.span_attributes(f"otel.many.{n}")["rpc.method"] == f"otel.many.{n}"
    assert len(tracer._method_attributes) == MIN_CACHED_METHODS
    tracer._method_attributes.clear()
    long_method = "otel." + "x" * 10_000  # kept neither for long nor in full
    assert tracer.span_attributes(long_method)["rpc.method"] == long_method
    assert tracer._method_attributes == {}
    # Beyond the bound, a call still gets its own method on its span.
    get_rpc_client().call("test.echo", {"a": 1})
    (span,) = traced.spans()
    assert span.attributes["rpc.method"] == "test.echo"
    assert span.attributes["rpc.system.name"] == "django_ipc"


@pytest.mark.redis
def test_nothing_changes_with_tracing_off(otel_sdk, redis_transport, redis_client):
    assert get_rpc_client().instrumentation is None
    get_rpc_client().fire_and_forget("notify.send", {"user_id": "1"})

    message = sent_message(redis_client, redis_transport)
    assert set(message) == {"type", "method", "params", "correlation_id", "reply_to", "timeout"}
    assert otel_sdk.spans() == []
    assert RPCLog.objects.get().trace_id == ""


# -- the duration histogram -------------------------------------------------------------------


def test_the_histogram_records_each_calls_duration_in_seconds(measured, local_handler):
    method = unique_method()
    local_handler(method, lambda params: {"ok": True})

    def fail(params: dict[str, Any]) -> None:
        raise RPCRemoteError("quota_exceeded", "no")

    failing = unique_method()
    local_handler(failing, fail)
    get_rpc_client().call(method)
    with pytest.raises(RPCRemoteError):
        get_rpc_client().call(failing)

    points = {
        p["point"].attributes["rpc.method"]: p
        for p in measured.data_points(DURATION_METRIC)
        if p["point"].attributes["rpc.method"] in (method, failing)
    }
    ok, failed = points[method], points[failing]
    assert ok["unit"] == "s"
    assert tuple(ok["point"].explicit_bounds) == DURATION_BUCKETS
    assert dict(ok["point"].attributes) == {"rpc.system.name": "django_ipc", "rpc.method": method}
    assert dict(failed["point"].attributes) == {
        "rpc.system.name": "django_ipc",
        "rpc.method": failing,
        "error.type": "quota_exceeded",
        "rpc.response.status_code": "quota_exceeded",
    }
    rows = {log.method: log for log in RPCLog.objects.all()}
    for name, data in ((method, ok), (failing, failed)):
        assert data["point"].count == 1
        assert data["point"].sum == pytest.approx(rows[name].duration_ms / 1000, rel=1e-12)


def test_the_histogram_value_is_the_spans_duration(traced, measured, local_handler):
    method = unique_method()
    local_handler(method, lambda params: {"ok": True})

    get_rpc_client().call(method)

    (span,) = client_spans(traced)
    (point,) = [
        p["point"]
        for p in measured.data_points(DURATION_METRIC)
        if p["point"].attributes["rpc.method"] == method
    ]
    assert point.sum == pytest.approx(duration_ms(span) / 1000, abs=1e-9)


def test_methods_beyond_the_bound_are_recorded_as_other(measured, rpc_settings, local_handler):
    rpc_settings(METRICS_MAX_METHODS=2)
    methods = [unique_method("bound") for _ in range(4)]
    for method in methods:
        local_handler(method, lambda params: {})
        get_rpc_client().call(method)
    get_rpc_client().call(methods[0])  # a known one stays itself

    counts = {
        p["point"].attributes["rpc.method"]: p["point"].count
        for p in measured.data_points(DURATION_METRIC)
        if p["point"].attributes["rpc.method"] in {*methods, "_OTHER"}
    }
    assert counts[methods[0]] == 2
    assert counts[methods[1]] == 1
    assert methods[2] not in counts
    assert methods[3] not in counts
    assert counts["_OTHER"] >= 2  # the other tests' overflow lands there too


# -- failures never reach the caller ----------------------------------------------------------


def test_a_broken_exporter_and_span_processor_never_fail_a_call(traced, echo_handler, caplog):
    traced.broken = True
    with caplog.at_level(logging.WARNING, logger="django_rpc_audit.integrations"):
        for n in range(3):
            assert get_rpc_client().call("test.echo", {"n": n}) == {"echo": {"n": n}}

    assert RPCLog.objects.filter(status="success").count() == 3
    # Each failure was logged by us (the processor's) once, then not for every call.
    ours = [r for r in caplog.records if r.name == "django_rpc_audit.integrations"]
    assert len(ours) == 1
    assert "end the span of" in ours[0].getMessage()


def test_a_broken_propagator_leaves_the_call_traced_and_unharmed(traced, echo_handler, caplog):
    class BrokenPropagator:
        fields: set[str] = set()

        def inject(self, *args: Any, **kwargs: Any) -> None:
            raise ValueError("cannot inject")

        def extract(self, *args: Any, **kwargs: Any) -> Any:
            raise ValueError("cannot extract")

    previous = propagate.get_global_textmap()
    propagate.set_global_textmap(BrokenPropagator())  # type: ignore[arg-type]
    try:
        assert get_rpc_client().call("test.echo", {"a": 1}) == {"echo": {"a": 1}}
    finally:
        propagate.set_global_textmap(previous)

    (span,) = traced.spans()
    assert RPCLog.objects.get().trace_id == span_ids(span)[0]
    assert "send the trace context of" in caplog.text


def test_a_broken_histogram_never_fails_a_call(measured, echo_handler, monkeypatch, caplog):
    class BrokenHistogram:
        def record(self, *args: Any, **kwargs: Any) -> None:
            raise RuntimeError("metrics backend exploded")

    instrumentation = get_rpc_client().instrumentation
    assert instrumentation is not None
    (recorder,) = instrumentation.recorders
    monkeypatch.setattr(recorder, "histogram", BrokenHistogram())

    assert get_rpc_client().call("test.echo", {"a": 1}) == {"echo": {"a": 1}}
    assert RPCLog.objects.get().status == "success"
    assert "record the metrics of" in caplog.text


def test_instrumentation_is_none_when_everything_is_off(settings):
    from django_rpc_audit.conf import get_config

    assert build_instrumentation(get_config()) is None
    assert get_rpc_client().instrumentation is None
