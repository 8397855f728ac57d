"""The stored form: work bounded by what is kept, linear time for every pattern, byte-bounded
buffer.

The linear-time tests compare the CPU time of one input at two sizes, 16 times apart: linear
work grows about 16 times, quadratic work 256 times; the assertion sits at 64, far from both,
and takes the best of several runs (the garbage collector off), so machine noise cannot decide
it; the smaller size is large enough that RE2 runs both in the same engine. No absolute time
limit. tests/test_linear_time.py checks every pattern of the package on its own.
"""

from __future__ import annotations

import gc
import json
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from django_rpc_audit import payload, redaction
from django_rpc_audit.payload import stored, stored_text
from django_rpc_audit.redaction import Redactor, key_words, redact_text
from django_rpc_audit.writers import BufferedLogWriter

SECRET = "s3cr3tVALUE42xyz"

# -- linear time --------------------------------------------------------------------------------

SMALL, FACTOR, LIMIT = 16_000, 16, 64


def _cpu(work: Callable[[], object]) -> float:
    best = float("inf")
    gc.disable()  # its passes grow with the objects alive, not with the work measured
    try:
        for _ in range(5):
            started = time.thread_time()
            work()
            best = min(best, time.thread_time() - started)
    finally:
        gc.enable()
    return max(best, 1e-6)


def _assert_linear(make: Callable[[int], str], work: Callable[[str], object]) -> None:
    small, large = make(SMALL), make(SMALL * FACTOR)
    work(small)  # warm caches (compiled patterns, lru caches)
    ratio = _cpu(lambda: work(large)) / _cpu(lambda: work(small))
    assert ratio < LIMIT, f"work grew {ratio:.0f}x for {FACTOR}x the input: not linear"


#: Pieces of the constructs the patterns look for; hypothesis repeats a unit made of them, the
#: classic shape of input that makes a backtracking engine go quadratic.
_PIECES = [
    "a", "A", "0", " ", "\t", "\n", "=", ":", '"', "'", "\\", "/", "@", "&", ",", "{", "[",
    "://", "http", "token", "Token ", "password", "Bearer ", "Digest ", "api_key", "X-Api-Key",
    "passw", "Authorization: ", "redis://", ":pw@", "-", ".", "é", "\x00",
]  # fmt: skip
_units = st.lists(st.sampled_from(_PIECES), min_size=1, max_size=6).map("".join)


def _repeat(unit: str) -> Callable[[int], str]:
    return lambda size: (unit * (size // len(unit) + 1))[:size]


@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])  # fmt: skip
@given(unit=_units, cut=st.booleans())
def test_redact_text_is_linear_on_repeated_units(unit, cut):
    _assert_linear(_repeat(unit), lambda text: redact_text(text, cut=cut))


@pytest.mark.parametrize(
    "unit",
    [
        "a=",  # the "a=" * n
        "AB:",  # a hex fingerprint
        "a",  # one long run
        "0123456789abcdef",  # hex
        "token=",
        "tokenizer=1 ",
        "a://",
        "x:// @",
        "Bearer ",
        'password: "',
        "Authorization: Token ",
        "http://u:p",
    ],
)
def test_redact_text_is_linear_on_the_known_adversarial_inputs(unit):
    _assert_linear(_repeat(unit), redact_text)
    _assert_linear(_repeat(unit), lambda text: redact_text(text, cut=True))


@pytest.mark.parametrize("unit", ["aB", "a_", "A1", "HTTPAuth", "x" * 50])
def test_key_words_are_linear_in_the_key(unit):
    _assert_linear(_repeat(unit), key_words)


def test_every_pattern_of_the_package_is_covered_here():
    """A new pattern in redaction.py must be added to the tests above (and be RE2 or
    possessive): this lists the ones they exercise."""
    known = {
        "_CAMEL", "_SEPARATORS", "_URL_USERINFO", "_URL_OPEN", "_AUTH_SCHEME", "_SCHEME_PREFIX",
        "_DOUBLE_QUOTED", "_SINGLE_QUOTED", "_REST_OF_LINE", "_BARE_VALUE",
    }  # fmt: skip
    compiled = {
        name
        for name, value in vars(redaction).items()
        if hasattr(value, "finditer") and hasattr(value, "pattern")
    }
    assert compiled == known


# -- the caller's work is bounded by what is stored ----------------------------------------------


@pytest.fixture
def measured_redaction(monkeypatch):
    """Characters the text patterns were given, in all."""
    seen = [0]
    original = payload.redact_text

    def counting(text, *args, **kwargs):
        seen[0] += len(text)
        return original(text, *args, **kwargs)

    monkeypatch.setattr(payload, "redact_text", counting)
    return seen


