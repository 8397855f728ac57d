"""The signals every RPC call sends: :data:`rpc_started` and :data:`rpc_finished` (and
:data:`rpc_slow` for a call slower than its method's normal).

Connect to them like to Django's own signals; the sender is the client class
(:class:`~django_rpc_audit.client.RPCClient`). They are sent with ``send_robust`` /
``asend_robust``: a receiver that raises is logged and never breaks the call. ::

    from django.dispatch import receiver
    from django_rpc_audit.signals import rpc_finished

    @receiver(rpc_finished, dispatch_uid="myapp.alert_on_rpc_failure")
    def alert_on_rpc_failure(sender, *, status, method, error_message, **kwargs):
        if status != "success":
            notify_ops(f"{method} {status}: {error_message}")
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

from asgiref.sync import sync_to_async
from django.dispatch import Signal

_Receiver = TypeVar("_Receiver", bound=Callable[..., Any])
_LOOP_SAFE = "_rpc_audit_loop_safe"
_IDLE = "_rpc_audit_idle_when"
_DEFERS = "_rpc_audit_takes_deferred"
_HANDLES = "_rpc_audit_event_handler"
#: What :func:`handles_events` marks a receiver with: its work, on the signal's arguments as
#: one dict that it may keep (the event).
EventHandler = Callable[[dict[str, Any]], None]


def _always() -> bool:
    return True


def loop_safe(when: Callable[[], bool] = _always) -> Callable[[_Receiver], _Receiver]:
    """Mark a synchronous receiver safe to call on the event loop while ``when()`` is true.

    :meth:`RPCSignal.asend_robust` then calls it directly instead of in a worker thread. Only
    for receivers that never block: the built-in ones are marked for as long as the writer in
    use only buffers the event. ::

        @loop_safe()
        def count_calls(sender, **kwargs):
            CALLS[kwargs["method"]] += 1
    """

    def mark(receiver: _Receiver) -> _Receiver:
        setattr(receiver, _LOOP_SAFE, when)
        return receiver

    return mark


def _is_loop_safe(receiver: Callable[..., Any]) -> bool:
    when = getattr(receiver, _LOOP_SAFE, None)
    return when is not None and bool(when())


def idle_when(when: Callable[[], bool]) -> Callable[[_Receiver], _Receiver]:
    """Mark a receiver that does nothing while ``when()`` is true (the built-in log receivers
    while ``ENABLE_LOGGING`` is off).

    When every live receiver of the call's signals is idle, the client skips building the
    arguments nobody reads (the stored form of params and response) and sends nothing. ::

        @idle_when(lambda: not settings.AUDIT_METRICS)
        def count_calls(sender, **kwargs): ...
    """

    def mark(receiver: _Receiver) -> _Receiver:
        setattr(receiver, _IDLE, when)
        return receiver

    return mark


def takes_deferred_payloads(when: Callable[[], bool]) -> Callable[[_Receiver], _Receiver]:
    """Mark a receiver that accepts ``params`` and ``response`` as
    :class:`~django_rpc_audit.payload.Deferred` (their stored form made later, off the caller's
    thread) while ``when()`` is true: the built-in log receivers, while the writer in use only
    buffers. Not for other receivers: they get the stored form itself, always."""

    def mark(receiver: _Receiver) -> _Receiver:
        setattr(receiver, _DEFERS, when)
        return receiver

    return mark


def handles_events(handler: EventHandler) -> Callable[[_Receiver], _Receiver]:
    """Mark a receiver whose work ``handler`` does, given the signal's keyword arguments as a
    dict it may keep (``signal`` left out): the built-in log receivers. When such a receiver
    is the only live one of ``rpc_started`` and of ``rpc_finished``, and they take deferred
    payloads, :meth:`RPCSignal.send_event` calls the handlers in place of ``send_robust``: no
    other receiver could have seen the signal, and the dispatch cost the caller as much as the
    receivers' work."""

    def mark(receiver: _Receiver) -> _Receiver:
        setattr(receiver, _HANDLES, handler)
        return receiver

    return mark


#: What the receivers of a call's signals need (:func:`call_audience`).
NOBODY, DEFERRED, STORED = 0, 1, 2


