"""Standard Webhooks signatures: ``webhook-id``, ``webhook-timestamp``, ``webhook-signature``.

The signed content is ``{id}.{timestamp}.{body}`` (the body's exact bytes), the signature
``v1,<base64 of its HMAC-SHA256>`` under the key a ``whsec_`` secret holds. Receivers verify
it with any Standard Webhooks library (``standardwebhooks`` on PyPI, Svix's SDKs).
"""

from __future__ import annotations

import base64
import hashlib
import hmac


def signature(key: bytes, webhook_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` entry of ``body``: ``v1,<base64 HMAC-SHA256>``."""
    signed = f"{webhook_id}.{timestamp}.".encode() + body
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    return f"v1,{base64.b64encode(digest).decode('ascii')}"


def signed_headers(key: bytes, webhook_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """The headers of one delivery attempt (without a signature when there is no key)."""
    headers = {
        "Content-Type": "application/json",
        "webhook-id": webhook_id,
        "webhook-timestamp": str(timestamp),
    }
    if key:
        headers["webhook-signature"] = signature(key, webhook_id, timestamp, body)
    return headers