@pytest.mark.parametrize(
    "value",
    [
        {"blob": "x y=" * 1_000_000},
        {"items": [f"token={n} " for n in range(200_000)]},
        {f"key{n}": "a b:c" for n in range(200_000)},
        {"k" * 4_000_000: "v"},
    ],
    ids=["one long string", "many strings", "many keys", "one long key"],
)
def test_only_the_kept_part_is_searched_for_secrets(value, measured_redaction):
    result = stored(value, 4_096, Redactor())
    assert result.truncated
    assert len(result.text.encode()) <= 4_096
    assert measured_redaction[0] <= 4_096 + 2 * payload.CUT_MARGIN


@pytest.mark.parametrize(
    ("secret_text", "secret"),
    [
        (f"token={SECRET}", SECRET),
        (f'"password": "{SECRET}', SECRET),
        (f"redis://user:{SECRET}@cache/0", SECRET),
        (f"Authorization: Bearer {SECRET}", SECRET),
        (f"Bearer {SECRET}", SECRET),
        (f"X-Api-Key: a b c {SECRET}", SECRET),
    ],
)
@pytest.mark.parametrize("shift", range(0, 40, 3))
def test_a_cut_never_leaves_part_of_a_secret(secret_text, secret, shift):
    """Wherever the cap falls, inside the key, the separator or the value, no three characters
    of the secret in a row survive."""
    max_bytes = 200
    filler = "x" * (max_bytes - 40 + shift)
    result = stored({"t": filler + " " + secret_text + " tail" * 1000}, max_bytes, Redactor())
    preview = result.value["preview"]
    for start in range(len(secret) - 2):
        assert secret[start : start + 3] not in preview, preview[-60:]


def test_a_fitting_value_is_stored_whole_and_redacted():
    value = {"user": "ann", "password": SECRET, "note": f"see token={SECRET}"}
    result = stored(value, 65_536, Redactor())
    assert not result.truncated
    assert result.value == {"user": "ann", "password": "***", "note": "see token=***"}
    assert json.loads(result.text) == result.value


def test_only_strings_that_may_hold_json_are_parsed(monkeypatch):
    """A string is parsed as JSON (and redacted as JSON) only when it begins and ends like an
    object or an array: empty and blank strings, common in forms, used to be parsed (and fail)
    one by one."""
    parsed: list[str] = []
    real_loads = payload.json.loads
    monkeypatch.setattr(payload.json, "loads", lambda text: parsed.append(text) or real_loads(text))
    value = {"a": "", "b": " ", "c": "\n", "d": "[", "e": " {} ", "f": '{"password": "x"}'}
    result = stored(value, 65_536, Redactor())
    assert parsed == ["{}", '{"password": "x"}']
    assert result.value == {**value, "f": '{"password":"***"}'}


def test_original_bytes_is_the_wire_size_when_given_and_the_json_size_otherwise():
    value = {"blob": "x" * 10_000}
    assert stored(value, 512, Redactor(), original_bytes=12_345).value["original_bytes"] == 12_345
    assert stored(value, 512, Redactor()).value["original_bytes"] == len(json.dumps(value)) - 1


def test_the_client_sends_receivers_the_capped_form(echo_handler, signals, rpc_settings, db):
    rpc_settings(MAX_PARAMS_BYTES=1_024, MAX_RESPONSE_BYTES=1_024)
    from django_rpc_audit import get_rpc_client

    blob = "QUJD" * 250_000  # 1 MB of base64
    get_rpc_client().call("test.echo", {"name": "a.pdf", "data": blob})
    started, finished = signals.started[0], signals.finished[0]
    assert started["params"]["_truncated"] is True
    assert len(started["params_json"].encode()) <= 1_024
    # the size the params had on the wire
    assert started["params"]["original_bytes"] == len(
        json.dumps({"name": "a.pdf", "data": blob}, separators=(",", ":"))
    )
    assert finished["response"]["_truncated"] is True
    assert len(finished["response_json"].encode()) <= 1_024


def test_stored_text_is_bounded_by_the_cap(measured_redaction):
    text = "line token=abc\n" * 200_000
    capped = stored_text(text, 1_000, Redactor())
    assert len(capped.encode()) <= 1_000
    assert measured_redaction[0] <= 1_000 + payload.CUT_MARGIN
    assert "abc" not in capped


