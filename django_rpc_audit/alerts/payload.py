"""What an alert says: the ``data`` of an event or a digest, and the request body built from it.

Bodies follow Standard Webhooks (``{"type", "timestamp", "data"}``), or Slack's incoming
webhooks (``{"text"}``) for endpoints with ``FORMAT = "slack"``. The call's params and response
are only included when the endpoint opts in, already redacted by the client and capped, so a
body stays under the 20 KB the specification recommends.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from django.core.serializers.json import DjangoJSONEncoder
from django.db import models
from django.urls import NoReverseMatch, reverse
from django.utils.http import urlencode

from django_rpc_audit.alerts.endpoints import EVENT_SLOW, WebhookEndpoint
from django_rpc_audit.sanitize import cap_text, clean_text, stored_json_and_text

#: Largest error message, params and response an alert carries (UTF-8 bytes each).
MAX_MESSAGE_BYTES = 2_048
MAX_PAYLOAD_BYTES = 6_144
#: Correlation ids a digest lists.
DIGEST_SAMPLE_IDS = 5


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _user(user: Any, with_email: bool) -> dict[str, Any] | None:
    if not isinstance(user, models.Model):
        return None
    data: dict[str, Any] = {"id": str(user.pk)}
    get_username = getattr(user, "get_username", None)
    if callable(get_username):
        data["username"] = str(get_username())
    if with_email:
        field = getattr(type(user), "get_email_field_name", None)
        email = getattr(user, field(), None) if callable(field) else None
        data["email"] = str(email) if email else None
    return data


def admin_url(
    base: str, viewname: str, *, args: list[Any] | None = None, **query: Any
) -> str | None:
    """``base`` plus the admin page ``viewname`` (with a query string); ``None`` without a base
    or when the admin is not installed."""
    if not base:
        return None
    try:
        path = reverse(viewname, args=args)
    except NoReverseMatch:
        return None
    suffix = f"?{urlencode(query)}" if query else ""
    return f"{base.rstrip('/')}{path}{suffix}"


def event_data(
    endpoint: WebhookEndpoint,
    event_type: str,
    event: Mapping[str, Any],
    log_id: uuid.UUID,
    admin_base_url: str,
) -> dict[str, Any]:
    """The ``data`` of the alert of one finished call (``rpc_finished``'s arguments)."""
    message = event.get("error_message")
    data: dict[str, Any] = {
        "method": str(event["method"]),
        "status": event.get("status"),
        "error_code": event.get("error_code"),
        "error_message": None
        if message is None
        else cap_text(clean_text(str(message)), MAX_MESSAGE_BYTES),
        "duration_ms": event.get("duration_ms"),
        "correlation_id": str(event["correlation_id"]),
        "user": _user(event.get("user"), endpoint.include_user_email),
        "started_at": _iso(event.get("started_at")),
        "completed_at": _iso(event.get("completed_at")),
        "admin_url": admin_url(
            admin_base_url, "admin:django_rpc_audit_rpclog_change", args=[log_id]
        ),
    }
    slow = event.get("slow")
    if event_type == EVENT_SLOW and slow is not None:
        data["threshold_ms"] = slow.threshold_ms
        data["baseline_ms"] = slow.baseline_ms
        data["baseline_mad_ms"] = slow.mad_ms
        data["baseline_samples"] = slow.samples
        data["threshold_rule"] = slow.rule
    if endpoint.include_params:
        data["params"] = stored_json_and_text(event.get("params"), MAX_PAYLOAD_BYTES)[0]
    if endpoint.include_response:
        data["response"] = stored_json_and_text(event.get("response"), MAX_PAYLOAD_BYTES)[0]
    return data


def digest_data(
    *,
    event_type: str,
    method: str,
    error_code: str,
    count: int,
    first_at: datetime,
    last_at: datetime,
    window_seconds: float,
    correlation_ids: list[str],
    admin_base_url: str,
) -> dict[str, Any]:
    """The ``data`` of a digest: further occurrences within one storm-control window."""
    query: dict[str, Any] = {"method": method, "created_at__gte": first_at.isoformat()}
    if event_type == EVENT_SLOW:
        query["is_slow__exact"] = "1"
    else:
        query["status__exact"] = "timeout" if event_type == "rpc.timeout" else "failed"
    return {
        "event": event_type,
        "method": method,
        "error_code": error_code or None,
        "count": count,
        "first_at": first_at.isoformat(),
        "last_at": last_at.isoformat(),
        "window_seconds": window_seconds,
        "correlation_ids": correlation_ids,
        "admin_url": admin_url(admin_base_url, "admin:django_rpc_audit_rpclog_changelist", **query),
    }


def digest_type(event_type: str) -> str:
    """The ``type`` of a digest of ``event_type`` alerts: ``rpc.failed.digest``."""
    return f"{event_type}.digest"


def body(endpoint: WebhookEndpoint, type_: str, timestamp: datetime, data: dict[str, Any]) -> bytes:
    """The request body: Standard Webhooks' envelope, or Slack's ``{"text"}``."""
    if endpoint.format == "slack":
        payload: dict[str, Any] = {"text": slack_text(type_, data)}
    else:
        payload = {"type": type_, "timestamp": timestamp.isoformat(), "data": data}
    return json.dumps(payload, cls=DjangoJSONEncoder, separators=(",", ":")).encode()


def slack_text(type_: str, data: Mapping[str, Any]) -> str:
    """One line for a chat channel (Slack and Mattermost incoming webhooks)."""
    link = f" <{data['admin_url']}|open>" if data.get("admin_url") else ""
    if type_.endswith(".digest"):
        return (
            f":rotating_light: {data['count']} more {data['event']} of `{data['method']}`"
            f" ({data.get('error_code') or '-'}) between {data['first_at']} and "
            f"{data['last_at']}{link}"
        )
    if type_ == EVENT_SLOW:
        return (
            f":snail: `{data['method']}` took {data['duration_ms']:.0f} ms "
            f"(threshold {data.get('threshold_ms', 0):.0f} ms) [{data['correlation_id']}]{link}"
        )
    return (
        f":rotating_light: `{data['method']}` {data['status']}: {data.get('error_code') or '-'}"
        f" {data.get('error_message') or ''} [{data['correlation_id']}]{link}"
    )
