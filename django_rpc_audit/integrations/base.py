"""The seam between the client and the integrations: an :class:`Instrumentation` per client,
a :class:`CallProbe` per call. Imports no optional package."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

from django_rpc_audit.transports import RPCRequest

logger = logging.getLogger("django_rpc_audit.integrations")

#: The label of every method (or error type) beyond the bound, as the semantic conventions
#: name an unknown method.
OTHER = "_OTHER"
#: Distinct error types a process uses as metric labels (error codes come from the server).
MAX_ERROR_TYPES = 50
#: Longest label value; longer method names are cut (the ``RPCLog.method`` column's length).
MAX_LABEL_LENGTH = 255

#: Fields of the django-ipc request message; trace context never replaces one of them.
WIRE_FIELDS = frozenset({"type", "method", "params", "correlation_id", "reply_to", "timeout"})


class LabelBound:
    """Keeps a label's cardinality bounded: the first ``limit`` distinct values pass as they
    are, every later one becomes ``_OTHER``. Thread-safe; per process."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, value: str) -> str:
        value = value[:MAX_LABEL_LENGTH]
        if value in self._seen:
            return value
        with self._lock:
            if value not in self._seen:
                if len(self._seen) >= self.limit:
                    return OTHER
                self._seen.add(value)
        return value


class CallTracer(Protocol):
    """Starts and ends the span of a call (OpenTelemetry's is the one built in)."""

    def start(self, method: str) -> TracedCall:
        """Start the span of a call to ``method``; its ids for the row."""
        ...

    def wire_fields(self, traced: TracedCall) -> str:
        """The trace context of the call ``traced`` as JSON members to add to the request
        message (``"traceparent":"00-…"``, encoded as :func:`encode_wire_fields` does), or
        ``""`` for none."""
        ...

    def end(
        self,
        span: Any,
        status: str,
        error_code: str | None,
        error_message: str | None,
        duration_ms: float,
    ) -> None:
        """End ``span`` as the call ended, lasting exactly ``duration_ms``."""
        ...


class CallRecorder(Protocol):
    """Records a finished call into a metrics backend. Labels come bounded."""

    def record(self, method: str, status: str, error_type: str, seconds: float) -> None:
        """``error_type`` is ``""`` for a successful call."""
        ...


class TracedCall(NamedTuple):
    """A started span and the ids the row stores (``None`` unless the trace is sampled).

    A named tuple rather than a dataclass: one is made per traced call, and a tuple is the
    cheapest object to make."""

    span: Any
    trace_id: str | None = None
    span_id: str | None = None


@dataclass(slots=True)
class CallProbe:
    """One call as the integrations see it, from :meth:`Instrumentation.start` to
    :meth:`finish`. ``request`` is what to send: the request with the trace context added."""

    instrumentation: Instrumentation
    request: RPCRequest
    span: Any = None
    trace_id: str | None = None
    span_id: str | None = None

    def finish(
        self, status: str, error_code: str | None, error_message: str | None, duration_ms: float
    ) -> None:
        """End the span and record the metrics; never raises. ``error_message`` is redacted."""
        self.instrumentation.finish(self, status, error_code, error_message, duration_ms)


class Instrumentation:
    """The tracing and metrics of one client, built once from its settings
    (:func:`~django_rpc_audit.integrations.build_instrumentation`).

    Its share of a call is a span started and ended and a few metric updates in memory: spans
    and metrics are exported by the SDK's or prometheus-client's own machinery, never on the
    caller's path. Any exception from a tracer, propagator or metric is logged and swallowed.
    """

    def __init__(
        self, tracer: CallTracer | None, recorders: Sequence[CallRecorder], *, max_methods: int
    ) -> None:
        self.tracer = tracer
        self.recorders = tuple(recorders)
        self.method_label = LabelBound(max_methods)
        self.error_label = LabelBound(MAX_ERROR_TYPES)
        self._failures = 0

    def __repr__(self) -> str:
        parts = [type(part).__name__ for part in (self.tracer, *self.recorders) if part]
        return f"<Instrumentation {' '.join(parts)}>"

    def start(self, request: RPCRequest) -> CallProbe:
        """A probe for the call ``request``: its span started and its trace context added to
        the request message."""
        probe = CallProbe(self, request)
        if self.tracer is not None:
            try:
                traced = self.tracer.start(request.method)
            except Exception:
                self._failed("start the span of")
                return probe
            probe.span, probe.trace_id, probe.span_id = traced
            try:
                members = self.tracer.wire_fields(traced)
                if members:
                    probe.request = with_wire_members(request, members)
            except Exception:
                # The call is still traced; only its server cannot continue the trace.
                self._failed("send the trace context of")
        return probe

    def finish(
        self,
        probe: CallProbe,
        status: str,
        error_code: str | None,
        error_message: str | None,
        duration_ms: float,
    ) -> None:
        if probe.span is not None and self.tracer is not None:
            try:
                self.tracer.end(probe.span, status, error_code, error_message, duration_ms)
            except Exception:
                self._failed("end the span of")
        if self.recorders:
            try:
                method = self.method_label(probe.request.method)
                error_type = "" if status == "success" else self.error_label(error_code or OTHER)
                seconds = duration_ms / 1000
                for recorder in self.recorders:
                    recorder.record(method, status, error_type, seconds)
            except Exception:
                self._failed("record the metrics of")

    def _failed(self, what: str) -> None:
        # A broken integration fails the same way on every call: log the first failure with
        # its traceback, then at decades (10th, 100th, ...) so the log is not flooded.
        self._failures += 1
        failures = self._failures
        if failures == 1 or str(failures).rstrip("0") == "1":
            logger.warning(
                "Could not %s an RPC call (%d failure(s) so far); the call is unaffected.",
                what,
                failures,
                exc_info=True,
            )


def encode_wire_fields(fields: Mapping[str, str]) -> str:
    """``fields`` (``traceparent``, ``tracestate``) as JSON members to add to a request message:
    ``"traceparent":"…","tracestate":"…"``, or ``""`` when none is left. String fields only, and
    never one of the protocol's own."""
    extra = {
        key: value
        for key, value in fields.items()
        if isinstance(key, str) and isinstance(value, str) and key not in WIRE_FIELDS
    }
    if not extra:
        return ""
    return json.dumps(extra, separators=(",", ":"))[1:-1]


def with_wire_members(request: RPCRequest, members: str) -> RPCRequest:
    """``request`` with the JSON ``members`` (:func:`encode_wire_fields`'s form) added to its
    message.

    The body is already encoded (one JSON object, as ``RPCClient`` makes it): the members are
    spliced in before its closing brace instead of encoding the params a second time.
    """
    body = request.body
    if not members or not body.endswith("}"):
        return request
    # Every field as it is (the same ``wire`` dict, which the transport fills in), the body
    # replaced; spelled out because ``dataclasses.replace`` costs twice as much.
    return RPCRequest(
        request.method,
        request.params,
        request.correlation_id,
        request.reply_to,
        request.timeout,
        f"{body[:-1]},{members}}}",
        request.wire,
        request.rate_limit,
    )


def with_wire_fields(request: RPCRequest, fields: Mapping[str, str]) -> RPCRequest:
    """``request`` with ``fields`` added to its JSON message (``traceparent``, ``tracestate``),
    filtered and encoded by :func:`encode_wire_fields`."""
    return with_wire_members(request, encode_wire_fields(fields))
