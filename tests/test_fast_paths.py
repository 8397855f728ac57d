"""The writer's fast paths give exactly what the general code gives: same values, same rows."""

from __future__ import annotations

import enum
import ipaddress
import json
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from django.db import transaction
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from django_rpc_audit.models import RPCLog
from django_rpc_audit.sanitize import (
    MAX_DEPTH,
    MAX_INT_DIGITS,
    cap_json,
    clean_text,
    plain_json_text,
    sanitize,
    stored_json_and_text,
)
from django_rpc_audit.writers.sink import (
    _LOG_ID_NAMESPACE,
    _ip_or_none,
    bulk_record_events,
    call_log_id,
    call_log_id_hex,
)
from tests.test_sanitize import _keys, _values


def compact(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def reference(value: Any, max_bytes: int) -> tuple[Any, str]:
    """The general path: sanitize, cap, dump."""
    capped = cap_json(sanitize(value), max_bytes)
    return capped, compact(capped)


# Plain JSON, the fast path's input, with what it must hand to the general path mixed in:
# NaN, infinities, NUL, lone surrogates, huge integers, non-str keys.
_plain_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=10**MAX_INT_DIGITS - 3, max_value=10**MAX_INT_DIGITS + 3),
    st.floats(),
    st.text(),
    st.sampled_from(["\x00", "\ud800", "a\\u0000", "\\", '"', "é", "\U0001f600"]),
)
_plain = st.recursive(
    _plain_scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=5),
        st.dictionaries(st.text(max_size=10), children, max_size=5),
        st.dictionaries(_keys, children, max_size=3),
    ),
    max_leaves=30,
)
_sizes = st.sampled_from([0, 1, 16, 64, 200, 65_536])


@settings(max_examples=400, deadline=None)
@given(value=st.one_of(_plain, _values), max_bytes=_sizes)
def test_the_fast_path_gives_the_general_paths_value_and_text(value: Any, max_bytes: int) -> None:
    stored, text = stored_json_and_text(value, max_bytes)
    expected, expected_text = reference(value, max_bytes)
    assert text == expected_text
    assert compact(stored) == expected_text
    assert stored == expected or stored != stored  # NaN never reaches the fast path


class Colour(enum.IntEnum):
    RED = 1


class Label(str):
    def __str__(self) -> str:
        return "relabelled"


def nested(levels: int) -> Any:
    value: Any = []
    for _ in range(levels - 1):
        value = [value]
    return value


@pytest.mark.parametrize(
    ("value", "plain"),
    [
        ({"a": [1, 2.5, "x", None, True]}, True),
        ("text", True),
        (nested(MAX_DEPTH), True),
        (nested(MAX_DEPTH + 1), False),  # sanitize cuts it with a marker
        (10**MAX_INT_DIGITS - 1, True),
        (10**MAX_INT_DIGITS, False),
        (float("nan"), False),
        ([float("inf")], False),
        ({"k": "a\x00b"}, False),
        ({"a\x00": 1}, False),
        ("\udc00", False),
        ({1: "a", "1": "b"}, False),  # keys that collide once converted
        ((1, 2), False),
        (Colour.RED, False),
        (Label("x"), False),
    ],
)
def test_what_takes_the_fast_path(value: Any, plain: bool) -> None:
    assert (plain_json_text(value) is not None) is plain
    assert stored_json_and_text(value, 65_536) == reference(value, 65_536)


def test_a_cycle_takes_the_general_path() -> None:
    value: list[Any] = [1]
    value.append(value)
    assert plain_json_text(value) is None
    assert stored_json_and_text(value, 65_536) == reference(value, 65_536)


def test_plain_values_that_do_not_fit_are_capped_like_the_general_path() -> None:
    value = {"blob": "x" * 1000}
    stored, text = stored_json_and_text(value, 200)
    assert stored == cap_json(sanitize(value), 200)
    assert stored["_truncated"] is True
    assert text == compact(stored)


