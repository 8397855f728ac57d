"""Views the middleware tests drive through the test client."""

from __future__ import annotations

import os

from django.http import HttpRequest, JsonResponse

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


def call_method(request: HttpRequest, method: str) -> JsonResponse:
    """Call ``method``; say how it ended and which process made it (the metrics tests)."""
    try:
        get_rpc_client().call(method, {"who": "web"}, timeout=float(request.GET.get("timeout", 5)))
    except RPCError as exc:
        return JsonResponse({"pid": os.getpid(), "status": "error", "code": exc.code})
    return JsonResponse({"pid": os.getpid(), "status": "success"})
