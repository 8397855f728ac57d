"""The log stream pipeline in one process: entries, the stream writer, the ingest worker.

Against the real Redis and the test database. The crash and outage tests, with real
processes, are in ``test_ingest_process.py``.
"""

from __future__ import annotations

import re
import signal
import threading
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest
import redis
from django.core.management import CommandError, call_command
from django.db import models
from hypothesis import given
from hypothesis import strategies as st

from django_rpc_audit import get_rpc_client
from django_rpc_audit.alerts.models import WebhookDelivery
from django_rpc_audit.alerts.slow import SlowVerdict
from django_rpc_audit.exceptions import RPCRemoteError
from django_rpc_audit.models import RPCLog
from django_rpc_audit.writers import (
    BufferedLogWriter,
    IngestWorker,
    StreamLogWriter,
    flush,
    get_writer,
    stream_backlog,
)
from django_rpc_audit.writers import entry as entry_module
from django_rpc_audit.writers.entry import (
    FIELD,
    VERSION,
    MalformedEntry,
    decode_entry,
    decode_row,
    encode_row,
    layout,
    layout_of,
)
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


def corrupted(column: str, text: str) -> str:
    """A valid entry's text with ``column``'s value replaced by ``text``."""
    values = encode_row(event_row_values(event(1), for_copy=True)).split("\x00")
    values[1 + layout().columns.index(column)] = text
    return "\x00".join(values)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("2\x00a", "unknown entry version '2'"),
        ("1\x00a\x00b", "unknown entry version '1'"),  # the first layout
        (f"{layout().header}\x00a\x00b", "3 values"),
        ("\xff", "unknown entry version"),
        (corrupted("user_id", "=x5"), "user key"),
        (corrupted("created_at", "=yesterday"), "Invalid isoformat"),
        (corrupted("duration_ms", "=fast"), "could not convert"),
        (corrupted("is_slow", "=yes"), "not a boolean"),
        (corrupted("method", "test.echo"), "method: untagged value"),
        (corrupted("method", "test.echo") + "x", "method: untagged value"),
        (encode_row(event_row_values(event(1), for_copy=True)) + "[1]", "slow verdict"),
        (encode_row(event_row_values(event(1), for_copy=True)) + "=[1]", "missing"),
    ],
)
def test_malformed_entries_are_refused(text: str, reason: str) -> None:
    with pytest.raises(MalformedEntry, match=re.escape(reason)):
        decode_row(text)
    with pytest.raises(MalformedEntry, match="UTF-8"):
        decode_row(b"1\x00\xff")


# -- the layout follows the model -------------------------------------------------------------

VERDICT = SlowVerdict(threshold_ms=20.0, baseline_ms=4.5, mad_ms=0.25, samples=31, rule="baseline")


def test_the_entry_carries_every_column_of_the_model() -> None:
    """Fails when ``RPCLog`` gains a column an entry does not carry, or the sink a column it
    does not fill: a finished call's row has them all, and comes back whole."""
    columns = tuple(f.attname for f in RPCLog._meta.concrete_fields)
    assert layout().columns == columns
    finished = event(
        1,
        user=None,
        trace_id="4bf92f3577b34da6a3ce929d0e0e4736",
        span_id="00f067aa0ba902b7",
        slow=VERDICT,
    )
    row = event_row_values(finished, for_copy=True)
    assert set(row) == set(columns)
    entry = decode_entry(encode_row(row, finished["slow"]))
    assert entry.row == row
    assert entry.row["is_slow"] is True
    assert entry.slow == VERDICT
    # A pending row has no outcome yet: the entry leaves those columns out, not as NULL.
    pending = event_row_values(started_of(finished), for_copy=True)
    assert decode_entry(encode_row(pending)) == (pending, None)


def test_a_new_column_travels_and_changes_the_layout() -> None:
    fields = list(RPCLog._meta.concrete_fields)
    cost = models.DecimalField(max_digits=12, decimal_places=6, null=True)
    cost.set_attributes_from_name("cost")
    retries = models.PositiveSmallIntegerField(default=0)
    retries.set_attributes_from_name("retries")
    wider = layout_of([*fields, cost, retries])
    assert wider.columns[-2:] == ("cost", "retries")
    assert wider.header != layout().header  # an older worker refuses its entries
    assert wider.header.startswith(f"{VERSION}.")

    unknown = models.BinaryField()
    unknown.set_attributes_from_name("blob")
    with pytest.raises(TypeError, match="'blob'.*BinaryField"):
        layout_of([*fields, unknown])