def test_a_cut_error_message_keeps_its_start_and_the_end_of_one_long_line():
    text = "ValueError: bad row " + "x" * 50_000 + " ... at the end: row 4711 is the culprit"
    capped = stored_text(text, 1_000, Redactor())
    assert len(capped.encode()) <= 1_000
    head, note, tail = capped.partition(f" ... [truncated, {len(text)} bytes] ... ")
    assert note
    assert head.startswith("ValueError: bad row xxx")
    assert tail.endswith("at the end: row 4711 is the culprit")
    assert len(tail.encode()) > 250  # a third of the room, not a few characters


def test_a_cut_error_message_keeps_a_tracebacks_last_lines():
    frame = '  File "app/module{0}.py", line {0}, in f{0}\n    call()\n'
    frames = "".join(frame.format(n) for n in range(999))
    text = f"Traceback (most recent call last):\n{frames}RuntimeError: the real cause"
    capped = stored_text(text, 2_000, Redactor())
    assert capped.startswith("Traceback (most recent call last):")
    assert capped.endswith("RuntimeError: the real cause")
    assert len(capped.encode()) <= 2_000


@pytest.mark.parametrize(
    "secret_text",
    [
        f"password: {SECRET} and the rest of its line",
        f"Authorization: Bearer {SECRET}.and.more",
        f"token={SECRET}&next=1",
        f"redis://user:{SECRET}@cache:6379/0",
        f'"api_key": "{SECRET} quoted"',
    ],
)
@pytest.mark.parametrize("shift", range(0, 60, 4))
def test_the_end_kept_never_shows_part_of_a_secret_that_began_before_it(secret_text, shift):
    """Wherever the end's first character falls (in the key, the separator or the value), the
    secret on its line is redacted whole: no three characters of it in a row survive."""
    max_bytes = 1_000
    room = max_bytes - len(" ... [truncated, 99999 bytes] ... ")
    end = "z" * (room // 3 - 20 - shift)  # the end kept starts `shift` characters earlier
    text = "start " + "y" * 20_000 + " " + secret_text + " " + end
    capped = stored_text(text, max_bytes, Redactor())
    tail = capped.rpartition(" bytes] ... ")[2]
    # The end is kept (a value after "key: " runs to the end of its line: all redacted).
    assert tail.endswith(("zzz", " ***"))
    assert len(tail) > 100
    for start in range(len(SECRET) - 2):
        assert SECRET[start : start + 3] not in tail, tail[:80]


def test_the_end_of_a_line_begun_too_far_back_is_kept_from_the_next_line(measured_redaction):
    line = "password: " + SECRET * 100_000  # one line, far longer than the lookback
    text = f"{line}\nthe next line"
    capped = stored_text(text, 1_000, Redactor())
    assert capped.endswith("\nthe next line")
    assert SECRET[:3] not in capped
    # The head (and its margin), the lookback and the end: never the whole line.
    assert measured_redaction[0] <= 1_000 + payload.CUT_MARGIN + payload.TAIL_LOOKBACK_MIN
    assert stored_text(line, 1_000, Redactor()).endswith(" bytes] ... ")  # no next line


# -- the buffer is bounded in bytes --------------------------------------------------------------


def _event(size: int, status: str | None) -> dict:
    now = datetime.now(UTC)
    result = stored({"data": "x" * size}, 65_536)
    event = {
        "correlation_id": str(uuid.uuid4()),
        "method": "m",
        "params": result.value,
        "params_json": result.text,
        "user": None,
        "caller_ip": None,
        "user_agent": "ua",
        "started_at": now,
    }
    if status is not None:
        event.update(
            status=status,
            response=None,
            response_json=None,
            error_code=None,
            error_message=None,
            duration_ms=1.0,
            completed_at=now,
        )
    return event


def test_the_buffer_holds_at_most_its_byte_bound_and_keeps_failures():
    writer = BufferedLogWriter(buffer_max_bytes=1_000_000, background=False)
    for _ in range(100):
        writer.finished(_event(60_000, "success"))
    stats = writer.stats()
    assert stats.buffered_bytes <= 1_000_000
    assert stats.buffered < 100
    assert stats.dropped == 100 - stats.buffered
    # A failure takes the room of the oldest successes.
    failure = _event(60_000, "failed")
    writer.finished(failure)
    assert writer.stats().buffered_bytes <= 1_000_000
    assert (failure["correlation_id"], failure["started_at"]) in writer._buffer
    # A call already buffered is completed, never left pending.
    started = _event(10, None)
    writer.started(started)
    writer.finished(
        {**_event(60_000, "success"), **{k: started[k] for k in ("correlation_id", "started_at")}}
    )
    key = (started["correlation_id"], started["started_at"])
    assert writer._buffer[key][1].get("status") == "success"


# -- payloads deferred to the writer's thread ----------------------------------------------------


def _buffered_event(writer: BufferedLogWriter) -> dict:
    (_, event), *_ = writer._buffer.values()
    return event


def test_with_only_the_log_receivers_the_payloads_are_stored_by_the_writer(
    echo_handler, rpc_log_writer, rpc_settings, db
):
    """The caller's thread hands the writer the wire texts; the row holds exactly what
    storing on the caller's thread gives (redacted, capped: as when another receiver is
    connected), even after the caller changed its params and its result."""
    from django_rpc_audit import get_rpc_client
    from django_rpc_audit.models import RPCLog
    from django_rpc_audit.signals import rpc_finished

    rpc_settings(MAX_PARAMS_BYTES=2_000, MAX_RESPONSE_BYTES=2_000)

    def params() -> dict:
        return {"user": "ann", "password": SECRET, "note": f"token={SECRET} " + "n" * 1_950}

    rpc_finished.connect(lambda **kwargs: None, weak=False, dispatch_uid="tests.listening")
    try:
        get_rpc_client().call("test.echo", params())  # stored on the caller's thread
    finally:
        rpc_finished.disconnect(dispatch_uid="tests.listening")
    rpc_log_writer.flush()
    reference = RPCLog.objects.get()
    assert reference.params["_truncated"] is True  # over its cap, under twice it
    assert reference.response["_truncated"] is True

    sent = params()
    result = get_rpc_client().call("test.echo", sent)
    event = _buffered_event(rpc_log_writer)
    assert isinstance(event["params"], payload.Deferred)
    assert isinstance(event["response"], payload.Deferred)
    sent["user"] = result["echo"]["user"] = "changed after the call"

    rpc_log_writer.flush()
    log = RPCLog.objects.exclude(pk=reference.pk).get()
    assert (log.params, log.response) == (reference.params, reference.response)
    assert SECRET not in json.dumps([log.params, log.response])
    assert "changed" not in json.dumps([log.params, log.response])


@pytest.mark.parametrize(
    "params",
    [
        {"at": datetime(2026, 1, 2, 3, 4, 5, 123456, tzinfo=UTC)},  # converted on the wire
        {"blob": "x" * 5_000},  # over twice the cap
    ],
    ids=["converted", "over twice the cap"],
)
def test_params_are_stored_on_the_callers_thread_when_the_wire_text_would_differ_or_be_long(
    params, echo_handler, rpc_log_writer, rpc_settings, db
):
    from django_rpc_audit import get_rpc_client

    rpc_settings(MAX_PARAMS_BYTES=2_000)
    get_rpc_client().call("test.echo", params)
    event = _buffered_event(rpc_log_writer)
    assert event["params"] == stored(params, 2_000, Redactor()).value
    assert event["params_json"] == stored(params, 2_000, Redactor()).text


def test_another_receiver_gets_the_stored_form_and_nothing_is_deferred(
    echo_handler, rpc_log_writer, signals, db
):
    from django_rpc_audit import get_rpc_client

    get_rpc_client().call("test.echo", {"password": SECRET})
    assert signals.finished[0]["params"] == {"password": "***"}
    assert signals.finished[0]["response"] == {"echo": {"password": "***"}}
    assert not isinstance(_buffered_event(rpc_log_writer)["params"], payload.Deferred)


def test_a_deferred_payload_is_counted_in_the_buffer_bytes_by_its_text():
    text = json.dumps({"params": {"data": "x" * 50_000}})
    deferred = payload.Deferred(text, "params", 65_536, Redactor(), None, len(text))
    event = _event(0, None)
    event.update(params=deferred, params_json=None)
    writer = BufferedLogWriter(background=False)
    writer.started(event)
    assert writer.stats().buffered_bytes >= len(text)
    assert deferred.resolve().value == {"data": "x" * 50_000}
    assert deferred.source == ""  # the text is let go once stored


def test_encode_json_text_escapes_as_the_json_encoder_does():
    from django_rpc_audit.sanitize import _dumps_plain

    tricky = {'k"\\': ['a"b\\c', "\x00\x1f\n\t\x7f", "é\u2028\ud800", 'end\\"']}
    text = _dumps_plain(tricky)
    for cut in range(len(text) + 1):  # a preview may end inside an escape
        assert payload._encode_json_text(text[:cut]) == payload._encode_string(text[:cut])
