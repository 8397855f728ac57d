"""The RPC client: a call goes through a transport between ``rpc_started`` and ``rpc_finished``."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from django.core.serializers.json import DjangoJSONEncoder

from django_rpc_audit import heldtext
from django_rpc_audit.alerts.slow import SlowVerdict, judge_call, slow_arguments
from django_rpc_audit.conf import MAX_WAIT_SECONDS, DjangoCfgRPCConfig, get_config
from django_rpc_audit.context import aresolve_user, get_caller_context, resolve_user
from django_rpc_audit.exceptions import (
    RPCDisabledError,
    RPCError,
    RPCRateLimitedError,
    RPCTimeoutError,
)
from django_rpc_audit.integrations import build_instrumentation
from django_rpc_audit.integrations.base import CallProbe
from django_rpc_audit.payload import Deferred, Stored, stored, stored_text
from django_rpc_audit.ratelimit import RateLimiter, build_rate_limiter
from django_rpc_audit.redaction import Redactor, get_redactor
from django_rpc_audit.signals import (
    DEFERRED,
    NOBODY,
    EventHandler,
    RPCSignal,
    call_audience,
    rpc_finished,
    rpc_slow,
    rpc_started,
)
from django_rpc_audit.status import RPCStatus
from django_rpc_audit.transports import (
    Result,
    RPCRequest,
    Transport,
    build_transport,
    wire_timeout,
)


@dataclass(slots=True)
class _Outcome:
    """How one call ended, filled in by the call and turned into ``rpc_finished``'s arguments."""

    # Plain strings, as documented for rpc_finished (an enum member hashes by its name).
    status: str = RPCStatus.FAILED.value
    response: Result | None = None
    error_code: str | None = None
    error_message: str | None = None
    slow: SlowVerdict | None = None

    @property
    def result(self) -> Result:
        return self.response if self.response is not None else {}

    def succeed(self, response: Result | None) -> None:
        self.status, self.response = RPCStatus.SUCCESS.value, response

    def record(self, exc: BaseException) -> None:
        timed_out = isinstance(exc, RPCTimeoutError)
        self.status = (RPCStatus.TIMEOUT if timed_out else RPCStatus.FAILED).value
        if isinstance(exc, RPCRateLimitedError):
            self.status = RPCStatus.RATE_LIMITED.value
        if isinstance(exc, RPCError):
            self.error_code, self.error_message = exc.code, exc.message
        elif isinstance(exc, asyncio.CancelledError | KeyboardInterrupt | SystemExit):
            self.error_code, self.error_message = "cancelled", type(exc).__name__
        else:
            self.error_code, self.error_message = "client_error", f"{type(exc).__name__}: {exc}"

    def as_kwargs(
        self,
        duration_ms: float,
        request: RPCRequest,
        redactor: Redactor,
        config: DjangoCfgRPCConfig,
        *,
        readers: int,
    ) -> dict[str, Any]:
        """``rpc_finished``'s own arguments in their stored form: capped, then redacted (the
        caller gets the originals). With no ``readers`` the response's stored form is not
        made; with only ``DEFERRED`` ones, it is left to the
        log writer's thread when it can be (``_deferred_response``)."""
        self.slow = judge_call(request.method, self.status, duration_ms)
        response: Stored | Deferred | None = None
        if self.response is not None and readers != NOBODY:
            rule = redactor.rule_for(request.method).response
            if readers == DEFERRED:
                response = _deferred_response(request, config.max_response_bytes, redactor, rule)
            if response is None:
                response = stored(
                    self.response,
                    config.max_response_bytes,
                    redactor,
                    rule,
                    original_bytes=request.wire.get("reply_bytes"),
                )
                if readers == DEFERRED and _worth_holding(response):
                    response = Deferred.of_stored(response)
        return {
            "status": self.status,
            "response": response.value if isinstance(response, Stored) else response,
            "response_json": response.text if isinstance(response, Stored) else None,
            "error_code": self.error_code,
            "error_message": stored_text(
                self.error_message, config.max_error_message_bytes, redactor
            ),
            "duration_ms": duration_ms,
            "completed_at": datetime.now(UTC),
            "slow": self.slow,
        }


#: The event handlers of ``rpc_started`` and ``rpc_finished`` to call instead of sending them
#: (:func:`~django_rpc_audit.signals.call_audience`), or ``None``: send them.
_Handlers = tuple[EventHandler, EventHandler] | None


