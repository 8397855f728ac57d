"""Prometheus: call metrics by method, status and error type, the log pipeline's health, the
``/metrics`` view, django-prometheus, bounded labels. The real Prometheus server and gunicorn's
multiprocess mode are in ``test_prometheus_server.py``."""

from __future__ import annotations

import io
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from django.core.management import CommandError, call_command
from django.test import Client, override_settings
from django.urls import include, path
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from django_rpc_audit import get_rpc_client
from django_rpc_audit.exceptions import RPCRemoteError, RPCTimeoutError
from django_rpc_audit.integrations.prometheus import (
    CALL_BUCKETS,
    IngestMetrics,
    PipelineMetrics,
    get_metrics,
)
from django_rpc_audit.models import RPCLog
from django_rpc_audit.writers import (
    BufferedLogWriter,
    IngestWorker,
    StreamLogWriter,
    WriterStats,
    flush,
    get_writer,
    use_writer,
)
from scripts.ipc_server import free_port
from tests.test_writers_stream import drain, ship
from tests.test_writers_stream import event as stream_event

pytestmark = pytest.mark.django_db


@pytest.fixture
def prometheus_on(rpc_settings: Callable[..., dict[str, Any]]) -> None:
    rpc_settings(PROMETHEUS_METRICS=True)


def sample(name: str, **labels: str) -> float:
    """A sample of the default registry, 0 when the series does not exist yet."""
    return REGISTRY.get_sample_value(name, labels) or 0.0


def unique_method(prefix: str = "prom") -> str:
    # The registry is process-wide: each test counts calls of its own methods.
    return f"{prefix}.{uuid.uuid4().hex[:12]}"


def test_calls_are_counted_and_timed_by_method_status_and_error_type(prometheus_on, local_handler):
    ok, failing, slow = unique_method(), unique_method(), unique_method()
    local_handler(ok, lambda params: {"ok": True})

    def fail(params: dict[str, Any]) -> None:
        raise RPCRemoteError("user_offline", "offline")

    local_handler(failing, fail)
    local_handler(slow, lambda params: time.sleep(0.03))
    for _ in range(3):
        get_rpc_client().call(ok)
    for _ in range(2):
        with pytest.raises(RPCRemoteError):
            get_rpc_client().call(failing)
    with pytest.raises(RPCTimeoutError):
        get_rpc_client().call(slow, timeout=0.01)

    calls = "rpc_audit_calls_total"
    assert sample(calls, method=ok, status="success", error_type="") == 3
    assert sample(calls, method=failing, status="failed", error_type="user_offline") == 2
    assert sample(calls, method=slow, status="timeout", error_type="timeout") == 1
    duration = "rpc_audit_call_duration_seconds"
    assert sample(f"{duration}_count", method=ok, status="success") == 3
    rows = RPCLog.objects.filter(method=ok)
    assert sample(f"{duration}_sum", method=ok, status="success") == pytest.approx(
        sum(row.duration_ms for row in rows) / 1000, rel=1e-9
    )
    # The slow call took 30 ms or more: above the 25 ms bucket, within 50 ms only if quick.
    assert sample(f"{duration}_bucket", method=slow, status="timeout", le="0.025") == 0
    assert sample(f"{duration}_bucket", method=slow, status="timeout", le="+Inf") == 1


def test_the_histogram_has_the_conventions_buckets():
    (family,) = [m for m in REGISTRY.collect() if m.name == "rpc_audit_call_duration_seconds"]
    assert CALL_BUCKETS == (
        0.005,
        0.01,
        0.025,
        0.05,
        0.075,
        0.1,
        0.25,
        0.5,
        0.75,
        1,
        2.5,
        5,
        7.5,
        10,
    )
    assert get_metrics().call_duration._upper_bounds == [*map(float, CALL_BUCKETS), float("inf")]
    assert family.type == "histogram"


