"""OpenTelemetry: a CLIENT span per call, its W3C trace context on the wire, and the histogram
``rpc.client.call.duration``, following the RPC semantic conventions (v1.39 and later).

Needs ``opentelemetry-api`` only (``django-rpc-audit[otel]``): spans and measurements go to the
global tracer and meter providers, which the project sets up with the SDK and its exporters.
Without an SDK every span is a no-op and nothing goes on the wire.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from opentelemetry import metrics, propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from django_rpc_audit import __version__
from django_rpc_audit.integrations.base import OTHER, TracedCall

if TYPE_CHECKING:
    from django_rpc_audit.conf import DjangoCfgRPCConfig

#: ``rpc.system.name`` of every span and measurement: a custom value (the conventions allow
#: one for systems they do not list) naming the django-ipc protocol.
SYSTEM_NAME = "django_ipc"
#: Instrumentation scope of the tracer and the meter.
SCOPE = "django_rpc_audit"
#: The histogram's name and its advised bucket boundaries in seconds (the conventions'; the
#: same as prometheus-client's default buckets).
DURATION_METRIC = "rpc.client.call.duration"
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10)
#: Longest span status description (the redacted error message).
MAX_DESCRIPTION = 1024


def server_attributes(config: DjangoCfgRPCConfig) -> dict[str, Any]:
    """``server.address`` / ``server.port`` of the Redis the calls go through, where known."""
    if config.transport != "redis":
        return {}
    parts = urlsplit(config.redis_url)
    if parts.scheme == "unix":
        return {"server.address": parts.path}
    if not parts.hostname:
        return {}
    return {"server.address": parts.hostname, "server.port": parts.port or 6379}


class OTelTracer:
    """Starts a CLIENT span named after the method, a child of the current span (the Django
    request's, under opentelemetry-instrumentation-django), and ends it as the call ended."""

    def __init__(self, config: DjangoCfgRPCConfig) -> None:
        self.tracer = trace.get_tracer(SCOPE, __version__)
        self.attributes: dict[str, Any] = {
            "rpc.system.name": SYSTEM_NAME,
            **server_attributes(config),
        }
        self.status_code_key = config.otel_status_code_attribute

    def start(self, method: str) -> TracedCall:
        span = self.tracer.start_span(
            method, kind=SpanKind.CLIENT, attributes={**self.attributes, "rpc.method": method}
        )
        context = span.get_span_context()
        if not context.is_valid or not context.trace_flags.sampled:
            # Not recorded: the row gets no link to a trace that does not exist (the context
            # still goes on the wire, so that the server does not sample it either).
            return TracedCall(span)
        return TracedCall(
            span,
            trace_id=trace.format_trace_id(context.trace_id),
            span_id=trace.format_span_id(context.span_id),
        )

    def wire_fields(self, span: Any) -> dict[str, str]:
        """``traceparent`` and ``tracestate`` (or what the global propagator writes)."""
        carrier: dict[str, str] = {}
        if span.get_span_context().is_valid:
            propagate.inject(carrier, context=trace.set_span_in_context(span))
        return carrier

    def end(
        self,
        span: Any,
        status: str,
        error_code: str | None,
        error_message: str | None,
        duration_ms: float,
    ) -> None:
        if not span.is_recording():
            span.end()
            return
        if status != "success":
            error_type = error_code or OTHER
            span.set_attribute("error.type", error_type)
            if self.status_code_key:
                span.set_attribute(self.status_code_key, error_type)
            description = (error_message or "")[:MAX_DESCRIPTION] or None
            span.set_status(Status(StatusCode.ERROR, description))
        # The span lasts exactly what the row and the histogram say the call lasted.
        start = getattr(span, "start_time", None)
        if isinstance(start, int):
            span.end(end_time=start + round(duration_ms * 1_000_000))
        else:
            span.end()


@functools.cache
def duration_histogram() -> metrics.Histogram:
    """The process's ``rpc.client.call.duration`` instrument (through the global provider, also
    one set after it was made)."""
    meter = metrics.get_meter(SCOPE, __version__)
    return meter.create_histogram(
        DURATION_METRIC,
        unit="s",
        description="Duration of outgoing RPC calls.",
        explicit_bucket_boundaries_advisory=list(DURATION_BUCKETS),
    )


class OTelDurationRecorder:
    """Records each call's duration in ``rpc.client.call.duration``, in seconds."""

    def __init__(self, config: DjangoCfgRPCConfig) -> None:
        self.histogram = duration_histogram()
        self.attributes: dict[str, Any] = {
            "rpc.system.name": SYSTEM_NAME,
            **server_attributes(config),
        }
        self.status_code_key = config.otel_status_code_attribute

    def record(self, method: str, status: str, error_type: str, seconds: float) -> None:
        attributes = {**self.attributes, "rpc.method": method}
        if error_type:
            attributes["error.type"] = error_type
            if self.status_code_key:
                attributes[self.status_code_key] = error_type
        self.histogram.record(seconds, attributes)