class RPCClient:
    """Calls RPC methods on the django-ipc server (or a local handler) and reports each call.

    Get the process-wide instance with :func:`get_rpc_client`. Every call sends
    :data:`~django_rpc_audit.signals.rpc_started` and, exactly once,
    :data:`~django_rpc_audit.signals.rpc_finished`, attributed to the user, IP and user agent
    that :class:`~django_rpc_audit.middleware.RPCAuditMiddleware` (or
    :func:`~django_rpc_audit.context.rpc_context`) captured, unless given explicitly.
    """

    def __init__(self, config: DjangoCfgRPCConfig, transport: Transport | None = None) -> None:
        self.config = config
        self.transport = transport if transport is not None else build_transport(config)
        #: Redacts what the signals carry, by ``REDACT_KEYS`` and ``REDACT_METHODS``.
        self.redactor: Redactor = get_redactor(config.redact_keys, config.redact_methods)
        #: Applies ``RATE_LIMITS``; ``None`` when there are none.
        self.rate_limiter: RateLimiter | None = build_rate_limiter(config, self.transport)
        #: Tracing and metrics (``OTEL_*``, ``PROMETHEUS_METRICS``); ``None`` when all are off.
        self.instrumentation = build_instrumentation(config)

    def __repr__(self) -> str:
        return f"<RPCClient {self.transport!r}>"

    def _request(
        self,
        method: str,
        params: Mapping[str, Any] | None,
        timeout: float | None,
        correlation_id: str | None,
    ) -> RPCRequest:
        """Validate the arguments and encode the wire payload, before anything is sent."""
        if not isinstance(method, str) or not method:
            raise ValueError(f"The RPC method must be a non-empty string, not {method!r}.")
        if params is None:
            params = {}
        elif not isinstance(params, Mapping):
            raise TypeError(
                f"RPC params must be a mapping (the server expects a JSON object), "
                f"not {type(params).__name__}."
            )
        params = dict(params)
        if timeout is None:
            timeout = self.config.rpc_timeout
        elif (
            isinstance(timeout, bool)
            or not isinstance(timeout, int | float)
            or not 0 < timeout <= MAX_WAIT_SECONDS
        ):
            raise ValueError(
                f"timeout must be a positive number of seconds up to {MAX_WAIT_SECONDS:g}, "
                f"not {timeout!r}."
            )
        if correlation_id is None:
            correlation_id = str(uuid.uuid4())
        else:
            # The server drops a request whose id is not a UUID without replying.
            try:
                correlation_id = str(uuid.UUID(str(correlation_id)))
            except ValueError:
                raise ValueError(
                    f"correlation_id must be a UUID string, not {correlation_id!r}."
                ) from None
        reply_to = f"{self.config.response_key_prefix}{correlation_id}"
        encoder = _ParamsEncoder(separators=(",", ":"), allow_nan=False)
        try:
            params_json = encoder.encode(params)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"RPC params for {method!r} cannot be sent as JSON: {exc}") from exc
        except RecursionError:
            raise TypeError(
                f"RPC params for {method!r} cannot be sent as JSON: nested too deeply."
            ) from None
        # The envelope around the params, as json.dumps would write it: the params' own text
        # is encoded once and its size (ASCII: one byte a character) is known for the log.
        body = (
            f'{{"type":"rpc","method":{_WIRE_ENCODER.encode(method)},"params":{params_json},'
            f'"correlation_id":"{correlation_id}","reply_to":{_WIRE_ENCODER.encode(reply_to)},'
            f'"timeout":{wire_timeout(timeout)}}}'
        )
        request = RPCRequest(method, params, correlation_id, reply_to, float(timeout), body)
        request.wire["params_bytes"] = len(params_json)
        # Only JSON types: decoding the body gives the caller's values back, unconverted.
        request.wire["params_plain"] = not encoder.converted
        return request

    def _instrumented(self, request: RPCRequest) -> tuple[RPCRequest, CallProbe | None]:
        """Start the call's span and return the request to send (its trace context added)
        with its probe; the request itself and ``None`` when tracing and metrics are off."""
        if self.instrumentation is None:
            return request, None
        probe = self.instrumentation.start(request)
        return probe.request, probe

    def _started(
        self,
        request: RPCRequest,
        user: Any,
        caller_ip: str | None,
        user_agent: str | None,
        probe: CallProbe | None = None,
    ) -> tuple[dict[str, Any], int, _Handlers]:
        """The keyword arguments of ``rpc_started`` (explicit values win over the context),
        what the signals' receivers read, and the event handlers to call in place of sending
        ``rpc_started`` and ``rpc_finished`` when the built-in log receivers are their only
        ones (:func:`~django_rpc_audit.signals.call_audience`).

        The params are their stored form, capped then redacted
        (:func:`~django_rpc_audit.payload.stored`): the request (already encoded in
        ``request.body``) goes over the wire unchanged, while no receiver ever sees a secret.
        When no receiver would read them, ``params`` and ``params_json`` are left out and the
        signals are not sent; when only the built-in log receivers read them (and the writer
        buffers), the params may be :class:`~django_rpc_audit.payload.Deferred` to the
        writer's thread (``params_json`` then ``None``).
        """
        context = get_caller_context()
        started = {
            "correlation_id": request.correlation_id,
            "method": request.method,
            "user": user,
            "caller_ip": caller_ip if caller_ip is not None else context.caller_ip,
            "user_agent": user_agent if user_agent is not None else context.user_agent,
            "started_at": datetime.now(UTC),
            "trace_id": probe.trace_id if probe is not None else None,
            "span_id": probe.span_id if probe is not None else None,
        }
        readers, handlers = call_audience(type(self))
        if readers == NOBODY:
            return started, readers, None
        rule = self.redactor.rule_for(request.method).params
        cap = self.config.max_params_bytes
        size = request.wire.get("params_bytes")
        if readers == DEFERRED and request.wire.get("params_plain") and _deferrable(size, cap):
            # The body is the wire text: its params decode to the caller's values as they were.
            started["params"] = Deferred(request.body, "params", cap, self.redactor, rule, size)
            started["params_json"] = None
        else:
            params = stored(request.params, cap, self.redactor, rule, original_bytes=size)
            if readers == DEFERRED and _worth_holding(params):
                started["params"], started["params_json"] = Deferred.of_stored(params), None
            else:
                started["params"], started["params_json"] = params.value, params.text
        return started, readers, handlers

    @contextlib.contextmanager
    def _reported(
        self,
        request: RPCRequest,
        started: dict[str, Any],
        readers: int,
        handlers: _Handlers,
        probe: CallProbe | None = None,
    ) -> Iterator[_Outcome]:
        """Send ``rpc_started``, time the block, then send ``rpc_finished`` whatever happened.
        With ``handlers``, hand the two events to them instead (the built-in log receivers'
        work, when they are the only receivers: see
        :func:`~django_rpc_audit.signals.call_audience`).

        Sending ``rpc_started`` is inside the ``try``: an interruption while its receivers run
        (``KeyboardInterrupt``, or a cancellation under :meth:`_areported`) still ends in
        ``rpc_finished``, with no transport time.
        """
        outcome = _Outcome()
        clock: float | None = None
        reported = readers != NOBODY
        try:
            if handlers is not None:
                # A copy: the writer keeps its event, and ``started`` goes on into the next.
                rpc_started.send_event(handlers[0], started.copy())
            elif reported:
                rpc_started.send_robust(sender=type(self), **started)
            clock = time.perf_counter()
            yield outcome
        except BaseException as exc:
            outcome.record(exc)
            raise
        finally:
            duration_ms = 0.0 if clock is None else (time.perf_counter() - clock) * 1000
            finished = outcome.as_kwargs(
                duration_ms, request, self.redactor, self.config, readers=readers
            )
            if probe is not None:
                probe.finish(
                    outcome.status, outcome.error_code, finished["error_message"], duration_ms
                )
            if handlers is not None:
                rpc_finished.send_event(handlers[1], {**started, **finished})
            elif reported:
                rpc_finished.send_robust(sender=type(self), **started, **finished)
            if reported and outcome.slow is not None:
                rpc_slow.send_robust(
                    sender=type(self), **started, **finished, **slow_arguments(outcome.slow)
                )

    @contextlib.asynccontextmanager
    async def _areported(
        self,
        request: RPCRequest,
        started: dict[str, Any],
        readers: int,
        handlers: _Handlers,
        probe: CallProbe | None = None,
    ) -> AsyncIterator[_Outcome]:
        """The ``async`` twin of :meth:`_reported`. The handlers, when given, only buffer (the
        writer buffers: :func:`~django_rpc_audit.signals.call_audience`), so they run on the
        event loop, and nothing awaits around them that a cancellation could interrupt."""
        outcome = _Outcome()
        clock: float | None = None
        reported = readers != NOBODY
        try:
            if handlers is not None:
                rpc_started.send_event(handlers[0], started.copy())
            elif reported:
                await rpc_started.asend_robust(sender=type(self), **started)
            clock = time.perf_counter()
            yield outcome
        except BaseException as exc:
            outcome.record(exc)
            raise
        finally:
            duration_ms = 0.0 if clock is None else (time.perf_counter() - clock) * 1000
            kwargs = outcome.as_kwargs(
                duration_ms, request, self.redactor, self.config, readers=readers
            )
            if probe is not None:
                probe.finish(
                    outcome.status, outcome.error_code, kwargs["error_message"], duration_ms
                )
            if handlers is not None:
                rpc_finished.send_event(handlers[1], {**started, **kwargs})
            elif reported:
                await _report_shielded(rpc_finished, type(self), {**started, **kwargs})
            if reported and outcome.slow is not None:
                slow = slow_arguments(outcome.slow)
                await _report_shielded(rpc_slow, type(self), {**started, **kwargs, **slow})

    def call(
        self,
        method: str,
        params: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
        user: Any = None,
        caller_ip: str | None = None,
        user_agent: str | None = None,
        correlation_id: str | None = None,
    ) -> Result:
        """Call ``method`` and return the reply's ``result`` (``{}`` when it is null).

        ::

            result = get_rpc_client().call("send_notification", {"user_id": "123"})

        ``params`` is any mapping of JSON-encodable values (dates, decimals and UUIDs are
        encoded as Django's ``DjangoJSONEncoder`` does); anything else raises ``TypeError``
        before a request is sent or a signal fired. ``user``, ``caller_ip`` and ``user_agent``
        override what the middleware captured.

        :raises RPCRemoteError: the server answered with an error (its code and text).
        :raises RPCTimeoutError: no reply within ``timeout`` (default ``RPC_TIMEOUT``).
        :raises RPCConnectionError: Redis could not be reached.
        :raises RPCRateLimitedError: over its ``RATE_LIMITS`` limit; nothing was sent.
        :raises RuntimeError: called from a running event loop (use :meth:`acall` there).
        """
        _refuse_on_event_loop("call")
        request = self._request(method, params, timeout, correlation_id)
        if user is None:
            user = resolve_user(get_caller_context())
        request, probe = self._instrumented(request)
        started, readers, handlers = self._started(request, user, caller_ip, user_agent, probe)
        with self._reported(request, started, readers, handlers, probe) as outcome:
            if self.rate_limiter is not None:
                request = self.rate_limiter.limit(request, user, started["caller_ip"])
            outcome.succeed(self.transport.call(request))
        return outcome.result

    async def acall(
        self,
        method: str,
        params: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
        user: Any = None,
        caller_ip: str | None = None,
        user_agent: str | None = None,
        correlation_id: str | None = None,
    ) -> Result:
        """The ``async`` twin of :meth:`call`, on ``redis.asyncio``; never blocks the event loop.

        ::

            result = await get_rpc_client().acall("system.echo", {"data": {"hello": 1}})
        """
        request = self._request(method, params, timeout, correlation_id)
        if user is None:
            user = await aresolve_user(get_caller_context())
        request, probe = self._instrumented(request)
        started, readers, handlers = self._started(request, user, caller_ip, user_agent, probe)
        async with self._areported(request, started, readers, handlers, probe) as outcome:
            if self.rate_limiter is not None:
                request = await self.rate_limiter.alimit(request, user, started["caller_ip"])
            outcome.succeed(await self.transport.acall(request))
        return outcome.result

    def fire_and_forget(self, method: str, params: Mapping[str, Any] | None = None) -> str:
        """Send a call without waiting for its reply; return its correlation id.

        The signals fire as for :meth:`call`. Since no reply is awaited, a successful send is
        reported with ``status="success"`` and ``response=None``: the row records that the
        request reached the stream, not what the server did with it.

        :raises RPCRateLimitedError: over its ``RATE_LIMITS`` limit; nothing was sent.
        """
        _refuse_on_event_loop("fire_and_forget")
        request = self._request(method, params, None, None)
        user = resolve_user(get_caller_context())
        request, probe = self._instrumented(request)
        started, readers, handlers = self._started(request, user, None, None, probe)
        with self._reported(request, started, readers, handlers, probe) as outcome:
            if self.rate_limiter is not None:
                request = self.rate_limiter.limit(request, user, started["caller_ip"])
            self.transport.send(request)
            outcome.succeed(None)
        return request.correlation_id

    def close(self) -> None:
        """Close the transport's (and the rate limiter's) connections."""
        self.transport.close()
        if self.rate_limiter is not None:
            self.rate_limiter.close()


