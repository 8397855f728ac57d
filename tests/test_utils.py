"""Helpers: URL redaction (JSON-safe copies are tested in test_sanitize.py)."""

from __future__ import annotations

import pytest

from django_rpc_audit.utils import redact_url


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://:s3cret@cache:6379/2", "redis://:***@cache:6379/2"),
        ("redis://user:s3cret@cache/2", "redis://user:***@cache/2"),
        ("rediss://u:s3cret@[::1]:6380/0", "rediss://u:***@[::1]:6380/0"),
        ("redis://cache:6379/2", "redis://cache:6379/2"),
    ],
)
def test_redact_url(url, expected):
    assert redact_url(url) == expected
