"""Helpers: URL redaction and JSON-safe copies."""

from __future__ import annotations

import datetime
import decimal
import uuid

import pytest

from django_rpc_audit.utils import redact_url, to_jsonable


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


def test_to_jsonable_keeps_json_and_encodes_django_types():
    value = {
        "n": 1,
        "list": [1, "a", None, True],
        "when": datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.UTC),
        "amount": decimal.Decimal("1.50"),
        "id": uuid.UUID("12345678-1234-5678-1234-567812345678"),
    }
    assert to_jsonable(value) == {
        "n": 1,
        "list": [1, "a", None, True],
        "when": "2026-01-02T03:04:05Z",
        "amount": "1.50",
        "id": "12345678-1234-5678-1234-567812345678",
    }


def test_to_jsonable_falls_back_to_repr():
    class Opaque:
        def __repr__(self) -> str:
            return "<Opaque>"

    assert to_jsonable({"x": Opaque()}) == {"x": "<Opaque>"}


def test_to_jsonable_survives_cycles_and_nan():
    cyclic: dict = {}
    cyclic["self"] = cyclic
    assert isinstance(to_jsonable(cyclic), str)
    assert isinstance(to_jsonable({"x": float("nan")}), str)