#: Payloads whose wire text is at most this many times their cap are left to the log writer's
#: thread (it holds the text meanwhile, counted in BUFFER_MAX_BYTES); bigger ones are cut to
#: the cap at once, on the caller's thread, so a buffered call holds about its caps.
_DEFER_FACTOR = 2


def _deferrable(size: int | None, cap: int | None) -> bool:
    return size is not None and cap is not None and size <= _DEFER_FACTOR * cap


def _worth_holding(result: Stored) -> bool:
    """Should the buffer keep a payload cut at its cap as its text alone, in recycled memory
    (:meth:`Deferred.of_stored`)? When it is long enough for the copy to spare the caller the
    page faults of holding its own strings."""
    return result.truncated and len(result.text) >= heldtext.MIN_BYTES


def _deferred_response(
    request: RPCRequest, cap: int | None, redactor: Redactor, rule: Any
) -> Deferred | None:
    """The response deferred to the log writer's thread, made from the reply's text as the
    transport received it; ``None`` when the transport kept no text or it is too long."""
    size = request.wire.get("reply_bytes")
    if not _deferrable(size, cap):
        return None
    if "reply" in request.wire:
        return Deferred(request.wire["reply"], "result", cap, redactor, rule, size)
    if "result_text" in request.wire:
        return Deferred(request.wire["result_text"], None, cap, redactor, rule, size)
    return None


