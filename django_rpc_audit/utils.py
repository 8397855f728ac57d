"""Small helpers shared by several modules: URL redaction, stored datetimes, correlation ids,
per-method rules."""

from __future__ import annotations

import fnmatch
import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import TypeVar

from django.conf import settings
from django.utils import timezone

REDACTED = "***"

_Value = TypeVar("_Value")


def method_rule(rules: Sequence[tuple[str, _Value]], method: str) -> tuple[str, _Value] | None:
    """The ``(pattern, value)`` rule that applies to ``method``, as every per-method setting
    matches: its exact name first, else the first glob pattern (:func:`fnmatch.fnmatchcase`)
    matching it in the order written; ``None`` when none does.

    >>> method_rule([("reports.*", 2), ("reports.daily", 3)], "reports.daily")
    ('reports.daily', 3)
    >>> method_rule([("reports.*", 2), ("*", 1)], "reports.weekly")
    ('reports.*', 2)
    """
    for rule in rules:
        if rule[0] == method:
            return rule
    for rule in rules:
        if fnmatch.fnmatchcase(method, rule[0]):
            return rule
    return None


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
