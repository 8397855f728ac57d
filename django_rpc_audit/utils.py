"""Small helpers shared by several modules: URL redaction, stored datetimes, correlation ids."""

from __future__ import annotations

import uuid
from datetime import datetime
from urllib.parse import urlsplit, urlunsplit

from django.conf import settings
from django.utils import timezone

REDACTED = "***"


def redact_url(url: str) -> str:
    """Return ``url`` with any password replaced by ``***``.

    >>> redact_url("redis://:s3cret@cache:6379/2")
    'redis://:***@cache:6379/2'
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        port = None
    netloc = f"{user}:{REDACTED}@{host}" + (f":{port}" if port is not None else "")
    return urlunsplit(parts._replace(netloc=netloc))


def stored_datetime(value: datetime) -> datetime:
    """Signals carry aware UTC datetimes; a project with ``USE_TZ = False`` stores naive ones."""
    if not settings.USE_TZ and timezone.is_aware(value):
        return timezone.make_naive(value)
    return value


def canonical_correlation_id(value: str) -> str | None:
    """``value`` spelled as the client writes correlation ids, or ``None`` if it is no UUID.

    The client sends lower-case UUIDs with dashes; other tools print them upper-case, without
    dashes, in braces or as a URN. One spelling lets an exact (indexed) lookup find them all.

    >>> canonical_correlation_id("{9F1C0A3E5B7D4E8FA1B2C3D4E5F60718}")
    '9f1c0a3e-5b7d-4e8f-a1b2-c3d4e5f60718'
    """
    text = value.strip()
    if len(text) > 45:  # "urn:uuid:" and 36 characters; longer input is not parsed at all
        return None
    try:
        return str(uuid.UUID(text))
    except ValueError:
        return None
