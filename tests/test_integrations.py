"""The seam between the client and the integrations: building it from the settings, bounded
labels, trace context spliced into the request, failures kept from the caller."""

from __future__ import annotations

import dataclasses
import json
import logging
import uuid
from dataclasses import replace
from typing import Any

import pytest

from django_rpc_audit import get_rpc_client
from django_rpc_audit.integrations import build_instrumentation
from django_rpc_audit.integrations.base import (
    OTHER,
    CallProbe,
    Instrumentation,
    LabelBound,
    TracedCall,
    encode_wire_fields,
    with_wire_fields,
    with_wire_members,
)
from django_rpc_audit.models import RPCLog
from django_rpc_audit.transports import RPCRequest

pytestmark = pytest.mark.django_db


def request(body: dict[str, Any] | None = None) -> RPCRequest:
    message = body or {"type": "rpc", "method": "m", "params": {"a": [1, 2]}, "timeout": 5}
    return RPCRequest("m", {"a": [1, 2]}, "cid", "list:response:cid", 5.0, json.dumps(message))


def test_label_bound_passes_the_first_values_then_other():
    bound = LabelBound(2)
    assert [bound(v) for v in ("a", "b", "c", "a", "d", "b")] == ["a", "b", OTHER, "a", OTHER, "b"]


def test_label_bound_cuts_long_values():
    assert LabelBound(5)("x" * 10_000) == "x" * 255


def test_trace_fields_are_spliced_into_the_encoded_message():
    original = request()
    traced = with_wire_fields(
        original, {"traceparent": "00-" + "a" * 32 + "-" + "b" * 16 + "-01", "tracestate": "k=v"}
    )
    assert json.loads(traced.body) == {
        **json.loads(original.body),
        "traceparent": "00-" + "a" * 32 + "-" + "b" * 16 + "-01",
        "tracestate": "k=v",
    }
    assert (traced.method, traced.params, traced.correlation_id) == ("m", {"a": [1, 2]}, "cid")


def test_trace_fields_never_replace_the_protocols_own_or_carry_non_strings():
    original = request()
    hostile = {"method": "evil", "reply_to": "list:response:someone-else", "n": 3, "ok": "1"}
    traced = with_wire_fields(original, hostile)  # type: ignore[arg-type]
    message = json.loads(traced.body)
    assert message["method"] == "m"
    assert "reply_to" not in message
    assert "n" not in message
    assert message["ok"] == "1"
    # Text that needs escaping stays valid JSON.
    odd = with_wire_fields(original, {"tracestate": 'a="b",\\c\n}'})
    assert json.loads(odd.body)["tracestate"] == 'a="b",\\c\n}'
    assert with_wire_fields(original, {}) is original


def test_spliced_request_keeps_every_other_field_as_it_was():
    """The splice spells the request's fields out: a field added to ``RPCRequest`` and not
    carried over fails here."""
    ticket = object()
    original = RPCRequest(
        "m",
        {"a": 1},
        "cid",
        "list:response:cid",
        2.5,
        '{"a":1}',
        {"params_bytes": 7},
        ticket,  # type: ignore[arg-type]
    )
    spliced = with_wire_members(original, '"traceparent":"tp"')
    assert spliced.body == '{"a":1,"traceparent":"tp"}'
    for field in dataclasses.fields(RPCRequest):
        if field.name != "body":
            assert getattr(spliced, field.name) is getattr(original, field.name), field.name
    # The transport records reply sizes in ``wire``: the client reads them from either.
    assert spliced.wire is original.wire
    assert with_wire_members(original, "") is original
    assert with_wire_members(replace(original, body="not json"), '"a":"b"').body == "not json"


def test_encoded_wire_fields_are_json_members():
    members = encode_wire_fields({"traceparent": "tp", "tracestate": 'a="b"\\'})
    assert json.loads("{" + members + "}") == {"traceparent": "tp", "tracestate": 'a="b"\\'}
    assert encode_wire_fields({"type": "evil", "n": 3}) == ""  # type: ignore[dict-item]


class FailingTracer:
    def __init__(self, fail_on: str) -> None:
        self.fail_on = fail_on
        self.ended: list[Any] = []

    def start(self, method: str) -> TracedCall:
        if self.fail_on == "start":
            raise RuntimeError("start failed")
        return TracedCall(span=object(), trace_id="t" * 32, span_id="s" * 16)

    def wire_fields(self, traced: TracedCall) -> str:
        if self.fail_on == "wire":
            raise RuntimeError("inject failed")
        return '"traceparent":"tp"'

    def end(self, span: Any, *args: Any) -> None:
        if self.fail_on == "end":
            raise RuntimeError("end failed")
        self.ended.append(span)


