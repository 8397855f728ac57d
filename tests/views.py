"""Views the middleware tests drive through the test client."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Iterator

from django.contrib.auth import alogin, alogout, get_user_model, login, logout
from django.http import HttpRequest, JsonResponse, StreamingHttpResponse

from django_rpc_audit import get_rpc_client
from django_rpc_audit.exceptions import RPCError


def sync_call(request: HttpRequest) -> JsonResponse:
    result = get_rpc_client().call("test.echo", {"who": request.GET.get("who", "")})
    return JsonResponse(result)


async def async_call(request: HttpRequest) -> JsonResponse:
    result = await get_rpc_client().acall("test.echo", {"who": request.GET.get("who", "")})
    return JsonResponse(result)


def sync_no_call(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"ok": True})


async def async_no_call(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"ok": True})


class ViewFailed(Exception):
    pass


def sync_raises(request: HttpRequest) -> JsonResponse:
    get_rpc_client().call("test.echo", {"who": "raiser"})
    raise ViewFailed("the view failed after its RPC call")


async def async_raises(request: HttpRequest) -> JsonResponse:
    await get_rpc_client().acall("test.echo", {"who": "raiser"})
    raise ViewFailed("the view failed after its RPC call")


# -- responses streamed after the view returned ------------------------------------------------


def sync_stream(request: HttpRequest) -> StreamingHttpResponse:
    def chunks() -> Iterator[str]:
        for n in range(3):
            yield json.dumps(get_rpc_client().call("test.echo", {"who": f"stream{n}"}))

    return StreamingHttpResponse(chunks())


async def async_stream(request: HttpRequest) -> StreamingHttpResponse:
    async def chunks() -> AsyncIterator[str]:
        for n in range(3):
            yield json.dumps(await get_rpc_client().acall("test.echo", {"who": f"astream{n}"}))

    return StreamingHttpResponse(chunks())


# -- the user changes within the request ------------------------------------------------------


def sync_login_then_call(request: HttpRequest) -> JsonResponse:
    # Looking at the user first caches the anonymous one on the request, as views often do.
    before = request.user.is_authenticated
    get_rpc_client().call("test.echo", {"who": "before-login"})
    login(request, get_user_model().objects.get(username=request.GET["as"]))
    get_rpc_client().call("test.echo", {"who": "after-login"})
    return JsonResponse({"was_authenticated": before})


def sync_logout_then_call(request: HttpRequest) -> JsonResponse:
    get_rpc_client().call("test.echo", {"who": "before-logout"})
    logout(request)
    get_rpc_client().call("test.echo", {"who": "after-logout"})
    return JsonResponse({})


async def async_login_then_call(request: HttpRequest) -> JsonResponse:
    before = (await request.auser()).is_authenticated
    await get_rpc_client().acall("test.echo", {"who": "before-login"})
    user = await get_user_model().objects.aget(username=request.GET["as"])
    await alogin(request, user)
    await get_rpc_client().acall("test.echo", {"who": "after-login"})
    return JsonResponse({"was_authenticated": before})


async def async_logout_then_call(request: HttpRequest) -> JsonResponse:
    await get_rpc_client().acall("test.echo", {"who": "before-logout"})
    await alogout(request)
    await get_rpc_client().acall("test.echo", {"who": "after-logout"})
    return JsonResponse({})


def call_method(request: HttpRequest, method: str) -> JsonResponse:
    """Call ``method``; say how it ended and which process made it (the metrics tests)."""
    try:
        get_rpc_client().call(method, {"who": "web"}, timeout=float(request.GET.get("timeout", 5)))
    except RPCError as exc:
        return JsonResponse({"pid": os.getpid(), "status": "error", "code": exc.code})
    return JsonResponse({"pid": os.getpid(), "status": "success"})
