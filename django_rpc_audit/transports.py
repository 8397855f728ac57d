"""Transports carry one RPC request and bring back its reply: Redis (django-ipc) or in-process."""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import math
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias

import redis
import redis.asyncio
from asgiref.sync import async_to_sync, sync_to_async

from django_rpc_audit.exceptions import (
    RPCConnectionError,
    RPCError,
    RPCProtocolError,
    RPCRemoteError,
    RPCTimeoutError,
)
from django_rpc_audit.redaction import redact_text
from django_rpc_audit.utils import redact_url

if TYPE_CHECKING:
    from django_rpc_audit.conf import DjangoCfgRPCConfig
    from django_rpc_audit.ratelimit import RateLimitTicket

logger = logging.getLogger(__name__)

Result: TypeAlias = dict[str, Any]


@dataclass(frozen=True, slots=True)
class RPCRequest:
    """One call as it goes on the wire. ``body`` is the JSON payload, encoded once.

    ``wire`` records what the log needs from the wire: the sizes for its truncation markers,
    ``"params_bytes"`` (set by the client) and ``"reply_bytes"`` (set by the transport), and
    the reply's text as received, ``"reply"`` (a django-ipc reply: the result under
    ``"result"``) or ``"result_text"`` (the result itself), from which the log makes the
    response's stored form off the caller's thread (:class:`~django_rpc_audit.payload.Deferred`).
    ``rate_limit``: the limit check the Redis transport runs in the request's ``XADD`` script.
    """

    method: str
    params: dict[str, Any]
    correlation_id: str
    reply_to: str
    timeout: float
    body: str
    wire: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    rate_limit: RateLimitTicket | None = None


class Transport(Protocol):
    """What :class:`~django_rpc_audit.client.RPCClient` needs from a transport.

    ``call``/``acall`` return the reply's ``result`` (``{}`` when it is null) or raise an
    :class:`~django_rpc_audit.exceptions.RPCError` subclass; ``send`` delivers without waiting.
    """

    def call(self, request: RPCRequest) -> Result: ...

    async def acall(self, request: RPCRequest) -> Result: ...

    def send(self, request: RPCRequest) -> None: ...

    def close(self) -> None: ...


def parse_reply(raw: bytes | str, request: RPCRequest) -> Result:
    """Turn a django-ipc reply into the result, or raise what it reports.

    The reply has no ``type`` key: ``success`` says how the call ended, and on failure the
    server's own ``error_code`` and ``error`` are what the caller sees.
    """
    request.wire["reply_bytes"] = len(raw)
    request.wire["reply"] = raw
    try:
        reply = json.loads(raw)
    except ValueError as exc:
        raise RPCProtocolError(f"Reply to {request.method!r} is not JSON.") from exc
    except RecursionError:
        raise RPCProtocolError(f"Reply to {request.method!r} is nested too deeply.") from None
    if not isinstance(reply, dict) or not isinstance(reply.get("success"), bool):
        raise RPCProtocolError(f"Reply to {request.method!r} has no boolean 'success' field.")
    if reply.get("correlation_id") not in (None, request.correlation_id):
        raise RPCProtocolError(
            f"Reply to {request.method!r} carries correlation id {reply['correlation_id']!r}, "
            f"expected {request.correlation_id!r}."
        )
    if not reply["success"]:
        raise RPCRemoteError(
            code=str(reply.get("error_code") or "unknown_error"),
            message=str(reply.get("error") or ""),
        )
    result = reply.get("result")
    if result is None:
        return {}
    if not isinstance(result, dict):
        raise RPCProtocolError(f"Reply to {request.method!r} has a non-object result.")
    return result


_CLIENT_OPTIONS: dict[str, Any] = {
    "socket_connect_timeout": 5,
    # No read timeout: BLPOP's own timeout bounds the wait for a reply. redis-py's default read
    # timeout (5 s) would cut longer waits short as connection errors, and its async client
    # would wrap every command in wait_for, which on Python 3.11 can swallow a cancellation.
    # Keepalive notices a peer that vanished without closing the connection.
    "socket_timeout": None,
    "socket_keepalive": True,
}


def _client_options(redis_url: str) -> dict[str, Any]:
    """redis-py's options for ``redis_url``; keepalive is a TCP option, refused on a Unix socket
    (where the kernel tells a vanished peer at once anyway)."""
    if redis_url.startswith("unix:"):
        return {k: v for k, v in _CLIENT_OPTIONS.items() if k != "socket_keepalive"}
    return _CLIENT_OPTIONS


#: How long past the call's own timeout ``acall`` waits for Redis itself to answer.
REDIS_GRACE_SECONDS = 5.0


