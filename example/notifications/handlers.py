"""In-process stand-ins for the django-ipc server's methods, used when ``TRANSPORT`` is ``"local"``.

They take the same params and answer in the same shape as the real server, so the views and
the demo do not care which one answers. Imported by ``NotificationsConfig.ready()``.
"""

from __future__ import annotations

import asyncio
import zlib
from datetime import UTC, datetime
from typing import Any

from django_rpc_audit.exceptions import RPCRemoteError
from django_rpc_audit.transports import local_handler


@local_handler("system.ping")
async def ping(params: dict[str, Any]) -> dict[str, Any]:
    """``{"message": str, "delay_ms": 0..5000}``: answer after ``delay_ms``, as django-ipc does.

    A large ``delay_ms`` is how the demo gets timeouts, here and against the real server. The
    handler is ``async`` so that ``acall()`` cancels it at the timeout instead of waiting.
    """
    message = str(params.get("message", "ping"))
    delay_ms = int(params.get("delay_ms", 0))
    if not 0 <= delay_ms <= 5000:
        raise ValueError(f"delay_ms must be between 0 and 5000, not {delay_ms}")
    if delay_ms:
        await asyncio.sleep(delay_ms / 1000)
    return {
        "pong": message,
        "delay_ms": delay_ms,
        "server_time": datetime.now(UTC).isoformat(),
    }


@local_handler("system.echo")
def echo(params: dict[str, Any]) -> dict[str, Any]:
    """``{"data": {...}}``: answer with the data."""
    return {"echo": params["data"]}


def is_online(user_id: str) -> bool:
    """Simulated presence: about one user in four is never connected, always the same ones."""
    return zlib.crc32(user_id.encode()) % 4 != 0


@local_handler("send_notification")
def send_notification(params: dict[str, Any]) -> dict[str, Any]:
    """``{"user_id", "type", "title", "message"}``: deliver to the user's open connections.

    The real server answers an offline user with ``delivered: false``; this one fails the call
    with ``user_offline`` instead, so that the demo shows remote errors without a server.
    """
    user_id = str(params["user_id"])
    for key in ("type", "title", "message"):
        if not isinstance(params.get(key), str):
            raise ValueError(f"{key} must be a string")
    if not is_online(user_id):
        raise RPCRemoteError("user_offline", f"User {user_id} is not connected")
    return {"user_id": user_id, "delivered": True, "connections": 1}
