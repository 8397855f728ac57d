"""``RPCAuditMiddleware``: the request's user, client IP and user agent, as caller context."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Iterator
from typing import Any, cast

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.conf import settings
from django.http import HttpRequest, HttpResponseBase, StreamingHttpResponse
from ipware import get_client_ip

from django_rpc_audit.conf import get_config
from django_rpc_audit.context import RPCCallerContext, reset_caller_context, set_caller_context
from django_rpc_audit.forwarded import (
    first_header,
    forwarded_client,
    peer_address,
    trusted_networks,
)
from django_rpc_audit.sanitize import cap_text, clean_text

logger = logging.getLogger(__name__)

_IPWARE_SETTINGS = ("IPWARE_META_PRECEDENCE_ORDER", "IPWARE_META_PROXY_COUNT")
#: The header reverse proxies append the address they saw to; ``IPWARE_META_PRECEDENCE_ORDER``
#: names others. Not ipware's default list, most of whose headers a proxy passes through as
#: the client sent them.
_FORWARDED_HEADERS = ("HTTP_X_FORWARDED_FOR",)


def client_ip(request: HttpRequest) -> str | None:
    """The client IP of ``request``.

    With ``TRUSTED_PROXY_IPS``, a forwarded header counts only when the peer (``REMOTE_ADDR``)
    is one of them, and the client is the right-most address that is not
    (:func:`~django_rpc_audit.forwarded.forwarded_client`). Without it, django-ipware decides
    when its ``IPWARE_META_PROXY_COUNT`` / ``IPWARE_META_PRECEDENCE_ORDER`` settings are set
    (by ``X-Forwarded-For`` alone unless the precedence setting names other headers). With
    none of them, proxy headers are ignored: any client can forge them. Whenever no forwarded
    address is vouched for, the socket peer (``REMOTE_ADDR``) is recorded.
    """
    meta = request.META
    peer = peer_address(meta.get("REMOTE_ADDR"))
    trusted = get_config().trusted_proxy_ips
    try:
        if trusted:
            if peer is not None:
                names = getattr(settings, "IPWARE_META_PRECEDENCE_ORDER", _FORWARDED_HEADERS)
                header = first_header(meta, [name for name in names if name != "REMOTE_ADDR"])
                client = forwarded_client(peer, header, trusted_networks(trusted))
                if client is not None:
                    return str(client)
        elif any(hasattr(settings, name) for name in _IPWARE_SETTINGS):
            order = None
            if not hasattr(settings, "IPWARE_META_PRECEDENCE_ORDER"):
                order = (*_FORWARDED_HEADERS, "REMOTE_ADDR")
            ip, _routable = get_client_ip(request, request_header_order=order)
            if ip is not None:
                return str(ip)
    except ValueError:
        logger.warning(
            "django-ipware is misconfigured; the caller IP is not recorded.", exc_info=True
        )
        return None
    except Exception:  # odd headers must never break the request
        logger.warning("Could not read the client IP; it is not recorded.", exc_info=True)
        return None
    return None if peer is None else str(peer)


def user_agent_of(request: HttpRequest) -> str:
    """The request's ``User-Agent``, capped at ``MAX_USER_AGENT_BYTES``, safe to store.

    Header values arrive as latin-1 decoded text (WSGI and ASGI alike), so bytes that are not
    UTF-8 show up as latin-1 characters; NUL and lone surrogates (from servers that decode with
    ``surrogateescape``) become U+FFFD, since PostgreSQL refuses them.
    """
    raw = request.META.get("HTTP_USER_AGENT", "")
    text = raw if isinstance(raw, str) else str(raw)
    return cap_text(clean_text(text), get_config().max_user_agent_bytes)


def caller_context_for(request: HttpRequest) -> RPCCallerContext:
    """The caller context of ``request``. The user is read from the request when a call is
    made (lazily: the session is not read here), so ``login()`` / ``logout()`` count."""
    return RPCCallerContext(
        caller_ip=client_ip(request), user_agent=user_agent_of(request), request=request
    )


def _streamed_in_context(response: HttpResponseBase, context: RPCCallerContext) -> HttpResponseBase:
    """A streamed body is produced after the middleware returned (by the server, chunk by
    chunk): produce each chunk inside the request's context, so calls made meanwhile are
    attributed too. A ``FileResponse`` of a real file is left as it is (no code of the
    project's runs while it is read, and servers may send the file with ``sendfile``)."""
    if not isinstance(response, StreamingHttpResponse) or (
        getattr(response, "file_to_stream", None) is not None
    ):
        return response
    content = response.streaming_content
    if response.is_async:
        chunks = cast("AsyncIterator[bytes]", content)
        response.streaming_content = _achunks_in_context(chunks, context)
    else:
        response.streaming_content = _chunks_in_context(cast("Iterator[bytes]", content), context)
    return response


def _chunks_in_context(chunks: Iterable[Any], context: RPCCallerContext) -> Iterator[Any]:
    iterator = iter(chunks)
    while True:
        token = set_caller_context(context)
        try:
            chunk = next(iterator)
        except StopIteration:
            return
        finally:
            reset_caller_context(token)
        yield chunk


async def _achunks_in_context(
    chunks: AsyncIterable[Any], context: RPCCallerContext
) -> AsyncIterator[Any]:
    iterator = aiter(chunks)
    while True:
        token = set_caller_context(context)
        try:
            chunk = await anext(iterator)
        except StopAsyncIteration:
            return
        finally:
            reset_caller_context(token)
        yield chunk


class RPCAuditMiddleware:
    """Attribute every RPC call made while handling a request to that request.

    Place it after ``AuthenticationMiddleware``. Works under WSGI and ASGI; the context is
    reset when the response is returned, also when the view raises.
    """

    sync_capable = True
    async_capable = True

    def __init__(
        self,
        get_response: Callable[[HttpRequest], HttpResponseBase]
        | Callable[[HttpRequest], Awaitable[HttpResponseBase]],
    ) -> None:
        self.get_response = get_response
        self.async_mode = iscoroutinefunction(get_response)
        if self.async_mode:
            markcoroutinefunction(self)

    def __repr__(self) -> str:
        return f"<RPCAuditMiddleware get_response={self.get_response!r}>"

    def __call__(self, request: HttpRequest) -> Any:
        if self.async_mode:
            return self.__acall__(request)
        context = caller_context_for(request)
        token = set_caller_context(context)
        try:
            response = self.get_response(request)
        finally:
            reset_caller_context(token)
        return _streamed_in_context(response, context)  # type: ignore[arg-type]

    async def __acall__(self, request: HttpRequest) -> HttpResponseBase:
        context = caller_context_for(request)
        token = set_caller_context(context)
        try:
            response: HttpResponseBase = await self.get_response(request)  # type: ignore[misc]
        finally:
            reset_caller_context(token)
        return _streamed_in_context(response, context)