async def _report_shielded(signal: RPCSignal, sender: type, named: dict[str, Any]) -> None:
    """Send ``signal`` from ``acall()`` so that a cancelled call still reports how it ended.

    When every receiver runs on the event loop (the built-in ones while the writer only
    buffers), they are called at once: nothing awaits, nothing can be cancelled. Otherwise
    the send is shielded from a second cancellation of the task (a task of its own)."""
    if signal.send_robust_on_loop(sender, **named) is None:
        await asyncio.shield(signal.asend_robust(sender=sender, **named))


def _refuse_on_event_loop(name: str) -> None:
    """Blocking calls on the event loop's thread would stall every other request it serves."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    raise RuntimeError(
        f"RPCClient.{name}() blocks and was called from a running event loop; "
        "use 'await RPCClient.acall()' in async code."
    )


#: The wire's JSON: Django's encoder (dates, decimals, UUIDs), compact, no NaN.
_WIRE_ENCODER = DjangoJSONEncoder(separators=(",", ":"), allow_nan=False)


class _ParamsEncoder(DjangoJSONEncoder):
    """The wire's encoder for one call's params, noting whether a value was converted."""

    converted = False

    def default(self, o: Any) -> Any:
        self.converted = True
        return super().default(o)


_client: RPCClient | None = None
_client_lock = threading.Lock()


def get_rpc_client() -> RPCClient:
    """The process-wide :class:`RPCClient`, built from ``DJANGO_CFG_RPC`` on first use.

    It is rebuilt when the setting changes (``override_settings``, pytest-django's
    ``settings``), so tests can switch transports freely.

    :raises RPCDisabledError: ``DJANGO_CFG_RPC["ENABLED"]`` is false.
    """
    global _client
    client = _client
    if client is None:
        with _client_lock:
            if _client is None:
                config = get_config()
                if not config.enabled:
                    raise RPCDisabledError(
                        "RPC calls are disabled: DJANGO_CFG_RPC['ENABLED'] is false."
                    )
                _client = RPCClient(config)
            client = _client
    return client


def reset_rpc_client() -> None:
    """Close and forget the process-wide client; the next :func:`get_rpc_client` builds anew."""
    global _client
    with _client_lock:
        client, _client = _client, None
    if client is not None:
        client.close()