def call_audience(sender: Any) -> tuple[int, tuple[EventHandler, EventHandler] | None]:
    """What the live receivers of a call's signals (``rpc_started``, ``rpc_finished``,
    ``rpc_slow``) for ``sender`` read: ``NOBODY`` (none, or all idle: see :func:`idle_when`),
    ``DEFERRED`` (only receivers that take deferred payloads, see
    :func:`takes_deferred_payloads`) or ``STORED`` (a receiver reads the stored form).

    With it, the event handlers (:func:`handles_events`) to call in place of sending
    ``rpc_started`` and ``rpc_finished``: when each of the two has one live receiver, marked,
    and the call's receivers read ``DEFERRED``; else ``None``.
    """
    needs = NOBODY
    handlers: list[EventHandler | None] = []
    for signal in (rpc_started, rpc_finished, rpc_slow):
        if not signal.receivers:
            handlers.append(None)
            continue
        sync_receivers, async_receivers = signal._live_receivers(sender)
        only = sync_receivers[0] if len(sync_receivers) == 1 and not async_receivers else None
        handlers.append(getattr(only, _HANDLES, None))
        for receiver in (*sync_receivers, *async_receivers):
            idle = getattr(receiver, _IDLE, None)
            if idle is not None and idle():
                continue
            defers = getattr(receiver, _DEFERS, None)
            if defers is None or not defers():
                return STORED, None
            needs = DEFERRED
    started, finished = handlers[0], handlers[1]
    if needs != DEFERRED or started is None or finished is None:
        return needs, None
    return needs, (started, finished)


class _SenderCache(weakref.WeakKeyDictionary[Any, Any]):
    """Django's cache of a signal's receivers by sender, for senders of any kind: one that
    cannot be weakly referenced or hashed (``None``, a string) is looked up and stored as
    never cached, where Django's own cache raises ``TypeError``."""

    def get(self, key: Any, default: Any = None) -> Any:
        try:
            return super().get(key, default)
        except TypeError:
            return default

    def __setitem__(self, key: Any, value: Any) -> None:
        with contextlib.suppress(TypeError):
            super().__setitem__(key, value)


class RPCSignal(Signal):
    """A :class:`~django.dispatch.Signal` whose non-blocking receivers skip the thread hop.

    Django's ``asend_robust`` runs every synchronous receiver through ``sync_to_async``: a
    round trip to a worker thread on each send, hundreds of microseconds per ``acall()``.
    Receivers marked :func:`loop_safe` are called on the event loop first; the other
    synchronous receivers then run in the worker thread as usual, and async receivers
    concurrently, as Django does.

    The live receivers are cached by sender (Django's ``use_caching``; ``connect()`` and
    ``disconnect()`` clear the cache): every call sends these signals, and resolving the
    receivers afresh each time cost more than the receivers themselves. Unlike Django's
    cache, any sender may still be used (``sender=None`` in a project's tests, say): those
    that cannot be weakly referenced are not cached.
    """

    def __init__(self) -> None:
        super().__init__(use_caching=True)
        self.sender_receivers_cache = _SenderCache()

    def send_robust_on_loop(
        self, sender: Any, **named: Any
    ) -> list[tuple[Callable[..., Any], Exception | Any]] | None:
        """Send as ``send_robust`` does when every live receiver may run on the event loop
        (synchronous and :func:`loop_safe`), and return their responses; return ``None``,
        calling none of them, when one may not (then use :meth:`asend_robust`).

        Nothing here awaits, so a cancellation of the calling task cannot interrupt it: what
        ``acall()`` uses to report how a call ended without a shielded task per call."""
        if not self.receivers:
            return []
        sync_receivers, async_receivers = self._live_receivers(sender)
        if async_receivers or not all(_is_loop_safe(receiver) for receiver in sync_receivers):
            return None
        return self._call_robustly(sync_receivers, sender, named)

    async def asend_robust(
        self, sender: Any, **named: Any
    ) -> list[tuple[Callable[..., Any], Exception | Any]]:
        """Django's ``asend_robust``, calling :func:`loop_safe` receivers on the event loop."""
        if not self.receivers:
            return []
        sync_receivers, async_receivers = self._live_receivers(sender)
        inline: list[Callable[..., Any]] = []
        threaded: list[Callable[..., Any]] = []
        for receiver in sync_receivers:
            (inline if _is_loop_safe(receiver) else threaded).append(receiver)
        responses = self._call_robustly(inline, sender, named)
        if threaded:
            responses += await sync_to_async(self._call_robustly)(threaded, sender, named)
        if async_receivers:

            async def call(receiver: Callable[..., Any]) -> Any:
                try:
                    return await receiver(signal=self, sender=sender, **named)
                except Exception as err:
                    self._log_robust_failure(receiver, err)  # type: ignore[attr-defined]
                    return err

            results = await asyncio.gather(*(call(r) for r in async_receivers))
            responses += zip(async_receivers, results, strict=True)
        return responses

    def send_event(self, handler: EventHandler, event: dict[str, Any]) -> None:
        """Hand ``event`` to ``handler``, the event handler of this signal's only live receiver
        (:func:`call_audience`): what ``send_robust`` would have that receiver do, without the
        dispatch. An exception is logged as ``send_robust`` logs it, never raised."""
        try:
            handler(event)
        except Exception as err:
            self._log_robust_failure(handler, err)  # type: ignore[attr-defined]

    def _call_robustly(
        self, receivers: list[Callable[..., Any]], sender: Any, named: dict[str, Any]
    ) -> list[tuple[Callable[..., Any], Exception | Any]]:
        responses: list[tuple[Callable[..., Any], Exception | Any]] = []
        for receiver in receivers:
            try:
                responses.append((receiver, receiver(signal=self, sender=sender, **named)))
            except Exception as err:
                self._log_robust_failure(receiver, err)  # type: ignore[attr-defined]
                responses.append((receiver, err))
        return responses


