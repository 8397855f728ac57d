"""The sanitizer and the size caps: any input becomes JSON the database stores, never an error."""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import json
import math
import uuid
from collections import deque
from datetime import UTC
from typing import Any

import pydantic
import pytest
from django.contrib.auth import get_user_model
from django.db import transaction
from django.utils import timezone
from django.utils.translation import gettext_lazy
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from django_rpc_audit.models import RPCLog
from django_rpc_audit.sanitize import (
    MAX_DEPTH,
    TRUNCATED_KEY,
    cap_json,
    cap_text,
    clean_text,
    json_size,
    sanitize,
)
from django_rpc_audit.writers.sink import record_finished

pytestmark = pytest.mark.django_db


def is_strict_json(value: Any) -> bool:
    """Encodable without NaN, and free of what PostgreSQL's JSONB refuses."""
    text = json.dumps(value, allow_nan=False)
    text.encode("utf-8")  # raises on a lone surrogate
    return not _has_nul(value)


def _has_nul(value: Any) -> bool:
    """A NUL character in any string of ``value``. (Not the text "\\u0000" in its JSON: a
    string holding a backslash followed by "u0000" is dumped as "\\\\u0000", which contains it.)"""
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_has_nul(key) or _has_nul(item) for key, item in value.items())
    if isinstance(value, list):
        return any(_has_nul(item) for item in value)
    return False


@dataclasses.dataclass
class Point:
    x: int
    when: datetime.date


class Money(pydantic.BaseModel):
    amount: decimal.Decimal
    currency: str


class Opaque:
    def __repr__(self) -> str:
        return "<Opaque thing>"


class BrokenRepr:
    def __repr__(self) -> str:
        raise RuntimeError("no repr for you")


def test_every_odd_type_becomes_json():
    user = get_user_model()(pk=7, username="ann")
    value = {
        "when": datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
        "day": datetime.date(2026, 1, 2),
        "at": datetime.time(3, 4),
        "wait": datetime.timedelta(seconds=1.5),
        "amount": decimal.Decimal("1.50"),
        "id": uuid.UUID("12345678-1234-5678-1234-567812345678"),
        "tags": {"b", "a"},
        "frozen": frozenset({3}),
        "tuple": (1, 2),
        "queue": deque([1]),
        "bytes": b"ab\xffc",
        "user": user,
        "point": Point(1, datetime.date(2026, 1, 2)),
        "money": Money(amount=decimal.Decimal("9.99"), currency="EUR"),
        "opaque": Opaque(),
        "broken": BrokenRepr(),
        "lazy": gettext_lazy("hello"),
        "nan": float("nan"),
        "inf": float("inf"),
        "-inf": float("-inf"),
        "nul": "a\x00b",
        "surrogate": "x\ud800y",
        "huge": 10**5000,
        1: "int key",
        None: "none key",
        (1, 2): "tuple key",
    }
    result = sanitize(value)
    assert is_strict_json(result)
    assert result == {
        "when": "2026-01-02T03:04:05Z",
        "day": "2026-01-02",
        "at": "03:04:00",
        "wait": 1.5,
        "amount": "1.50",
        "id": "12345678-1234-5678-1234-567812345678",
        "tags": ["a", "b"],
        "frozen": [3],
        "tuple": [1, 2],
        "queue": [1],
        "bytes": "ab\\xffc",
        "user": {"model": "auth.user", "pk": 7},
        "point": {"x": 1, "when": "2026-01-02"},
        "money": {"amount": "9.99", "currency": "EUR"},
        "opaque": "<Opaque thing>",
        "broken": "<unrepresentable BrokenRepr>",
        "lazy": "hello",
        "nan": "NaN",
        "inf": "Infinity",
        "-inf": "-Infinity",
        "nul": "a\ufffdb",
        "surrogate": "x\ufffdy",
        "huge": f"<integer of {(10**5000).bit_length()} bits>",
        "1": "int key",
        "null": "none key",
        "(1, 2)": "tuple key",
    }


