"""The recycled buffers of the texts a buffered call holds (django_rpc_audit.heldtext)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from django_rpc_audit import heldtext
from django_rpc_audit.heldtext import HeldText, hold, retained_bytes, size_class
from django_rpc_audit.payload import Deferred, stored
from django_rpc_audit.redaction import Redactor


@pytest.fixture(autouse=True)
def empty_pool(monkeypatch):
    """Each test starts with no free buffer, whatever ran before."""
    monkeypatch.setattr(heldtext, "_free", {})
    monkeypatch.setattr(heldtext, "_retained", 0)


@pytest.mark.parametrize("size", [0, 1, heldtext.MIN_BYTES - 1, heldtext.MAX_BYTES + 1])
def test_short_and_long_texts_are_held_as_they_are(size):
    text = "x" * size
    assert hold(text) is text


@pytest.mark.parametrize(
    "text",
    [
        "a" * 5_000,
        json.dumps({"name": "Zoë", "note": "😀" * 5_000}, ensure_ascii=False),
        '{"lone":"\ud800' + "x" * 5_000 + '"}',  # a lone surrogate, as json.dumps may write
        b'{"reply":' + b"1" * 9_000 + b"}",
    ],
    ids=["ascii", "non-ascii", "lone surrogate", "bytes"],
)
def test_a_held_text_comes_back_as_it_was_given(text):
    held = hold(text)
    assert isinstance(held, HeldText)
    taken = held.take()
    assert type(taken) is type(text)
    assert taken == text


@pytest.mark.parametrize("text", ["6" * 10_000, b"7" * 10_000], ids=["str", "bytes"])
def test_the_callers_text_is_not_kept(text):
    """The point of holding: the caller's own object is freed as soon as the caller drops it,
    as with logging off (nothing refers to it once held)."""
    references = sys.getrefcount(text)
    held = hold(text)
    assert sys.getrefcount(text) == references
    assert held.take() == text


def test_a_text_is_taken_once():
    held = hold("y" * 5_000)
    held.take()
    with pytest.raises(ValueError, match="taken already"):
        held.take()


def test_a_taken_buffer_is_reused_by_the_next_text_of_its_size_class():
    first = hold("a" * 64_000)
    buffer = first._buffer
    assert retained_bytes() == 0
    first.take()
    assert retained_bytes() == size_class(64_000)
    second = hold("b" * 63_000)  # another size, the same class
    assert second._buffer is buffer
    assert retained_bytes() == 0
    assert second.take() == "b" * 63_000  # what the first text left is not read


def test_a_text_never_taken_gives_its_buffer_back_when_dropped():
    held = hold("c" * 20_000)
    del held
    assert retained_bytes() == size_class(20_000)


def test_free_buffers_are_kept_up_to_the_retained_bytes(monkeypatch):
    monkeypatch.setattr(heldtext, "RETAINED_BYTES", 3 * size_class(50_000))
    texts = [hold("d" * 50_000) for _ in range(5)]
    for held in texts:
        held.take()
    assert retained_bytes() == 3 * size_class(50_000)
    assert len(heldtext._free[size_class(50_000)]) == 3


def test_size_classes_waste_at_most_a_quarter():
    previous = 0
    for size in [*range(1, 70_000, 7), *range(2**20 - 50, 2**20 + 50), heldtext.MAX_BYTES]:
        length = size_class(size)
        assert size <= length < size * 1.25 + 1
        assert length >= previous  # never smaller for a longer text
        previous = length
    # Four classes per power of two: few enough to be reused, fine enough to waste little.
    assert {size_class(size) for size in range(32_769, 65_537)} == {
        40_960,
        49_152,
        57_344,
        65_536,
    }


def test_a_deferred_payload_holds_a_copy_and_stores_what_the_text_holds():
    value = {"data": "é" * 6_000, "password": "hunter2"}
    text = json.dumps({"params": value}, ensure_ascii=False)
    deferred = Deferred(text, "params", 65_536, Redactor(), None, len(text.encode()))
    assert isinstance(deferred.source, HeldText)
    assert deferred.size == len(text.encode())
    assert deferred.resolve() == stored(value, 65_536, Redactor())
    assert deferred.source == ""
    assert retained_bytes() == size_class(len(text.encode()))  # its buffer is back


def test_a_buffered_call_holds_copies_of_its_wire_texts_until_written(
    echo_handler, rpc_log_writer, db
):
    from django_rpc_audit import get_rpc_client
    from django_rpc_audit.models import RPCLog

    params = {"blob": "0123456789abcdef" * 1_000, "api_key": "sk_live_abcdef"}
    get_rpc_client().call("test.echo", params)
    ((_, event),) = rpc_log_writer._buffer.values()
    assert isinstance(event["params"].source, HeldText)
    assert isinstance(event["response"].source, HeldText)
    assert retained_bytes() == 0

    rpc_log_writer.flush()
    log = RPCLog.objects.get()
    assert log.params == {"blob": params["blob"], "api_key": "***"}
    assert log.response == {"echo": log.params}
    assert retained_bytes() > 2 * 16_000  # both buffers are back for the next call


def test_a_forked_child_starts_with_a_free_lock_and_no_buffers():
    hold("e" * 10_000).take()
    assert retained_bytes() > 0
    with heldtext._lock:  # as if another thread held it at the fork
        pid = os.fork()
        if pid == 0:  # the child: it must neither hang nor keep the parent's buffers
            status = 0 if retained_bytes() == 0 and hold("f" * 10_000).take() else 1
            os._exit(status)
    deadline = time.monotonic() + 30
    while (waited := os.waitpid(pid, os.WNOHANG)) == (0, 0) and time.monotonic() < deadline:
        time.sleep(0.01)
    if waited == (0, 0):
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("the child hung on the lock held at the fork")
    assert os.waitstatus_to_exitcode(waited[1]) == 0


def test_a_stored_form_is_held_as_its_text_and_parsed_back_as_it_was():
    result = stored({"data": "z" * 30_000, "token": "abc"}, 10_000, Redactor())
    assert result.truncated
    deferred = Deferred.of_stored(result)
    assert isinstance(deferred.source, HeldText)
    assert deferred.size == len(result.text)
    assert deferred.resolve() == result  # the value, its text, and that it was cut


def test_payloads_cut_at_their_cap_are_held_as_their_text_until_written(
    echo_handler, rpc_log_writer, rpc_settings, db
):
    """Over twice their cap, the params and the response are cut on the caller's thread; the
    buffer keeps only their text, in recycled memory, and the row holds that stored form."""
    from django_rpc_audit import get_rpc_client
    from django_rpc_audit.models import RPCLog

    rpc_settings(MAX_PARAMS_BYTES=8_000, MAX_RESPONSE_BYTES=9_000)
    params = {"password": "hunter2", "data": "q" * 40_000}
    get_rpc_client().call("test.echo", params)
    ((_, event),) = rpc_log_writer._buffer.values()
    for key in ("params", "response"):
        assert isinstance(event[key], Deferred)
        assert event[key].verbatim
        assert isinstance(event[key].source, HeldText)
        assert event[f"{key}_json"] is None

    rpc_log_writer.flush()
    log = RPCLog.objects.get()
    assert log.params == stored(params, 8_000, Redactor()).value
    wire_bytes = log.response["original_bytes"]  # the reply's size as received
    assert (
        log.response == stored({"echo": params}, 9_000, Redactor(), original_bytes=wire_bytes).value
    )
    assert log.params["_truncated"] is True
    assert "hunter2" not in json.dumps([log.params, log.response])


def test_a_cut_payload_is_not_held_when_another_receiver_reads_it(
    echo_handler, rpc_log_writer, rpc_settings, signals, db
):
    from django_rpc_audit import get_rpc_client

    rpc_settings(MAX_PARAMS_BYTES=8_000)
    params = {"data": "q" * 40_000}
    get_rpc_client().call("test.echo", params)
    assert signals.started[0]["params"] == stored(params, 8_000, Redactor()).value
    ((_, event),) = rpc_log_writer._buffer.values()
    assert not isinstance(event["params"], Deferred)


#: A script with a writer of its own, holding calls whose texts are in recycled memory
#: (params over ``heldtext.MIN_BYTES``) when it ends: never written (no flush, no thread).
EXITING_SCRIPT = """
import django
django.setup()
from django_rpc_audit import get_rpc_client
from django_rpc_audit.transports import register_local_handler
from django_rpc_audit.writers import BufferedLogWriter, use_writer
register_local_handler("test.echo", lambda params: params)
writer = BufferedLogWriter(background=False)
with use_writer(writer):
    for n in range(5):
        get_rpc_client().call("test.echo", {"n": n, "body": "x" * 10_000})
print(len(writer._buffer))
"""


def test_texts_still_held_at_interpreter_exit_are_freed_quietly(tmp_path):
    """The interpreter's teardown frees the writer after it has set the module's globals to
    None: each held text printed ``Exception ignored in: <function HeldText.__del__ ...>``
    and a traceback."""
    root = Path(__file__).resolve().parent.parent
    env = {key: value for key, value in os.environ.items() if not key.startswith("DJANGO_CFG")}
    env.update(
        PYTHONPATH=str(root),
        DJANGO_SETTINGS_MODULE="tests.settings",
        DATABASE_URL=f"sqlite:///{tmp_path / 'unused.sqlite3'}",
    )
    result = subprocess.run(
        [sys.executable, "-c", EXITING_SCRIPT],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["5"]  # five calls still buffered at the exit
    assert "HeldText" not in result.stderr
    assert "Exception ignored" not in result.stderr
