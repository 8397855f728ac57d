"""Views that make RPC calls: sync and async, JSON in and out.

None of them passes a user, IP or user agent to the client: ``RPCAuditMiddleware`` puts the
request's in the caller context and every call is logged with them.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from django.http import JsonResponse
from django.views.decorators.http import require_GET, require_POST

from django_rpc_audit import get_rpc_client
from django_rpc_audit.exceptions import RPCError, RPCTimeoutError

if TYPE_CHECKING:
    from django.http import HttpRequest

#: A liveness probe waits a quarter of a second, not the whole RPC_TIMEOUT.
PING_TIMEOUT = 0.25

#: A method the django-ipc server does not have (and neither do the local handlers): every
#: call fails with ``internal_error`` "Unknown RPC method: reports.generate".
REPORT_METHOD = "reports.generate"


def index(request: HttpRequest) -> JsonResponse:
    """What this demo serves."""
    return JsonResponse(
        {
            "admin": "/admin/",
            "sync": ["GET /api/ping/?delay_ms=", "POST /api/notify/", "GET /api/reports/"],
            "async": [
                "GET /api/async/ping/?delay_ms=",
                "POST /api/async/notify/",
                "POST /api/async/echo/",
            ],
        }
    )


# -- helpers shared by the sync and async views ---------------------------------------------


def _ok(result: dict[str, Any]) -> JsonResponse:
    return JsonResponse({"ok": True, "result": result})


def _rpc_error(exc: RPCError) -> JsonResponse:
    """502 when the peer answered badly or could not be reached, 504 when it did not answer."""
    status = 504 if isinstance(exc, RPCTimeoutError) else 502
    return JsonResponse({"ok": False, "error": exc.code, "message": exc.message}, status=status)


def _bad_request(message: str) -> JsonResponse:
    return JsonResponse({"ok": False, "error": "bad_request", "message": message}, status=400)


def _ping_params(request: HttpRequest) -> dict[str, Any]:
    """``system.ping``'s params; ``?delay_ms=`` asks the peer to answer late."""
    delay_ms = request.GET.get("delay_ms", "0")
    if not delay_ms.isdigit() or int(delay_ms) > 5000:
        raise ValueError("delay_ms must be an integer from 0 to 5000.")
    return {"message": "ping", "delay_ms": int(delay_ms)}


def _notification_params(request: HttpRequest) -> dict[str, Any]:
    """``send_notification``'s params, from the form fields ``user_id``, ``title``, ``message``."""
    user_id = request.POST.get("user_id", "").strip()
    if not user_id:
        raise ValueError("user_id is required.")
    return {
        "user_id": user_id,
        "type": "info",
        "title": request.POST.get("title", "Hello"),
        "message": request.POST.get("message", ""),
    }


# -- sync views -----------------------------------------------------------------------------


@require_GET
def ping(request: HttpRequest) -> JsonResponse:
    """Is the RPC server alive? ``GET /api/ping/?delay_ms=500`` makes it answer too late."""
    try:
        params = _ping_params(request)
    except ValueError as exc:
        return _bad_request(str(exc))
    try:
        result = get_rpc_client().call("system.ping", params, timeout=PING_TIMEOUT)
    except RPCError as exc:
        return _rpc_error(exc)
    return _ok(result)


@require_POST
def notify(request: HttpRequest) -> JsonResponse:
    """Push a notification to a user's open websocket connections."""
    try:
        params = _notification_params(request)
    except ValueError as exc:
        return _bad_request(str(exc))
    try:
        result = get_rpc_client().call("send_notification", params)
    except RPCError as exc:
        return _rpc_error(exc)
    return _ok(result)


@require_GET
def reports(request: HttpRequest) -> JsonResponse:
    """Ask the server for a report it cannot make: a failed call on every transport."""
    try:
        result = get_rpc_client().call(REPORT_METHOD, {"period": request.GET.get("period", "day")})
    except RPCError as exc:
        return _rpc_error(exc)
    return _ok(result)


# -- async views ----------------------------------------------------------------------------


@require_GET
async def aping(request: HttpRequest) -> JsonResponse:
    """The ``async`` twin of :func:`ping`."""
    try:
        params = _ping_params(request)
    except ValueError as exc:
        return _bad_request(str(exc))
    try:
        result = await get_rpc_client().acall("system.ping", params, timeout=PING_TIMEOUT)
    except RPCError as exc:
        return _rpc_error(exc)
    return _ok(result)


@require_POST
async def anotify(request: HttpRequest) -> JsonResponse:
    """The ``async`` twin of :func:`notify`."""
    try:
        params = _notification_params(request)
    except ValueError as exc:
        return _bad_request(str(exc))
    try:
        result = await get_rpc_client().acall("send_notification", params)
    except RPCError as exc:
        return _rpc_error(exc)
    return _ok(result)


@require_POST
async def aecho(request: HttpRequest) -> JsonResponse:
    """Send the JSON object in the body through ``system.echo`` and back."""
    try:
        data = json.loads(request.body)
    except ValueError:
        return _bad_request("The body must be JSON.")
    if not isinstance(data, dict):
        return _bad_request("The body must be a JSON object.")
    try:
        result = await get_rpc_client().acall("system.echo", {"data": data})
    except RPCError as exc:
        return _rpc_error(exc)
    return _ok(result)