def test_cycles_become_markers_and_siblings_survive():
    cyclic: dict[str, Any] = {"name": "root"}
    cyclic["self"] = cyclic
    shared = [1]
    value = {"a": shared, "b": shared, "cycle": cyclic}
    assert sanitize(value) == {
        "a": [1],
        "b": [1],  # the same list twice is not a cycle
        "cycle": {"name": "root", "self": "<cycle>"},
    }


def test_deep_nesting_is_cut_at_max_depth():
    deep: Any = "bottom"
    for _ in range(MAX_DEPTH * 50):
        deep = [deep]
    result = sanitize(deep)
    assert is_strict_json(result)
    depth = 0
    while isinstance(result, list):
        result, depth = result[0], depth + 1
    assert depth == MAX_DEPTH
    assert result == f"<nested deeper than {MAX_DEPTH} levels>"


def deeply_nested(levels: int, kind: str) -> Any:
    value: Any = "bottom"
    for _ in range(levels):
        value = [value] if kind == "list" else {"k": value}
    return value


@pytest.mark.parametrize("kind", ["list", "dict"])
@pytest.mark.parametrize("levels", [MAX_DEPTH - 1, MAX_DEPTH, MAX_DEPTH + 1, 200])
@pytest.mark.parametrize("path", ["single", "bulk"])
def test_values_nested_at_and_beyond_the_limit_are_stored(kind, levels, path):
    """Every database keeps the deepest value the sanitizer lets through (MariaDB's JSON
    refuses more than 31 levels), by the single-row and the batch writer."""
    from django_rpc_audit.writers.sink import bulk_record_events

    value = deeply_nested(levels, kind)
    started = timezone.now()
    event = {
        "correlation_id": str(uuid.uuid4()),
        "method": "deep.call",
        "params": {"v": value},
        "user": None,
        "caller_ip": None,
        "user_agent": "",
        "started_at": started,
        "status": "success",
        "response": value,
        "error_code": None,
        "error_message": None,
        "duration_ms": 1.0,
        "completed_at": started,
    }
    with transaction.atomic():
        if path == "bulk":
            bulk_record_events(RPCLog.objects.all(), [event])
        else:
            record_finished(RPCLog.objects.all(), **event)
    row = RPCLog.objects.get(correlation_id=event["correlation_id"])
    assert row.params == sanitize({"v": value})
    assert row.response == sanitize(value)


def test_the_original_value_is_not_changed():
    value = {"tags": {"a"}, "nested": {"x": float("nan")}}
    sanitize(value)
    assert value["tags"] == {"a"}
    assert math.isnan(value["nested"]["x"])


def test_clean_text_replaces_nul_and_lone_surrogates():
    assert clean_text("a\x00b\udc80c\U0001f600") == "a\ufffdb\ufffdc\U0001f600"