def test_labels_are_bounded_and_never_name_a_user_or_an_ip(
    prometheus_on, rpc_settings, local_handler
):
    rpc_settings(METRICS_MAX_METHODS=2)
    methods = [unique_method("bound") for _ in range(5)]
    for method in methods:
        local_handler(method, lambda params: {})
    before = sample("rpc_audit_calls_total", method="_OTHER", status="success", error_type="")
    for method in methods:
        get_rpc_client().call(method, user_agent="Mozilla/5.0", caller_ip="203.0.113.9")

    ok = {"status": "success", "error_type": ""}
    assert sample("rpc_audit_calls_total", method=methods[0], **ok) == 1
    assert sample("rpc_audit_calls_total", method=methods[1], **ok) == 1
    assert sample("rpc_audit_calls_total", method=methods[2], **ok) == 0
    assert sample("rpc_audit_calls_total", method="_OTHER", **ok) - before == 3
    label_names = {
        family.name: {name for s in family.samples for name in s.labels}
        for family in REGISTRY.collect()
        if family.name.startswith("rpc_audit_")
    }
    assert label_names["rpc_audit_calls"] == {"method", "status", "error_type"}
    assert label_names["rpc_audit_call_duration_seconds"] == {"method", "status", "le"}
    exposition = Client().get("/metrics/").content.decode()
    assert "203.0.113.9" not in exposition
    assert "Mozilla" not in exposition


def test_error_types_are_bounded_too(prometheus_on, local_handler, monkeypatch):
    monkeypatch.setattr("django_rpc_audit.integrations.base.MAX_ERROR_TYPES", 2)
    method = unique_method()
    codes = iter(["code_a", "code_b", "code_c", "code_d"])

    def fail(params: dict[str, Any]) -> None:
        raise RPCRemoteError(next(codes), "no")

    local_handler(method, fail)
    for _ in range(4):
        with pytest.raises(RPCRemoteError):
            get_rpc_client().call(method)

    failed = {"method": method, "status": "failed"}
    assert sample("rpc_audit_calls_total", error_type="code_a", **failed) == 1
    assert sample("rpc_audit_calls_total", error_type="code_b", **failed) == 1
    assert sample("rpc_audit_calls_total", error_type="_OTHER", **failed) == 2


def test_nothing_is_counted_when_off(local_handler):
    method = unique_method()
    local_handler(method, lambda params: {})
    get_rpc_client().call(method)
    assert get_rpc_client().instrumentation is None
    assert sample("rpc_audit_calls_total", method=method, status="success", error_type="") == 0


def test_a_broken_metric_never_fails_a_call(prometheus_on, local_handler, monkeypatch):
    method = unique_method()
    local_handler(method, lambda params: {"ok": 1})
    instrumentation = get_rpc_client().instrumentation
    assert instrumentation is not None
    (recorder,) = instrumentation.recorders

    def explode(*args: Any) -> None:
        raise OSError("no space left on the multiprocess directory")

    monkeypatch.setattr(recorder, "record", explode)
    assert get_rpc_client().call(method) == {"ok": 1}
    assert RPCLog.objects.get(method=method).status == "success"


# -- the log pipeline's health ----------------------------------------------------------------


def test_the_pipeline_publishes_rows_written_drops_and_write_latency(prometheus_on, local_handler):
    local_handler("test.echo", lambda params: {})
    writer = BufferedLogWriter(buffer_size=3, background=False)
    writer.observer = PipelineMetrics()
    before = {
        name: sample(name)
        for name in (
            "rpc_audit_log_rows_written_total",
            "rpc_audit_log_rows_dropped_total",
            "rpc_audit_log_write_duration_seconds_count",
        )
    }
    with use_writer(writer):
        for n in range(5):  # a buffer of 3: two successful calls are dropped
            get_rpc_client().call("test.echo", {"n": n})
        assert writer.flush()

    assert RPCLog.objects.count() == 3
    assert (
        sample("rpc_audit_log_rows_written_total") - before["rpc_audit_log_rows_written_total"] == 3
    )
    assert (
        sample("rpc_audit_log_rows_dropped_total") - before["rpc_audit_log_rows_dropped_total"] == 2
    )
    assert (
        sample("rpc_audit_log_write_duration_seconds_count")
        - before["rpc_audit_log_write_duration_seconds_count"]
        == 1
    )  # one batch
    assert sample("rpc_audit_log_buffered_calls") == 0


