"""Small helpers shared by several modules: URL redaction and JSON-safe copies."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from django.core.serializers.json import DjangoJSONEncoder

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


class _FallbackEncoder(DjangoJSONEncoder):
    """DjangoJSONEncoder (dates, decimals, UUIDs, lazy strings), then ``repr`` for anything else."""

    def default(self, o: Any) -> Any:
        try:
            return super().default(o)
        except TypeError:
            return repr(o)


def to_jsonable(value: Any) -> Any:
    """A copy of ``value`` that a JSON column stores, whatever ``value`` holds.

    Objects JSON cannot express become their ``repr``; circular references and NaN become
    strings rather than errors, so a log row is never lost to an odd value.
    """
    try:
        return json.loads(json.dumps(value, cls=_FallbackEncoder, allow_nan=False))
    except (ValueError, TypeError, RecursionError):
        return repr(value)