# -- the rows: COPY (PostgreSQL) or bulk_create (SQLite) against the general path's values ----

_text = st.one_of(st.none(), st.text(max_size=30), st.sampled_from(["a\x00b", "\ud800x", "é"]))
_ips = st.one_of(
    st.none(),
    st.sampled_from(["10.0.0.1", "::1", "fe80::1%eth0", "not an ip", "", "2001:db8::1"]),
    st.ip_addresses().map(str),
)


def reference_ip(value: str | None) -> str | None:
    """The caller IP as the code stored it before its cache: parsed each time."""
    if not value:
        return None
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id:
        address = ipaddress.IPv6Address(str(address).partition("%")[0])
    return str(address)


@pytest.mark.django_db(transaction=True)
@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    params=st.one_of(st.none(), _plain, _values),
    response=st.one_of(st.none(), _plain, _values),
    method=_text,
    message=_text,
    agent=_text,
    ip=_ips,
    finished=st.booleans(),
)
def test_bulk_rows_equal_rows_from_the_general_path(
    params: Any,
    response: Any,
    method: str | None,
    message: str | None,
    agent: str | None,
    ip: str | None,
    finished: bool,
) -> None:
    started_at = datetime.now(UTC)
    event: dict[str, Any] = {
        "correlation_id": str(uuid.uuid4()),
        "method": method,
        "params": params,
        "user": None,
        "caller_ip": ip,
        "user_agent": agent,
        "started_at": started_at,
    }
    if finished:
        event.update(
            status="failed",
            response=response,
            error_code=message,
            error_message=message,
            duration_ms=2.5,
            completed_at=started_at,
        )
    bulk_record_events(RPCLog.objects.all(), [event])
    # The same row made by the model from the general path's values, as the code did before
    # the fast paths: sanitize + cap_json, ipaddress, uuid5.
    expected = RPCLog(
        id=uuid.uuid4(),
        correlation_id=event["correlation_id"],
        method=clean_text((method or "").replace("\x00", ""))[:255],
        params=cap_json(sanitize(params), 65_536) if params is not None else {},
        caller_ip=reference_ip(ip),
        user_agent=clean_text(agent or ""),
        created_at=started_at,
    )
    if finished:
        expected.status = "failed"
        expected.response = None if response is None else cap_json(sanitize(response), 65_536)
        expected.error_code = clean_text((message or "").replace("\x00", ""))[:100]
        expected.error_message = clean_text(message or "")
        expected.duration_ms = 2.5
        expected.completed_at = started_at
    with transaction.atomic():
        expected.save(force_insert=True)
    columns = [f.attname for f in RPCLog._meta.concrete_fields if not f.primary_key]
    written = RPCLog.objects.filter(pk=call_log_id(event["correlation_id"], started_at))
    written = written.values(*columns)
    assert list(written) == list(RPCLog.objects.filter(pk=expected.pk).values(*columns))
    RPCLog.objects.all().delete()


@settings(max_examples=200, deadline=None)
@given(
    correlation_id=st.text(st.characters(exclude_categories=["Cs"])),
    started_at=st.datetimes(timezones=st.none() | st.just(UTC)),
)
def test_the_copy_id_is_uuid5s(correlation_id: str, started_at: datetime) -> None:
    expected = uuid.uuid5(_LOG_ID_NAMESPACE, f"{correlation_id}|{started_at.isoformat()}")
    assert call_log_id_hex(correlation_id, started_at) == expected.hex
    assert call_log_id(correlation_id, started_at) == expected


def test_a_cached_ip_is_the_parsed_one() -> None:
    for value in ["10.0.0.1", "::ffff:10.0.0.1", "fe80::1%eth0", "2001:DB8::1", "bogus", "1.2.3"]:
        assert _ip_or_none(value) == reference_ip(value)
        assert _ip_or_none(value) == reference_ip(value)  # from the cache