def test_pipeline_counters_follow_the_writers_and_restart_with_a_new_one():
    metrics = PipelineMetrics()
    names = (
        "rpc_audit_log_rows_written_total",
        "rpc_audit_log_rows_dropped_total",
        "rpc_audit_log_rows_refused_total",
        "rpc_audit_log_write_retries_total",
    )
    before = {name: sample(name) for name in names}

    metrics.counts(WriterStats(buffered=7, written=10, dropped=1, failed=2, retries=3))
    assert sample("rpc_audit_log_buffered_calls") == 7
    metrics.counts(WriterStats(buffered=0, written=15, dropped=1, failed=2, retries=4))
    # A new writer (a rebuilt one) starts from zero: its counts are all new.
    metrics.counts(WriterStats(buffered=0, written=4, dropped=0, failed=0, retries=0))

    deltas = {name: sample(name) - before[name] for name in names}
    assert deltas == {
        "rpc_audit_log_rows_written_total": 19,
        "rpc_audit_log_rows_dropped_total": 1,
        "rpc_audit_log_rows_refused_total": 2,
        "rpc_audit_log_write_retries_total": 4,
    }
    assert sample("rpc_audit_log_buffered_calls") == 0


def test_the_buffered_writer_gets_the_pipeline_observer_when_prometheus_is_on(rpc_settings):
    rpc_settings(WRITE_MODE="buffered")
    writer = get_writer()
    assert isinstance(writer, BufferedLogWriter)
    assert writer.observer is None
    rpc_settings(PROMETHEUS_METRICS=True)
    writer = get_writer()
    assert isinstance(writer, BufferedLogWriter)
    assert isinstance(writer.observer, PipelineMetrics)


# -- exposition -------------------------------------------------------------------------------


def families(text: str) -> dict[str, Any]:
    return {family.name: family for family in text_string_to_metric_families(text)}


def calls_of(exposed: dict[str, Any], method: str) -> float:
    """The ``rpc_audit_calls_total`` sample of ``method`` in a parsed exposition."""
    (sample,) = [
        s
        for s in exposed["rpc_audit_calls"].samples
        if s.labels.get("method") == method and s.name.endswith("_total")
    ]
    return float(sample.value)


def test_metrics_view_exposes_every_family_in_the_text_format(prometheus_on, local_handler):
    method = unique_method()
    local_handler(method, lambda params: {})
    get_rpc_client().call(method)

    response = Client().get("/metrics/")

    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/plain; version=")
    exposed = families(response.content.decode())
    for name in (
        "rpc_audit_calls",
        "rpc_audit_call_duration_seconds",
        "rpc_audit_log_buffered_calls",
        "rpc_audit_log_rows_written",
        "rpc_audit_log_rows_dropped",
        "rpc_audit_log_rows_refused",
        "rpc_audit_log_write_retries",
        "rpc_audit_log_write_duration_seconds",
    ):
        assert name in exposed, name
    assert calls_of(exposed, method) == 1


urlpatterns = [path("", include("django_prometheus.urls"))]


@override_settings(ROOT_URLCONF=__name__)
def test_django_prometheus_metrics_endpoint_shows_our_metrics(prometheus_on, local_handler):
    method = unique_method()
    local_handler(method, lambda params: {})
    get_rpc_client().call(method)

    response = Client().get("/metrics")

    assert response.status_code == 200
    exposed = families(response.content.decode())
    assert calls_of(exposed, method) == 1
    assert "rpc_audit_log_rows_written" in exposed


# -- the log stream: the web side and the ingest workers --------------------------------------


@pytest.fixture
def log_stream(redis_client: Any) -> Any:
    stream = f"rpc_audit_test:{uuid.uuid4().hex}:log"
    yield stream
    redis_client.delete(stream, f"{stream}:dead")


@pytest.mark.django_db(transaction=True)
def test_the_stream_writer_publishes_its_batches_like_the_buffered_writer(
    rpc_settings, local_handler, redis_url, redis_client, log_stream
):
    rpc_settings(WRITE_MODE="stream", LOG_STREAM=log_stream, REDIS_URL=redis_url)
    writer = get_writer()
    assert isinstance(writer, StreamLogWriter)
    assert writer.observer is None
    rpc_settings(WRITE_MODE="stream", LOG_STREAM=log_stream, PROMETHEUS_METRICS=True)
    writer = get_writer()
    assert isinstance(writer, StreamLogWriter)
    assert isinstance(writer.observer, PipelineMetrics)
    names = ("rpc_audit_log_rows_written_total", "rpc_audit_log_write_duration_seconds_count")
    before = {name: sample(name) for name in names}
    local_handler("test.echo", lambda params: {})
    try:
        for n in range(4):
            get_rpc_client().call("test.echo", {"n": n})
        assert flush()
    finally:
        writer.close()
    assert redis_client.xlen(log_stream) >= 4  # in the stream: rows added there
    assert sample(names[0]) - before[names[0]] == redis_client.xlen(log_stream)
    assert sample(names[1]) - before[names[1]] >= 1
    assert sample("rpc_audit_log_buffered_calls") == 0