@pytest.mark.parametrize("fail_on", ["start", "wire", "end"])
def test_a_failing_tracer_never_raises(fail_on, caplog):
    tracer = FailingTracer(fail_on)
    instrumentation = Instrumentation(tracer, [], max_methods=10)
    probe = instrumentation.start(request())
    assert isinstance(probe, CallProbe)
    probe.finish("success", None, None, 1.0)
    if fail_on == "start":
        assert probe.span is None  # not traced, the request unchanged
        assert probe.request.body == request().body
    if fail_on == "wire":
        assert probe.trace_id == "t" * 32  # still traced, nothing on the wire
        assert "traceparent" not in json.loads(probe.request.body)
        assert tracer.ended == [probe.span]
    assert "the call is unaffected" in caplog.text


def test_failures_are_logged_first_then_at_decades(caplog):
    instrumentation = Instrumentation(FailingTracer("start"), [], max_methods=10)
    with caplog.at_level(logging.WARNING, logger="django_rpc_audit.integrations"):
        for _ in range(150):
            instrumentation.start(request())
    assert [r.args[1] for r in caplog.records] == [1, 10, 100]


def test_a_part_that_cannot_be_set_up_is_left_out_and_calls_go_on(
    rpc_settings, echo_handler, monkeypatch, caplog
):
    from django_rpc_audit.integrations import prometheus

    def broken(self: Any) -> None:
        raise ValueError("PROMETHEUS_MULTIPROC_DIR is not a directory")

    monkeypatch.setattr(prometheus.PrometheusCallRecorder, "__init__", broken)
    rpc_settings(PROMETHEUS_METRICS=True)

    assert get_rpc_client().call("test.echo", {"a": 1}) == {"echo": {"a": 1}}
    assert get_rpc_client().instrumentation is None
    assert RPCLog.objects.get().status == "success"
    assert "Could not set up RPC call metrics or traces" in caplog.text


def test_a_missing_package_turns_its_integration_off(
    rpc_settings, echo_handler, hide_package, caplog
):
    from django_rpc_audit.conf import get_config

    hide_package("opentelemetry")
    rpc_settings(OTEL_TRACES=True, PROMETHEUS_METRICS=True)

    instrumentation = build_instrumentation(get_config())
    assert instrumentation is not None
    assert instrumentation.tracer is None
    assert [type(r).__name__ for r in instrumentation.recorders] == ["PrometheusCallRecorder"]
    assert "django-rpc-audit[otel] is not installed" in caplog.text
    assert get_rpc_client().call("test.echo") == {"echo": {}}


@pytest.mark.redis
def test_rate_limited_calls_are_traced_and_counted_and_the_sent_one_carries_its_context(
    rpc_settings, redis_transport, redis_client, otel_sdk
):
    """With rate limits on, the trace context is added before the limiter's script sends the
    request; a refused call is a failed span and a ``rate_limited`` count."""
    from prometheus_client import REGISTRY

    from django_rpc_audit.exceptions import RPCRateLimitedError

    prefix = f"rpc_audit_test:{uuid.uuid4().hex}:rl:"
    method = f"limited.{uuid.uuid4().hex[:8]}"
    rpc_settings(
        OTEL_TRACES=True,
        PROMETHEUS_METRICS=True,
        RATE_LIMITS={method: "1/minute"},
        RATE_LIMIT_KEY_PREFIX=prefix,
    )
    try:
        sent = get_rpc_client().fire_and_forget(method)
        with pytest.raises(RPCRateLimitedError) as refused:
            get_rpc_client().fire_and_forget(method)
    finally:
        for key in redis_client.scan_iter(f"{prefix}*"):
            redis_client.delete(key)

    ((_, fields),) = redis_client.xrange(redis_transport)  # only the first was sent
    message = json.loads(fields[b"payload"])
    assert message["correlation_id"] == sent
    ok_span, refused_span = otel_sdk.spans()
    assert message["traceparent"].split("-")[2] == f"{ok_span.context.span_id:016x}"
    assert refused_span.status.status_code.name == "ERROR"
    assert refused_span.attributes["error.type"] == refused.value.code
    labels = {"method": method, "status": "rate_limited", "error_type": refused.value.code}
    assert REGISTRY.get_sample_value("rpc_audit_calls_total", labels) == 1
    assert RPCLog.objects.get(status="rate_limited").trace_id == (
        f"{refused_span.context.trace_id:032x}"
    )
