"""A receiver of ``rpc_finished`` of this app's own: any app can subscribe to the call signals."""

from __future__ import annotations

import json
import logging
import urllib.request
from typing import Any
from urllib.parse import urlsplit

from django.conf import settings
from django.core.serializers.json import DjangoJSONEncoder

logger = logging.getLogger(__name__)

WEBHOOK_TIMEOUT = 2.0


def post_failure_webhook(
    sender: type,
    *,
    status: str,
    method: str,
    correlation_id: str,
    error_code: str | None,
    error_message: str | None,
    duration_ms: float,
    user: Any,
    caller_ip: str | None,
    **kwargs: Any,
) -> None:
    """Post a JSON notice of every call that did not succeed to ``RPC_FAILURE_WEBHOOK_URL``.

    With no URL set, the notice is only logged. It runs inline, in the caller's thread, so the
    POST has a short timeout; a busy site would hand it to a task queue instead. Errors are
    logged, never raised (``send_robust`` would catch them, but would log a traceback).
    """
    if status == "success":
        return
    summary = f"{method} {status} [{error_code}] {error_message}"
    url = settings.RPC_FAILURE_WEBHOOK_URL
    if not url:
        logger.info("webhook (no URL set): %s", summary)
        return
    parts = urlsplit(url)
    # Webhook URLs often carry a token: name only the host in the logs.
    where = parts.hostname or "?"
    if parts.scheme not in ("http", "https"):
        logger.warning("webhook not sent: RPC_FAILURE_WEBHOOK_URL must be http(s)://")
        return
    notice = {
        "method": method,
        "status": status,
        "error_code": error_code,
        "error_message": error_message,
        "correlation_id": correlation_id,
        "duration_ms": duration_ms,
        "user": user.get_username() if user is not None else None,
        "caller_ip": caller_ip,
    }
    request = urllib.request.Request(
        url,
        data=json.dumps(notice, cls=DjangoJSONEncoder).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=WEBHOOK_TIMEOUT) as reply:
            reply.read()
    except (OSError, ValueError) as exc:  # URLError and HTTPError are OSErrors
        logger.warning("webhook to %s failed (%s): %s", where, exc, summary)
    else:
        logger.info("webhook sent to %s: %s", where, summary)
