"""Small helpers shared by several modules: URL redaction."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

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