rpc_started = RPCSignal()
"""Sent just before the request goes to the transport.

Keyword arguments:

``correlation_id`` (str)
    The call's id (a uuid4 string unless the caller gave one); also the reply key's suffix.
``method`` (str)
    The RPC method name.
``params`` (dict)
    The parameters in the form the log stores them (:func:`~django_rpc_audit.payload.stored`):
    plain JSON types, ``REDACT_METHODS`` rules applied, values of secret keys (``REDACT_KEYS``)
    and secrets in strings as ``"***"``, and capped at ``MAX_PARAMS_BYTES``: params over the cap
    arrive as the marker ``{"_truncated": true, "original_bytes": ..., "preview": ...}``. The
    wire payload itself is sent unchanged.
``params_json`` (str)
    ``params`` as compact JSON text (what the log row stores).
``user``
    The authenticated user the call is attributed to, or ``None``.
``caller_ip`` (str | None)
    The client IP of the request (django-ipware), or the one given explicitly.
``user_agent`` (str | None)
    The request's ``User-Agent``, or the one given explicitly.
``started_at`` (datetime)
    Aware UTC time the call started.
``trace_id``, ``span_id`` (str | None)
    The call's OpenTelemetry trace and span ids (32 and 16 hex digits) when ``OTEL_TRACES``
    traced it and the trace is sampled; ``None`` otherwise.
"""

rpc_finished = RPCSignal()
"""Sent exactly once for every :data:`rpc_started`, whatever happened (reply, remote error,
timeout, Redis down, cancellation), after the transport returned or raised.

Keyword arguments: all of :data:`rpc_started`'s, plus:

``status`` (str)
    ``"success"``, ``"failed"``, ``"timeout"`` or ``"rate_limited"`` (refused by its rate limit,
    not sent) (:class:`~django_rpc_audit.models.RPCStatus`).
``response`` (dict | None)
    The server's ``result`` on success, in stored form like ``params`` (redacted, capped at
    ``MAX_RESPONSE_BYTES``), else ``None``; the caller gets the whole result.
``response_json`` (str | None)
    ``response`` as compact JSON text, or ``None``.
``error_code`` (str | None)
    The server's ``error_code`` for a remote error, or the client's own code
    (``"timeout"``, ``"connection_error"``, ``"protocol_error"``, ``"cancelled"``, ...); ``None``
    on success.
``error_message`` (str | None)
    The server's ``error`` text, or the client's description, with echoed secrets
    (``token=...``, ``Bearer ...``, URL passwords) redacted and capped at
    ``MAX_ERROR_MESSAGE_BYTES`` (its start and its end kept); ``None`` on success.
``duration_ms`` (float)
    Time spent in the transport, measured with a monotonic clock, sub-millisecond precision.
``completed_at`` (datetime)
    Aware UTC time the call ended.
``slow`` (:class:`~django_rpc_audit.alerts.slow.SlowVerdict` | None)
    Why the call counts as slow (its threshold and its method's baseline), or ``None``: not
    slow, or ``SLOW_CALL_DETECTION`` off. Its row is marked ``is_slow``.
"""

rpc_slow = RPCSignal()
"""Sent after :data:`rpc_finished` for a call slower than its method's recent normal (see
:mod:`django_rpc_audit.alerts.slow`).

Keyword arguments: all of :data:`rpc_finished`'s, plus:

``threshold_ms`` (float)
    The threshold the call crossed: the baseline's ``median + SLOW_CALL_SCORE * 1.4826 *
    MAD``, at least ``SLOW_CALL_MIN_RATIO`` times the median and ``SLOW_CALL_FLOOR_MS``; or
    the method's explicit ``SLOW_CALL_THRESHOLDS_MS`` entry.
``baseline_ms`` (float | None)
    The median duration of the method's recent successful calls (``None`` for an explicit
    threshold with too few samples yet).
"""
