"""The log stream pipeline in one process: entries, the stream writer, the ingest worker.

Against the real Redis and the test database. The crash and outage tests, with real
processes, are in ``test_ingest_process.py``.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
import redis
from django.core.management import call_command
from hypothesis import given
from hypothesis import strategies as st

from django_rpc_audit.models import RPCLog
from django_rpc_audit.writers import (
    BufferedLogWriter,
    IngestWorker,
    StreamLogWriter,
    get_writer,
    stream_backlog,
)
from django_rpc_audit.writers.entry import FIELD, MalformedEntry, decode_row, encode_row
from django_rpc_audit.writers.sink import event_row_values
from tests.factories import UserFactory

NOW = datetime(2026, 12, 1, 6, 0, 0, 123456, tzinfo=UTC)


def event(n: int = 0, *, finished: bool = True, **values: Any) -> dict[str, Any]:
    started = {
        "correlation_id": str(uuid.uuid4()),
        "method": "test.echo",
        "params": {"n": n, "text": "é\u2028\"'\\", "nested": [1, 2.5, None, True]},
        "user": None,
        "caller_ip": "2001:db8::1",
        "user_agent": "pytest/1.0",
        "started_at": NOW + timedelta(microseconds=n),
    }
    if finished:
        started.update(
            status="success",
            response={"echo": n},
            error_code=None,
            error_message=None,
            duration_ms=1.25,
            completed_at=NOW + timedelta(milliseconds=2, microseconds=n),
            sample_rate=1.0,
        )
    return {**started, **values}


def started_of(finished: dict[str, Any]) -> dict[str, Any]:
    """The ``rpc_started`` event of the call ``finished`` ends."""
    return {key: value for key, value in finished.items() if key in event(finished=False)}


# -- entries ----------------------------------------------------------------------------------


def test_an_entry_gives_back_the_stored_row_exactly() -> None:
    for row in (
        event_row_values(event(1), for_copy=True),
        event_row_values(event(2, finished=False), for_copy=True),
        event_row_values(
            event(3, status="failed", response=None, error_code="boom", duration_ms=None),
            for_copy=True,
        ),
    ):
        assert decode_row(encode_row(row).encode()) == row


@given(
    text=st.text(max_size=50),
    key=st.one_of(st.none(), st.integers(), st.text(min_size=1, max_size=20)),
    offset=st.integers(min_value=-14 * 60, max_value=14 * 60),
    micros=st.integers(min_value=0, max_value=999_999),
    duration=st.one_of(st.none(), st.floats(allow_nan=False, allow_infinity=False)),
)
def test_entries_round_trip_any_text_key_instant_and_float(
    text: str, key: int | str | None, offset: int, micros: int, duration: float | None
) -> None:
    instant = datetime(2026, 1, 2, 3, 4, 5, micros, tzinfo=timezone(timedelta(minutes=offset)))
    row = {
        "id": uuid.uuid4().hex,
        "correlation_id": text.replace("\x00", "\ufffd"),
        "method": "m",
        "params": "{}",
        "user_id": key,
        "caller_ip": None,
        "user_agent": text.replace("\x00", "\ufffd"),
        "created_at": instant,
        "status": "failed",
        "response": None,
        "error_code": "",
        "error_message": text.replace("\x00", "\ufffd"),
        "duration_ms": duration,
        "completed_at": None,
        "sample_rate": 0.25,
    }
    decoded = decode_row(encode_row(row))
    if isinstance(key, str):  # no database stores a NUL in a key; the entry cannot carry it
        row["user_id"] = key.replace("\x00", "\ufffd")
    assert decoded == row
    assert decoded["created_at"].utcoffset() == instant.utcoffset()


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("2\x00a", "unknown entry version"),
        ("1\x00a\x00b", "3 values"),
        ("\xff", "unknown entry version"),
        ("1\x00id\x00c\x00m\x00{}\x00x5\x00\x00ua\x002026-01-01T00:00:00", "user key"),
        ("1\x00id\x00c\x00m\x00{}\x00\x00\x00ua\x00yesterday", "Invalid isoformat"),
    ],
)
def test_malformed_entries_are_refused(text: str, reason: str) -> None:
    with pytest.raises(MalformedEntry, match=reason):
        decode_row(text)
    with pytest.raises(MalformedEntry, match="UTF-8"):
        decode_row(b"1\x00\xff")


# -- the stream writer ------------------------------------------------------------------------


@pytest.fixture
def log_stream(redis_client: redis.Redis) -> Iterator[str]:
    stream = f"rpc_audit_test:{uuid.uuid4().hex}:log"
    yield stream
    redis_client.delete(stream, f"{stream}:dead")


def entries_of(client: redis.Redis, stream: str) -> list[dict[str, Any]]:
    return [decode_row(fields[FIELD.encode()]) for _, fields in client.xrange(stream)]


def test_the_stream_writer_ships_each_calls_stored_row(
    redis_url: str, redis_client: redis.Redis, log_stream: str
) -> None:
    writer = StreamLogWriter(redis_url=redis_url, stream=log_stream, maxlen=1000, background=False)
    running = event(1, finished=False)
    done = event(2)
    writer.started(running)
    writer.started(started_of(done))
    writer.finished(done)  # replaces its started event in the buffer
    assert writer.flush()
    assert entries_of(redis_client, log_stream) == [
        event_row_values(running, for_copy=True),
        event_row_values(done, for_copy=True),
    ]
    assert writer.stats().written == 2
    assert writer.stats().buffered == 0


def test_the_stream_writer_keeps_events_while_redis_is_unreachable(log_stream: str) -> None:
    unused = redis.Redis.from_url("redis://127.0.0.1:1/0")  # nothing listens on port 1
    with pytest.raises(redis.ConnectionError):
        unused.ping()
    writer = StreamLogWriter(
        redis_url="redis://127.0.0.1:1/0", stream=log_stream, maxlen=1000, background=False
    )
    writer.finished(event(1))
    assert writer.flush() is False
    assert writer.stats().buffered == 1
    assert writer.stats().written == 0


def test_write_mode_stream_builds_the_stream_writer(
    rpc_settings: Callable[..., dict[str, Any]], redis_url: str, log_stream: str
) -> None:
    rpc_settings(
        WRITE_MODE="stream", LOG_STREAM=log_stream, LOG_STREAM_MAXLEN=500, REDIS_URL=redis_url
    )
    writer = get_writer()
    assert isinstance(writer, StreamLogWriter)
    assert (writer.stream, writer.maxlen, writer.redis_url) == (log_stream, 500, redis_url)
    rpc_settings(WRITE_MODE="stream", LOG_STREAM_REDIS_URL="redis://127.0.0.1:6379/3")
    assert get_writer().redis_url == "redis://127.0.0.1:6379/3"  # type: ignore[attr-defined]
    writer.close()


# -- the ingest worker ------------------------------------------------------------------------


def drain(worker: IngestWorker, lag: int = 0) -> None:
    """Run ``worker`` in a thread until its group has nothing left, as the command would
    (``lag``: what Redis still counts as undelivered once unread entries were trimmed)."""

    def stop_when_done(stats: Any) -> None:
        if stats.lag == lag and stats.pending == 0 and stats.backlog_at is not None:
            worker.stop()

    worker.stats_interval = 0.05
    thread = threading.Thread(target=worker.run, kwargs={"on_stats": stop_when_done})
    thread.start()
    thread.join(60)
    assert not thread.is_alive()


def ingest_worker(redis_url: str, stream: str, **options: Any) -> IngestWorker:
    return IngestWorker(redis_url=redis_url, stream=stream, group="g", block_ms=50, **options)


def ship(redis_url: str, stream: str, events: list[dict[str, Any]]) -> None:
    writer = StreamLogWriter(redis_url=redis_url, stream=stream, maxlen=10_000, background=False)
    for e in events:
        (writer.finished if "status" in e else writer.started)(e)
    assert writer.flush()


COLUMNS = [f.attname for f in RPCLog._meta.concrete_fields]


@pytest.mark.django_db(transaction=True)
def test_rows_through_the_stream_equal_rows_the_buffered_writer_writes(
    redis_url: str, log_stream: str
) -> None:
    user = UserFactory()
    events = [
        event(1, user=user),
        event(2, status="failed", response=None, error_code="E", error_message="bad\x00"),
        event(3, finished=False, params={"deep": [[[]]]}, caller_ip="fe80::1%eth0"),
        event(4, status="timeout", response=None, duration_ms=None, sample_rate=0.5),
    ]
    direct = BufferedLogWriter(background=False)
    for e in events:
        (direct.finished if "status" in e else direct.started)(e)
    assert direct.flush()
    expected = list(RPCLog.objects.order_by("created_at").values(*COLUMNS))
    RPCLog.objects.all().delete()

    ship(redis_url, log_stream, events)
    worker = ingest_worker(redis_url, log_stream)
    drain(worker)

    assert list(RPCLog.objects.order_by("created_at").values(*COLUMNS)) == expected
    assert expected[0]["user_id"] == user.pk
    assert worker.stats().rows == 4
    assert worker.stats().acked == 4
    assert stream_backlog(worker._client, log_stream, "g") == (0, 0)


@pytest.mark.django_db(transaction=True)
def test_a_row_sent_twice_and_a_late_pending_row_are_written_once_finished(
    redis_url: str, redis_client: redis.Redis, log_stream: str
) -> None:
    done = event(1)
    pending = event_row_values(started_of(done), for_copy=True)
    finished = event_row_values(done, for_copy=True)
    for row in (finished, finished, pending):  # a retried XADD; a pending row shipped late
        redis_client.xadd(log_stream, {FIELD: encode_row(row)})
    drain(ingest_worker(redis_url, log_stream))
    (row,) = RPCLog.objects.all()
    assert row.status == "success"
    assert row.response == {"echo": 1}
    # In separate batches too: a pending row never turns a finished one back.
    redis_client.xadd(log_stream, {FIELD: encode_row(pending)})
    drain(ingest_worker(redis_url, log_stream))
    assert list(RPCLog.objects.values_list("status", flat=True)) == ["success"]


@pytest.mark.django_db(transaction=True)
def test_malformed_entries_and_refused_rows_go_to_the_dead_letter_stream(
    redis_url: str, redis_client: redis.Redis, log_stream: str
) -> None:
    good = [event(n) for n in range(5)]
    ghost_user = event_row_values(event(9), for_copy=True) | {"user_id": 987_654}
    ship(redis_url, log_stream, good[:2])
    redis_client.xadd(log_stream, {FIELD: "2\x00from the future"})
    redis_client.xadd(log_stream, {"other": "field"})
    redis_client.xadd(log_stream, {FIELD: encode_row(ghost_user)})  # no such user
    ship(redis_url, log_stream, good[2:])

    worker = ingest_worker(redis_url, log_stream)
    drain(worker)

    assert RPCLog.objects.count() == 5
    dead = [fields for _, fields in redis_client.xrange(f"{log_stream}:dead")]
    reasons = sorted(fields[b"reason"].decode() for fields in dead)
    assert len(reasons) == 3
    assert reasons[0].startswith("malformed entry: unknown entry version '2'")
    assert reasons[1] == "no 'r' field"
    assert reasons[2].startswith("refused by the database: IntegrityError")
    refused = next(f for f in dead if f[b"reason"].startswith(b"refused"))
    assert decode_row(refused[FIELD.encode()]) == ghost_user  # kept for a replay
    assert worker.stats().dead_lettered == 3
    assert stream_backlog(worker._client, log_stream, "g") == (0, 0)


@pytest.mark.django_db(transaction=True)
def test_entries_of_a_dead_consumer_are_claimed_and_written_once(
    redis_url: str, redis_client: redis.Redis, log_stream: str
) -> None:
    events = [event(n) for n in range(30)]
    ship(redis_url, log_stream, events)
    worker = ingest_worker(redis_url, log_stream, claim_idle_seconds=0.2)
    worker.ensure_group()
    # A consumer takes ten entries and dies without acknowledging them.
    redis_client.xreadgroup("g", "dead-consumer", {log_stream: ">"}, count=10)
    drain(worker)
    assert RPCLog.objects.count() == 30
    assert worker.stats().claimed == 10
    assert worker.stats().rows == 30


@pytest.mark.django_db(transaction=True)
def test_an_entry_delivered_too_often_is_dead_lettered_with_the_reason(
    redis_url: str, redis_client: redis.Redis, log_stream: str
) -> None:
    ship(redis_url, log_stream, [event(1), event(2)])
    worker = ingest_worker(redis_url, log_stream, claim_idle_seconds=0.2, max_deliveries=3)
    worker.ensure_group()
    ((_, entries),) = redis_client.xreadgroup("g", "crasher", {log_stream: ">"}, count=1)
    entry_id = entries[0][0]
    for _ in range(2):  # two more deliveries, each to a consumer that crashed
        redis_client.xclaim(log_stream, "g", "crasher", 0, [entry_id])
    drain(worker)
    ((_, dead),) = redis_client.xrange(f"{log_stream}:dead")
    assert dead[b"id"] == entry_id
    assert dead[b"reason"].startswith(b"delivered 3 times without being acknowledged")
    assert RPCLog.objects.count() == 1  # the other entry
    assert worker.stats().dead_lettered == 1


@pytest.mark.django_db(transaction=True)
def test_the_command_ingests_and_prints_its_progress(
    rpc_settings: Callable[..., dict[str, Any]],
    redis_url: str,
    log_stream: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    rpc_settings(LOG_STREAM=log_stream, REDIS_URL=redis_url)
    ship(redis_url, log_stream, [event(n) for n in range(3)])
    done = threading.Event()

    def stop_soon() -> None:
        while RPCLog.objects.count() < 3:
            done.wait(0.05)
        from django.db import connection

        connection.close()
        for worker in list(IngestWorker.running):
            worker.stop()

    stopper = threading.Thread(target=stop_soon)
    stopper.start()
    call_command("rpc_logs_ingest", "--stats-interval", "0.05", "--consumer", "c1")
    stopper.join()
    out = capsys.readouterr().out
    assert f"Ingesting {log_stream} as c1 in group rpc_audit_ingest" in out
    assert "rows=3 " in out
    assert "Stopped: 3 row(s) written" in out


@pytest.mark.django_db(transaction=True)
def test_pending_entries_trimmed_from_the_stream_are_counted_as_lost(
    redis_url: str, redis_client: redis.Redis, log_stream: str
) -> None:
    ship(redis_url, log_stream, [event(n) for n in range(10)])
    worker = ingest_worker(redis_url, log_stream, claim_idle_seconds=0.2)
    worker.ensure_group()
    redis_client.xreadgroup("g", "dead-consumer", {log_stream: ">"}, count=4)
    redis_client.xtrim(log_stream, maxlen=0)  # LOG_STREAM_MAXLEN reached past them
    # The six never delivered are lost too; no worker sees them, Redis's lag keeps counting them.
    drain(worker, lag=6)
    assert worker.stats().trimmed == 4
    assert RPCLog.objects.count() == 0
    # No dangling references left in the group's pending list.
    assert stream_backlog(worker._client, log_stream, "g") == (6, 0)