class RedisTransport:
    """The django-ipc wire protocol: ``XADD`` to the request stream, ``BLPOP`` the reply list."""

    def __init__(self, config: DjangoCfgRPCConfig) -> None:
        self.redis_url = config.redis_url
        self.request_stream = config.request_stream
        self.stream_maxlen = config.stream_maxlen
        self._lock = threading.Lock()
        self._client: redis.Redis | None = None
        # One asyncio client per event loop: a connection pool cannot cross loops.
        self._async_clients: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, redis.asyncio.Redis
        ] = weakref.WeakKeyDictionary()

    def __repr__(self) -> str:
        return f"<RedisTransport {redact_url(self.redis_url)} stream={self.request_stream!r}>"

    @property
    def client(self) -> redis.Redis:
        """The synchronous redis-py client, created on first use."""
        if self._client is None:
            with self._lock:
                if self._client is None:
                    self._client = redis.Redis.from_url(
                        self.redis_url, **_client_options(self.redis_url)
                    )
        return self._client

    def _async_client(self) -> redis.asyncio.Redis:
        loop = asyncio.get_running_loop()
        client = self._async_clients.get(loop)
        if client is None:
            client = redis.asyncio.Redis.from_url(self.redis_url, **_client_options(self.redis_url))
            self._async_clients[loop] = client
        return client

    def _stream_entry(self, request: RPCRequest) -> dict[str, Any]:
        """``XADD``'s arguments: one field ``payload``, the stream trimmed approximately."""
        return {
            "name": self.request_stream,
            "fields": {"payload": request.body},
            "maxlen": self.stream_maxlen,
            "approximate": True,
        }

    def _enqueue(self, client: redis.Redis, request: RPCRequest) -> None:
        """``XADD`` the request; a rate-limited one goes through its limit's script instead."""
        ticket = request.rate_limit
        if ticket is None or not ticket.add_request(
            client, self.request_stream, self.stream_maxlen, request.body
        ):
            client.xadd(**self._stream_entry(request))

    async def _aenqueue(self, client: redis.asyncio.Redis, request: RPCRequest) -> None:
        ticket = request.rate_limit
        if ticket is None or not await ticket.aadd_request(
            client, self.request_stream, self.stream_maxlen, request.body
        ):
            await client.xadd(**self._stream_entry(request))

    def _connection_error(self, exc: redis.RedisError) -> RPCError:
        # redis-py's own text names host and port, never the password; we still build our own.
        if isinstance(exc, redis.ConnectionError | redis.TimeoutError):
            return RPCConnectionError(
                f"Cannot reach Redis at {redact_url(self.redis_url)}: {type(exc).__name__}."
            )
        # Redis's own error text, redacted like any error message (it may echo arguments).
        detail = redact_text(str(exc))
        return RPCError(f"Redis at {redact_url(self.redis_url)} refused the request: {detail}")

    def call(self, request: RPCRequest) -> Result:
        client = self.client
        try:
            self._enqueue(client, request)
            popped = client.blpop([request.reply_to], timeout=request.timeout)
            if popped is None:
                # A late reply would land in a list nobody reads; drop the key now rather than
                # leave it to the server's 60 s expiry.
                client.delete(request.reply_to)
        except redis.RedisError as exc:
            raise self._connection_error(exc) from exc
        if popped is None:
            raise _timeout(request)
        return parse_reply(popped[1], request)

    async def acall(self, request: RPCRequest) -> Result:
        client = self._async_client()
        try:
            # A Redis that accepts the connection but never answers must not hang the task.
            async with asyncio.timeout(request.timeout + REDIS_GRACE_SECONDS):
                await self._aenqueue(client, request)
                popped = await client.blpop([request.reply_to], timeout=request.timeout)
                if popped is None:
                    await client.delete(request.reply_to)
        except TimeoutError as exc:
            raise RPCConnectionError(
                f"Redis at {redact_url(self.redis_url)} did not answer within "
                f"{request.timeout + REDIS_GRACE_SECONDS:g} s."
            ) from exc
        except redis.RedisError as exc:
            raise self._connection_error(exc) from exc
        if popped is None:
            raise _timeout(request)
        return parse_reply(popped[1], request)

    def send(self, request: RPCRequest) -> None:
        try:
            self._enqueue(self.client, request)
        except redis.RedisError as exc:
            raise self._connection_error(exc) from exc

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        # Async clients are closed with their event loop; dropping them is enough here.
        self._async_clients.clear()


def _timeout(request: RPCRequest) -> RPCTimeoutError:
    return RPCTimeoutError(
        f"No reply to {request.method!r} within {request.timeout:g} s "
        f"(correlation id {request.correlation_id}).",
        timeout=request.timeout,
    )