def test_new_columns_round_trip_through_an_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    fields = list(RPCLog._meta.concrete_fields)
    credit = models.DecimalField(max_digits=12, decimal_places=6, null=True)
    credit.set_attributes_from_name("credit")
    retries = models.PositiveSmallIntegerField(default=0)
    retries.set_attributes_from_name("retries")
    monkeypatch.setattr(
        entry_module, "layout", lambda model=None: layout_of([*fields, credit, retries])
    )
    row = event_row_values(event(1), for_copy=True) | {"credit": Decimal("0.000125"), "retries": 3}
    assert decode_row(encode_row(row)) == row
    assert decode_row(encode_row(row | {"cost": None})) == row | {"cost": None}


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
    trace = {"trace_id": "4bf92f3577b34da6a3ce929d0e0e4736", "span_id": "00f067aa0ba902b7"}
    events = [
        event(1, user=user, **trace),
        event(2, status="failed", response=None, error_code="E", error_message="bad\x00"),
        event(3, finished=False, params={"deep": [[[]]]}, caller_ip="fe80::1%eth0", **trace),
        event(4, status="timeout", response=None, duration_ms=None, sample_rate=0.5),
        event(5, duration_ms=250.0, slow=VERDICT, **trace),
        event(6, status="rate_limited", response=None, error_code="rate_limited"),
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
    assert [row["trace_id"] for row in expected] == [
        trace["trace_id"],
        "",
        trace["trace_id"],
        "",
        trace["trace_id"],
        "",
    ]
    assert [row["is_slow"] for row in expected] == [False, False, False, False, True, False]
    assert worker.stats().rows == 6
    assert worker.stats().acked == 6
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
    # A column the database refuses to leave empty (NOT NULL, on every database).
    no_method = event_row_values(event(9), for_copy=True) | {"method": None}
    # A user deleted since the call: kept, with the user unset, as the other writers do.
    ghost_user = event_row_values(event(8, username="ghost"), for_copy=True) | {"user_id": 987_654}
    ship(redis_url, log_stream, good[:2])
    redis_client.xadd(log_stream, {FIELD: "2\x00from the future"})
    redis_client.xadd(log_stream, {"other": "field"})
    redis_client.xadd(log_stream, {FIELD: encode_row(no_method)})
    redis_client.xadd(log_stream, {FIELD: encode_row(ghost_user)})  # no such user
    ship(redis_url, log_stream, good[2:])

    worker = ingest_worker(redis_url, log_stream)
    drain(worker)

    assert RPCLog.objects.count() == 6
    ghost = RPCLog.objects.get(correlation_id=ghost_user["correlation_id"])
    assert ghost.user_id is None
    dead = [fields for _, fields in redis_client.xrange(f"{log_stream}:dead")]
    reasons = sorted(fields[b"reason"].decode() for fields in dead)
    assert len(reasons) == 3
    assert reasons[0].startswith("malformed entry: unknown entry version '2'")
    assert reasons[1] == "no 'r' field"
    assert reasons[2].startswith("refused by the database: IntegrityError")
    refused = next(f for f in dead if f[b"reason"].startswith(b"refused"))
    assert decode_row(refused[FIELD.encode()]) == no_method  # kept for a replay
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
    sigterm_before = signal.getsignal(signal.SIGTERM)
    call_command("rpc_logs_ingest", "--stats-interval", "0.05", "--consumer", "c1")
    stopper.join()
    # The worker's SIGTERM handler was the process's only while it ran.
    assert signal.getsignal(signal.SIGTERM) is sigterm_before
    out = capsys.readouterr().out
    assert f"Ingesting {log_stream} as c1 in group rpc_audit_ingest" in out
    assert "rows=3 " in out
    assert "Stopped: 3 row(s) written" in out
    assert "3 entries acknowledged" in out


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


# -- alerts -----------------------------------------------------------------------------------

WEBHOOK = {
    "NAME": "ops",
    "URL": "https://hooks.example.com/rpc",
    "SECRET": "whsec_" + "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LXNlY3JldA==",
}


def deliveries() -> list[dict[str, Any]]:
    """The outbox's rows, without the time each was made."""
    fields = [f.attname for f in WebhookDelivery._meta.concrete_fields if f.name != "created_at"]
    return list(
        WebhookDelivery.objects.order_by("occurred_at", "event", "endpoint").values(*fields)
    )


@pytest.mark.django_db(transaction=True)
def test_a_failed_call_in_stream_mode_queues_one_alert_across_redeliveries(
    rpc_settings: Callable[..., dict[str, Any]],
    local_handler: Callable[[str, Any], None],
    redis_url: str,
    redis_client: redis.Redis,
    log_stream: str,
) -> None:
    rpc_settings(
        WRITE_MODE="stream", LOG_STREAM=log_stream, REDIS_URL=redis_url, WEBHOOKS=[WEBHOOK]
    )

    def offline(params: dict[str, Any]) -> None:
        raise RPCRemoteError("user_offline", "User 7 is offline")

    local_handler("send_notification", offline)
    user = UserFactory(username="alice")
    writer = get_writer()
    try:
        with pytest.raises(RPCRemoteError):
            get_rpc_client().call("send_notification", {"user_id": 7}, user=user)
        assert flush()
    finally:
        writer.close()
    assert not RPCLog.objects.exists()  # in the stream, not yet in the database
    drain(ingest_worker(redis_url, log_stream))

    (log,) = RPCLog.objects.all()
    (delivery,) = WebhookDelivery.objects.all()
    assert (delivery.log_id, delivery.event, delivery.endpoint) == (log.pk, "rpc.failed", "ops")
    assert delivery.payload["error_code"] == "user_offline"
    assert delivery.payload["user"] == {"id": str(user.pk), "username": "alice"}

    # The finished call's entry comes again: a retried XADD, and a delivery to a consumer that
    # died before acknowledging it, claimed by the next worker.
    _, fields = redis_client.xrange(log_stream)[-1]
    redis_client.xadd(log_stream, fields)
    redis_client.xadd(log_stream, fields)
    redis_client.xreadgroup("g", "dead-consumer", {log_stream: ">"}, count=1)
    worker = ingest_worker(redis_url, log_stream, claim_idle_seconds=0.2)
    drain(worker)
    assert worker.stats().claimed == 1
    assert worker.stats().rows == 2
    assert RPCLog.objects.count() == 1
    (again,) = WebhookDelivery.objects.all()  # deterministic delivery ids: no duplicate
    assert (again.id, again.payload) == (delivery.id, delivery.payload)


@pytest.mark.django_db(transaction=True)
def test_alerts_through_the_stream_equal_those_the_buffered_writer_queues(
    rpc_settings: Callable[..., dict[str, Any]], redis_url: str, log_stream: str
) -> None:
    rpc_settings(
        ADMIN_BASE_URL="https://ops.example.com",
        WEBHOOKS=[
            WEBHOOK
            | {"INCLUDE_PARAMS": True, "INCLUDE_RESPONSE": True, "INCLUDE_USER_EMAIL": True},
            WEBHOOK | {"NAME": "chat", "FORMAT": "slack", "EVENTS": ["rpc.slow"]},
        ],
    )
    user = UserFactory(username="bob", email="bob@example.com")
    events = [
        event(1, user=user, status="failed", response=None, error_code="E", error_message="bad"),
        event(2, status="timeout", response=None, error_code="timeout", error_message="5 s"),
        event(3, user=user, duration_ms=250.0, slow=VERDICT, response={"big": "x" * 10_000}),
        event(4, slow=SlowVerdict(20.0, None, None, 0, "explicit"), duration_ms=21.5),
        event(5),  # successful, not slow: no alert
        event(6, finished=False),
    ]
    direct = BufferedLogWriter(background=False)
    for e in events:
        (direct.finished if "status" in e else direct.started)(e)
    assert direct.flush()
    expected = deliveries()
    assert [(row["endpoint"], row["event"]) for row in expected] == [
        ("ops", "rpc.failed"),
        ("ops", "rpc.timeout"),
        ("chat", "rpc.slow"),
        ("ops", "rpc.slow"),
        ("chat", "rpc.slow"),
        ("ops", "rpc.slow"),
    ]
    RPCLog.objects.all().delete()
    WebhookDelivery.objects.all().delete()

    ship(redis_url, log_stream, events)
    drain(ingest_worker(redis_url, log_stream))

    assert deliveries() == expected
    slow_payload = next(
        row["payload"] for row in expected if (row["endpoint"], row["event"]) == ("ops", "rpc.slow")
    )
    assert slow_payload["threshold_ms"] == 20.0
    assert slow_payload["baseline_ms"] == 4.5
    assert slow_payload["user"]["email"] == "bob@example.com"
    assert slow_payload["response"]["_truncated"] is True


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"stats_interval": float("inf")}, "--stats-interval"),
        ({"stats_interval": 1e12}, "--stats-interval"),
        ({"claim_idle": 0}, "--claim-idle"),
        ({"batch_size": "1.5"}, "--batch-size"),
        ({"max_deliveries": True}, "--max-deliveries"),
        ({"metrics_port": 70_000}, "--metrics-port"),
    ],
)
def test_the_command_refuses_numbers_it_cannot_use_from_call_command_too(
    options: dict[str, Any], message: str
) -> None:
    """``call_command`` skips argparse's conversions: the command checks them itself (an
    infinite interval would kill the worker's waits with an ``OverflowError``)."""
    with pytest.raises(CommandError, match=message):
        call_command("rpc_logs_ingest", **options)
    with pytest.raises(CommandError, match=message.removeprefix("--")):
        call_command("rpc_logs_ingest", f"{message}={next(iter(options.values()))}")
