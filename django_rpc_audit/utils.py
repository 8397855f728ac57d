"""Small helpers shared by several modules: URL redaction, stored datetimes."""

from __future__ import annotations

from datetime import datetime

from django.conf import settings
from django.utils import timezone

REDACTED = "***"


def redact_url(url: str) -> str:
    """Return ``url`` with no part of its credentials: the password (``user:***@``), a
    password given as a query parameter (``?password=***``), and a password holding an
    unencoded ``@``, ``/``, ``?`` or ``#`` (the userinfo runs to the URL's last ``@``).

    >>> redact_url("redis://:s3cret@cache:6379/2")
    'redis://:***@cache:6379/2'
    >>> redact_url("redis://cache:6379/9?password=s3cret")
    'redis://cache:6379/9?password=***'
    """
    from django_rpc_audit.redaction import redact_text

    scheme, separator, rest = url.partition("://")
    if not separator:
        return redact_text(url)
    at = rest.rfind("@")
    if at >= 0:
        user, colon, _ = rest[:at].partition(":")
        if colon and not any(char in user for char in "/?#"):
            rest = f"{user}:{REDACTED}{rest[at:]}"
        elif colon:
            rest = f"{REDACTED}{rest[at:]}"
    # Query and fragment: values of secret keys (password=..., token=...).
    return redact_text(f"{scheme}://{rest}")


def stored_datetime(value: datetime) -> datetime:
    """Signals carry aware UTC datetimes; a project with ``USE_TZ = False`` stores naive ones."""
    if not settings.USE_TZ and timezone.is_aware(value):
        return timezone.make_naive(value)
    return value