Handler: TypeAlias = (
    Callable[[dict[str, Any]], Mapping[str, Any] | None]
    | Callable[[dict[str, Any]], Awaitable[Mapping[str, Any] | None]]
)

_local_handlers: dict[str, Handler] = {}


def register_local_handler(method: str, handler: Handler) -> None:
    """Answer calls to ``method`` in this process when ``TRANSPORT`` is ``"local"``.

    The handler takes the params dict and returns a dict (or ``None``); it may be ``async``.
    Raise :class:`~django_rpc_audit.exceptions.RPCRemoteError` to answer with your own error
    code; any other exception is answered as ``internal_error`` with its text, as the
    django-ipc server does.
    """
    if not isinstance(method, str) or not method:
        raise ValueError("The method name must be a non-empty string.")
    if not callable(handler):
        raise TypeError(f"The handler for {method!r} must be callable.")
    _local_handlers[method] = handler


def unregister_local_handler(method: str) -> None:
    """Forget the local handler of ``method`` (no error when there is none)."""
    _local_handlers.pop(method, None)


def local_handler(method: str) -> Callable[[Handler], Handler]:
    """Decorator form of :func:`register_local_handler`.

    ::

        @local_handler("send_notification")
        def send_notification(params):
            return {"delivered": True}
    """

    def decorator(handler: Handler) -> Handler:
        register_local_handler(method, handler)
        return handler

    return decorator


class LocalTransport:
    """Answers calls with functions registered in this process: demos and users' own tests.

    The request and the result go through JSON as they would on the wire. A synchronous
    handler runs in the calling thread and cannot be interrupted: one that runs past the
    timeout is reported as a timeout when it returns. An ``async`` handler awaited by
    ``acall`` is cancelled at the timeout.
    """

    def __repr__(self) -> str:
        return f"<LocalTransport handlers={sorted(_local_handlers)}>"

    def _handler(self, request: RPCRequest) -> tuple[Handler, dict[str, Any]]:
        handler = _local_handlers.get(request.method)
        if handler is None:
            raise RPCRemoteError("internal_error", f"Unknown RPC method: {request.method}")
        params: dict[str, Any] = json.loads(request.body)["params"]
        return handler, params

    def call(self, request: RPCRequest) -> Result:
        handler, params = self._handler(request)
        started = time.monotonic()
        try:
            if inspect.iscoroutinefunction(handler):
                outcome = async_to_sync(handler)(params)
            else:
                outcome = handler(params)
        except RPCRemoteError:
            raise
        except Exception as exc:
            raise RPCRemoteError("internal_error", str(exc)) from exc
        if time.monotonic() - started > request.timeout:
            raise _timeout(request)
        return self._result(outcome, request)

    async def acall(self, request: RPCRequest) -> Result:
        handler, params = self._handler(request)
        started = time.monotonic()
        try:
            if inspect.iscoroutinefunction(handler):
                outcome = await asyncio.wait_for(handler(params), timeout=request.timeout)
            else:
                outcome = await sync_to_async(handler)(params)
        except TimeoutError as exc:
            raise _timeout(request) from exc
        except RPCRemoteError:
            raise
        except Exception as exc:
            raise RPCRemoteError("internal_error", str(exc)) from exc
        if time.monotonic() - started > request.timeout:
            raise _timeout(request)
        return self._result(outcome, request)

    def send(self, request: RPCRequest) -> None:
        try:
            self.call(request)
        except RPCError:
            logger.warning(
                "Local fire-and-forget call to %r failed.", request.method, exc_info=True
            )

    def close(self) -> None:
        pass

    @staticmethod
    def _result(outcome: object, request: RPCRequest) -> Result:
        if outcome is None:
            return {}
        if not isinstance(outcome, Mapping):
            raise RPCProtocolError(
                f"Local handler for {request.method!r} returned {type(outcome).__name__}, "
                "not a dict."
            )
        try:
            text = json.dumps(dict(outcome), allow_nan=False)
            result: Result = json.loads(text)
        except (TypeError, ValueError, RecursionError) as exc:
            raise RPCProtocolError(
                f"Local handler for {request.method!r} returned a result that is not JSON."
            ) from exc
        request.wire["reply_bytes"] = len(text)
        request.wire["result_text"] = text
        return result


def build_transport(config: DjangoCfgRPCConfig) -> Transport:
    """The transport ``config.transport`` names."""
    if config.transport == "local":
        return LocalTransport()
    return RedisTransport(config)


def wire_timeout(timeout: float) -> int:
    """django-ipc's ``timeout`` field takes whole seconds."""
    return max(1, math.ceil(timeout))