@pytest.mark.django_db(transaction=True)
def test_the_ingest_worker_publishes_rows_batches_claims_dead_letters_and_lag(
    rpc_settings, redis_url, redis_client, log_stream
):
    rpc_settings(LOG_STREAM=log_stream, REDIS_URL=redis_url, INGEST_GROUP="g")
    assert IngestWorker.from_config().observer is None  # off: nothing is published
    rpc_settings(PROMETHEUS_METRICS=True)
    names = {
        "rows": "rpc_audit_ingest_rows_written_total",
        "batches": "rpc_audit_ingest_batches_total",
        "claimed": "rpc_audit_ingest_entries_claimed_total",
        "dead": "rpc_audit_ingest_entries_dead_lettered_total",
        "durations": "rpc_audit_ingest_batch_duration_seconds_count",
    }
    before = {key: sample(name) for key, name in names.items()}
    ship(redis_url, log_stream, [stream_event(n) for n in range(30)])
    redis_client.xadd(log_stream, {"r": "0\x00not an entry"})
    worker = IngestWorker.from_config(claim_idle_seconds=0.2, block_ms=50)
    assert isinstance(worker.observer, IngestMetrics)
    worker.ensure_group()
    worker._refresh_backlog()  # what the worker does every stats_interval
    assert sample("rpc_audit_ingest_lag_entries") == 31  # nothing read yet
    assert sample("rpc_audit_ingest_pending_entries") == 0
    # A consumer takes ten entries and dies: claimed by the worker after 0.2 s.
    redis_client.xreadgroup("g", "dead-consumer", {log_stream: ">"}, count=10)
    drain(worker)

    stats = worker.stats()
    deltas = {key: sample(name) - before[key] for key, name in names.items()}
    assert deltas == {
        "rows": 30,
        "batches": stats.batches,
        "claimed": 10,
        "dead": 1,
        "durations": stats.batches,
    }
    assert stats.batches >= 2  # the claimed ones came in a batch of their own
    assert sample("rpc_audit_ingest_lag_entries") == 0
    assert sample("rpc_audit_ingest_pending_entries") == 0


@pytest.mark.django_db(transaction=True)
def test_the_ingest_command_serves_its_metrics(rpc_settings, redis_url, log_stream):
    rpc_settings(LOG_STREAM=log_stream, REDIS_URL=redis_url)
    with pytest.raises(CommandError, match="PROMETHEUS_METRICS"):
        call_command("rpc_logs_ingest", "--metrics-port", "9")
    rpc_settings(PROMETHEUS_METRICS=True)
    port = free_port()
    before = sample("rpc_audit_ingest_rows_written_total")
    ship(redis_url, log_stream, [stream_event(n) for n in range(3)])
    scraped: list[str] = []

    def scrape_then_stop() -> None:
        url = f"http://127.0.0.1:{port}/metrics"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(url, timeout=5) as reply:
                    text = reply.read().decode()
            except OSError:
                time.sleep(0.05)
                continue
            exposed = families(text)
            rows = exposed.get("rpc_audit_ingest_rows_written")
            if rows is not None and rows.samples[0].value - before >= 3:
                scraped.append(text)
                break
            time.sleep(0.05)
        for worker in list(IngestWorker.running):
            worker.stop()

    scraper = threading.Thread(target=scrape_then_stop)
    scraper.start()
    call_command(
        "rpc_logs_ingest",
        "--metrics-port",
        str(port),
        "--stats-interval",
        "0.05",
        stdout=io.StringIO(),
    )
    scraper.join()
    (text,) = scraped
    for name in ("rpc_audit_ingest_lag_entries", "rpc_audit_ingest_batch_duration_seconds"):
        assert name in families(text)
    with pytest.raises(urllib.error.URLError, match="refused"):  # stopped with the worker
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)
