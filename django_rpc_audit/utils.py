"""Small helpers shared by several modules: URL redaction, stored datetimes."""

from __future__ import annotations

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