@pytest.mark.parametrize("size", [10_000, 300_000])
def test_cap_json_keeps_valid_json_and_says_it_was_truncated(size):
    value = {"rows": ["é" * 10 + '"\\' for _ in range(size // 20)]}
    original = json_size(value)
    capped = cap_json(value, 4_096)
    assert json_size(capped) <= 4_096
    assert capped[TRUNCATED_KEY] is True
    assert capped["original_bytes"] == original
    assert capped["preview"].startswith('{"rows":["éééééééééé')
    assert is_strict_json(capped)


def test_cap_json_leaves_small_values_alone():
    assert cap_json({"a": 1}, 128) == {"a": 1}


def test_cap_text_counts_bytes_and_keeps_the_start_and_the_end():
    text = "ü" * 2_500 + "ä" * 2_500  # 10,000 bytes
    capped = cap_text(text, 1_000)
    assert len(capped.encode("utf-8")) <= 1_000
    head, note, tail = capped.partition(" ... [truncated, 10000 bytes] ... ")
    assert note
    assert head.startswith("üüü")
    assert set(head) == {"ü"}
    assert len(head.encode()) > 500
    assert tail.endswith("äää")
    assert set(tail) == {"ä"}
    assert len(tail.encode()) > 250
    assert cap_text("short", 1_000) == "short"


def test_rows_are_capped_by_the_settings(rpc_settings):
    rpc_settings(
        MAX_PARAMS_BYTES=512,
        MAX_RESPONSE_BYTES=256,
        MAX_ERROR_MESSAGE_BYTES=200,
        MAX_USER_AGENT_BYTES=128,
    )
    started = timezone.now()
    record_finished(
        RPCLog.objects.all(),
        correlation_id=str(uuid.uuid4()),
        method="big.call",
        params={"blob": "x" * 10_000},
        user=None,
        caller_ip="10.0.0.1",
        user_agent="UA/" + "y" * 100_000,
        started_at=started,
        status="failed",
        response={"data": list(range(1000))},
        error_code="boom",
        error_message="e" * 5_000,
        duration_ms=1.0,
        completed_at=started,
    )
    row = RPCLog.objects.get()
    assert row.params[TRUNCATED_KEY] is True
    assert row.params["original_bytes"] == json_size({"blob": "x" * 10_000})
    assert json_size(row.params) <= 512
    assert row.response[TRUNCATED_KEY] is True
    assert json_size(row.response) <= 256
    assert len(row.error_message.encode()) <= 200
    assert "[truncated, 5000 bytes]" in row.error_message
    assert row.error_message.startswith("eee")
    assert row.error_message.endswith("eee")
    assert len(row.user_agent.encode()) <= 128
    assert row.user_agent.startswith("UA/yyy")


# -- property tests: arbitrary values are written and read back as valid JSON ----------------

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),  # NaN and infinities included
    st.text(),  # NUL and lone surrogates included
    st.binary(max_size=20),
    st.decimals(),
    st.uuids(),
    st.datetimes(timezones=st.none() | st.just(UTC)),
    st.dates(),
    st.builds(Opaque),
    st.builds(Point, st.integers(), st.dates()),
)
_keys = st.one_of(st.text(max_size=20), st.integers(), st.none(), st.booleans())
_values = st.recursive(
    _scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=5),
        st.tuples(children, children),
        st.frozensets(st.one_of(st.integers(), st.text(max_size=5)), max_size=4),
        st.dictionaries(_keys, children, max_size=5),
    ),
    max_leaves=25,
)


def same_json(stored: Any, expected: Any) -> bool:
    """Equal as JSON; numbers compared as PostgreSQL's numeric returns them."""
    if isinstance(expected, dict):
        return (
            isinstance(stored, dict)
            and stored.keys() == expected.keys()
            and all(same_json(stored[key], expected[key]) for key in expected)
        )
    if isinstance(expected, list):
        return (
            isinstance(stored, list)
            and len(stored) == len(expected)
            and all(same_json(a, b) for a, b in zip(stored, expected, strict=True))
        )
    if isinstance(expected, float | int) and not isinstance(expected, bool):
        return isinstance(stored, float | int) and math.isclose(stored, expected, rel_tol=1e-9)
    return bool(stored == expected)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(params=st.dictionaries(_keys, _values, max_size=6), response=_values, message=st.text())
# A backslash and "u0000" are six plain characters, which PostgreSQL stores (hypothesis found it).
@example(params={"\\u0000": None}, response={"\\u0000": None}, message="\\u0000")
def test_any_value_is_written_and_read_back_as_json(params, response, message):
    started = timezone.now()
    correlation_id = str(uuid.uuid4())
    with transaction.atomic():
        record_finished(
            RPCLog.objects.all(),
            correlation_id=correlation_id,
            method="prop.call",
            params=params,
            user=None,
            caller_ip=None,
            user_agent=message,
            started_at=started,
            status="success",
            response=response,
            error_code=None,
            error_message=message,
            duration_ms=1.0,
            completed_at=started,
        )
    row = RPCLog.objects.get(correlation_id=correlation_id)
    assert is_strict_json(row.params)
    assert is_strict_json(row.response)
    assert same_json(row.params, cap_json(sanitize(params), 65_536))
    assert same_json(row.response, cap_json(sanitize(response), 65_536))
    assert row.error_message == clean_text(message)


@settings(max_examples=100, deadline=None)
@given(value=_values)
def test_sanitize_never_raises_and_is_idempotent(value):
    once = sanitize(value)
    assert is_strict_json(once)
    assert sanitize(once) == once
