"""OpenTelemetry: a CLIENT span per call, its W3C trace context on the wire, and the histogram
``rpc.client.call.duration``, following the RPC semantic conventions (v1.39 and later).

Needs ``opentelemetry-api`` only (``django-rpc-audit[otel]``): spans and measurements go to the
global tracer and meter providers, which the project sets up with the SDK and its exporters.
Without an SDK every span is a no-op and nothing goes on the wire.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from opentelemetry import baggage, metrics, propagate, trace
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from django_rpc_audit import __version__
from django_rpc_audit.integrations.base import (
    MAX_LABEL_LENGTH,
    OTHER,
    TracedCall,
    encode_wire_fields,
)

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
#: Fewest methods whose span attributes a tracer keeps made (``METRICS_MAX_METHODS`` if more).
MIN_CACHED_METHODS = 1000


def default_w3c_propagator(textmap: object) -> tuple[bool, bool]:
    """Whether ``textmap`` is exactly the W3C trace context propagator, alone or composed
    with the W3C baggage propagator only (OpenTelemetry's default, ``OTEL_PROPAGATORS`` =
    ``tracecontext,baggage``); and whether the baggage one is in it. Exact types: a subclass
    or any other propagator may write something else, and takes the generic path."""
    if type(textmap) is TraceContextTextMapPropagator:
        return True, False
    if type(textmap) is not CompositePropagator:
        return False, False
    kinds = [type(propagator) for propagator in getattr(textmap, "_propagators", ())]
    if kinds in (
        [TraceContextTextMapPropagator],
        [TraceContextTextMapPropagator, W3CBaggagePropagator],
    ):
        return True, W3CBaggagePropagator in kinds
    return False, False


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
        # Each method's span attributes, made once (read-only: the SDK copies them into the
        # span, and a sampler only reads them). Bounded in methods and in their length: the
        # others get theirs made per call (two threads may both add one at the bound: a few
        # more at most).
        self._method_attributes: dict[str, Mapping[str, Any]] = {}
        self._max_cached_methods = max(config.metrics_max_methods, MIN_CACHED_METHODS)
        # The global propagator last seen, whether it is exactly the default W3C one and
        # whether it has the baggage one: one tuple, replaced at once (threads share it).
        self._textmap_kind: tuple[object, bool, bool] = (None, False, False)

    def span_attributes(self, method: str) -> Mapping[str, Any]:
        """``rpc.system.name``, ``rpc.method``, ``server.address`` / ``server.port``."""
        attributes = self._method_attributes.get(method)
        if attributes is None:
            attributes = MappingProxyType({**self.attributes, "rpc.method": method})
            if (
                len(self._method_attributes) < self._max_cached_methods
                and len(method) <= MAX_LABEL_LENGTH
            ):
                self._method_attributes[method] = attributes
        return attributes

    def start(self, method: str) -> TracedCall:
        span = self.tracer.start_span(
            method, kind=SpanKind.CLIENT, attributes=self.span_attributes(method)
        )
        context = span.get_span_context()
        if not context.trace_flags.sampled or not context.is_valid:
            # Not recorded: the row gets no link to a trace that does not exist (the context
            # still goes on the wire, so that the server does not sample it either).
            return TracedCall(span)
        # As trace.format_trace_id / format_span_id write them.
        return TracedCall(span, f"{context.trace_id:032x}", f"{context.span_id:016x}")

    def wire_fields(self, traced: TracedCall) -> str:
        """``traceparent`` and ``tracestate`` (or what the global propagator writes), as JSON
        members for the request message.

        The global propagator decides. When it is exactly the default one (W3C trace context,
        with or without W3C baggage, and no baggage in the context), the fields are written
        here as that propagator writes them, without its generic path (a context made, a
        carrier filled, then encoded): same text, about a quarter of the cost.
        """
        span = traced.span
        context = span.get_span_context()
        if not context.is_valid:
            return ""
        if self._fast_w3c():
            trace_id = traced.trace_id or f"{context.trace_id:032x}"
            span_id = traced.span_id or f"{context.span_id:016x}"
            # Hex digits and dashes only: nothing to escape.
            members = f'"traceparent":"00-{trace_id}-{span_id}-{context.trace_flags:02x}"'
            if context.trace_state:
                members += f',"tracestate":{json.dumps(context.trace_state.to_header())}'
            return members
        carrier: dict[str, str] = {}
        propagate.inject(carrier, context=trace.set_span_in_context(span))
        return encode_wire_fields(carrier)

    def _fast_w3c(self) -> bool:
        """Whether the global propagator writes exactly ``traceparent`` / ``tracestate`` now."""
        textmap = propagate.get_global_textmap()
        seen, is_w3c, has_baggage = self._textmap_kind
        if textmap is not seen:
            is_w3c, has_baggage = default_w3c_propagator(textmap)
            self._textmap_kind = (textmap, is_w3c, has_baggage)
        if not is_w3c:
            return False
        # The baggage propagator writes nothing when the context carries no baggage.
        return not (has_baggage and baggage.get_all())

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
