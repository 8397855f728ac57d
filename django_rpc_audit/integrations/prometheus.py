"""Prometheus: call counters and durations, and the log pipeline's health, in
prometheus-client's default registry; the ``/metrics`` view; gunicorn's multiprocess mode.

Needs ``prometheus-client`` (``django-rpc-audit[prometheus]``). Metric names (every label value
bounded: methods beyond ``METRICS_MAX_METHODS`` and error types beyond 50 are ``_OTHER``; no
user, IP or id is ever a label):

- ``rpc_audit_calls_total{method, status, error_type}``: finished calls.
- ``rpc_audit_call_duration_seconds{method, status}``: their durations (histogram, the
  OpenTelemetry conventions' advised buckets).
- ``rpc_audit_log_buffered_calls``: calls waiting in the buffered writer (multiprocess: summed
  over the live processes).
- ``rpc_audit_log_rows_written_total``, ``rpc_audit_log_rows_dropped_total`` (buffer full),
  ``rpc_audit_log_rows_refused_total`` (the database refused the row),
  ``rpc_audit_log_write_retries_total`` (database unreachable).
- ``rpc_audit_log_write_duration_seconds``: time to write one batch (histogram).

With ``WRITE_MODE = "stream"`` the same metrics describe the web process's side: rows written
are rows added to the log stream, retries those of an unreachable Redis. The ingest workers
(``rpc_logs_ingest --metrics-port``) publish theirs:

- ``rpc_audit_ingest_rows_written_total``, ``rpc_audit_ingest_batches_total``: rows and
  transactions committed.
- ``rpc_audit_ingest_entries_claimed_total`` (taken over from dead consumers),
  ``rpc_audit_ingest_entries_dead_lettered_total``, ``rpc_audit_ingest_entries_trimmed_total``
  (trimmed from the stream before they were written: rows lost),
  ``rpc_audit_ingest_write_retries_total`` (database unreachable).
- ``rpc_audit_ingest_lag_entries`` (added to the stream, not yet read by the group) and
  ``rpc_audit_ingest_pending_entries`` (read, not yet acknowledged): the consumer group's, the
  same from every worker (take their ``max``).
- ``rpc_audit_ingest_batch_duration_seconds``: time to write one batch (histogram).

With ``PROMETHEUS_MULTIPROC_DIR`` set before the process starts, prometheus-client keeps every
value in files in that directory and :func:`metrics_view` sums them over the processes
(gunicorn workers). django-prometheus exports the same default registry, so its ``/metrics``
shows these metrics too.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Any

from django.http import HttpRequest, HttpResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

from django_rpc_audit.writers.base import WriterStats
from django_rpc_audit.writers.ingest import IngestStats

NAMESPACE = "rpc_audit"
#: Call duration buckets, in seconds: the OpenTelemetry RPC conventions' advised boundaries.
CALL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10)
#: Batch write buckets, in seconds: a batch of 1,000 rows takes tens of milliseconds.
WRITE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


@dataclass(frozen=True, slots=True)
class Metrics:
    """The process's metric objects, registered once in prometheus-client's default registry."""

    calls: Counter
    call_duration: Histogram
    buffered: Gauge
    written: Counter
    dropped: Counter
    refused: Counter
    retries: Counter
    write_duration: Histogram
    ingest_rows: Counter
    ingest_batches: Counter
    ingest_claimed: Counter
    ingest_dead_lettered: Counter
    ingest_trimmed: Counter
    ingest_retries: Counter
    ingest_lag: Gauge
    ingest_pending: Gauge
    ingest_batch_duration: Histogram


_metrics: Metrics | None = None
_metrics_lock = threading.Lock()


def get_metrics() -> Metrics:
    """The metrics, made and registered in the default registry on first use."""
    global _metrics
    if _metrics is None:
        with _metrics_lock:
            if _metrics is None:
                _metrics = Metrics(
                    calls=Counter(
                        "calls",
                        "RPC calls made, by method, status and error type.",
                        ["method", "status", "error_type"],
                        namespace=NAMESPACE,
                    ),
                    call_duration=Histogram(
                        "call_duration_seconds",
                        "Duration of RPC calls in seconds, by method and status.",
                        ["method", "status"],
                        namespace=NAMESPACE,
                        buckets=CALL_BUCKETS,
                    ),
                    buffered=Gauge(
                        "log_buffered_calls",
                        "Calls waiting in the buffered log writer.",
                        namespace=NAMESPACE,
                        multiprocess_mode="livesum",
                    ),
                    written=Counter(
                        "log_rows_written",
                        "RPC log rows written by the buffered writer (stream mode: added to "
                        "the log stream).",
                        namespace=NAMESPACE,
                    ),
                    dropped=Counter(
                        "log_rows_dropped",
                        "Calls not logged because the writer's buffer was full.",
                        namespace=NAMESPACE,
                    ),
                    refused=Counter(
                        "log_rows_refused",
                        "RPC log rows the database refused (not retried).",
                        namespace=NAMESPACE,
                    ),
                    retries=Counter(
                        "log_write_retries",
                        "Batch writes retried because the database (stream mode: the log "
                        "stream's Redis) was unreachable.",
                        namespace=NAMESPACE,
                    ),
                    write_duration=Histogram(
                        "log_write_duration_seconds",
                        "Time to write one batch of RPC log rows, in seconds.",
                        namespace=NAMESPACE,
                        buckets=WRITE_BUCKETS,
                    ),
                    **_ingest_metrics(),
                )
    return _metrics


def _ingest_metrics() -> dict[str, Any]:
    def counter(name: str, documentation: str) -> Counter:
        return Counter(name, documentation, namespace=NAMESPACE)

    def gauge(name: str, documentation: str) -> Gauge:
        # Every worker reports the same group figure: the largest of the live ones, not a sum.
        return Gauge(name, documentation, namespace=NAMESPACE, multiprocess_mode="livemax")

    return {
        "ingest_rows": counter("ingest_rows_written", "RPC log rows the ingest workers wrote."),
        "ingest_batches": counter(
            "ingest_batches", "Batches (transactions) the ingest workers wrote."
        ),
        "ingest_claimed": counter(
            "ingest_entries_claimed", "Log stream entries taken over from dead consumers."
        ),
        "ingest_dead_lettered": counter(
            "ingest_entries_dead_lettered", "Log stream entries moved to the dead-letter stream."
        ),
        "ingest_trimmed": counter(
            "ingest_entries_trimmed",
            "Pending log stream entries trimmed (LOG_STREAM_MAXLEN) before they were written.",
        ),
        "ingest_retries": counter(
            "ingest_write_retries", "Batch writes retried because the database was unreachable."
        ),
        "ingest_lag": gauge(
            "ingest_lag_entries", "Log stream entries not yet delivered to an ingest worker."
        ),
        "ingest_pending": gauge(
            "ingest_pending_entries", "Log stream entries delivered but not yet acknowledged."
        ),
        "ingest_batch_duration": Histogram(
            "ingest_batch_duration_seconds",
            "Time an ingest worker took to write one batch, in seconds.",
            namespace=NAMESPACE,
            buckets=WRITE_BUCKETS,
        ),
    }


class PrometheusCallRecorder:
    """Counts and times each finished call (labels already bounded by the instrumentation)."""

    def __init__(self) -> None:
        self.metrics = get_metrics()
        # prometheus-client's labels() takes a lock and builds a key on every call; the label
        # sets are bounded, so their children are kept here.
        self._children: dict[tuple[str, str, str], tuple[Counter, Histogram]] = {}

    def record(self, method: str, status: str, error_type: str, seconds: float) -> None:
        key = (method, status, error_type)
        children = self._children.get(key)
        if children is None:
            children = (
                self.metrics.calls.labels(method, status, error_type),
                self.metrics.call_duration.labels(method, status),
            )
            self._children[key] = children
        calls, duration = children
        calls.inc()
        duration.observe(seconds)


def _add_increases(*counts: tuple[Counter, int, int]) -> None:
    """Add to each counter the increase of a count since it was last seen: ``(counter, now,
    before)``. A count below its last value was reset (a new writer): all of it is new."""
    for counter, now, before in counts:
        delta = now - before if now >= before else now
        if delta:
            counter.inc(delta)


class PipelineMetrics:
    """Publishes a buffered writer's counters (a
    :class:`~django_rpc_audit.writers.base.WriterObserver`), on the writer's thread."""

    def __init__(self) -> None:
        self.metrics = get_metrics()
        self._last = WriterStats()
        self._pid = os.getpid()

    def batch_written(self, rows: int, seconds: float) -> None:
        self.metrics.write_duration.observe(seconds)

    def counts(self, stats: WriterStats) -> None:
        if os.getpid() != self._pid:
            # A forked child's writer starts from zero: so do its deltas.
            self._last, self._pid = WriterStats(), os.getpid()
        metrics, last = self.metrics, self._last
        metrics.buffered.set(stats.buffered)
        _add_increases(
            (metrics.written, stats.written, last.written),
            (metrics.dropped, stats.dropped, last.dropped),
            (metrics.refused, stats.failed, last.failed),
            (metrics.retries, stats.retries, last.retries),
        )
        self._last = stats


class IngestMetrics:
    """Publishes an ingest worker's figures (an
    :class:`~django_rpc_audit.writers.ingest.IngestObserver`). One per worker: it counts the
    increase of that worker's counters."""

    def __init__(self) -> None:
        self.metrics = get_metrics()
        self._last = IngestStats()

    def batch_written(self, rows: int, seconds: float) -> None:
        self.metrics.ingest_batch_duration.observe(seconds)

    def counts(self, stats: IngestStats) -> None:
        metrics, last = self.metrics, self._last
        _add_increases(
            (metrics.ingest_rows, stats.rows, last.rows),
            (metrics.ingest_batches, stats.batches, last.batches),
            (metrics.ingest_claimed, stats.claimed, last.claimed),
            (metrics.ingest_dead_lettered, stats.dead_lettered, last.dead_lettered),
            (metrics.ingest_trimmed, stats.trimmed, last.trimmed),
            (metrics.ingest_retries, stats.retries, last.retries),
        )
        if stats.backlog_at is not None:
            if stats.lag is not None:
                metrics.ingest_lag.set(stats.lag)
            if stats.pending is not None:
                metrics.ingest_pending.set(stats.pending)
        self._last = stats


def serve_metrics(port: int, address: str = "127.0.0.1") -> Any:
    """Serve this process's metrics at ``http://<address>:<port>/metrics`` from a daemon thread
    (prometheus-client's server): for a process with no web server, the ingest worker. Only its
    own metrics, even in multiprocess mode, so that no process is counted twice."""
    from prometheus_client import start_http_server

    get_metrics()  # every family shows, at zero, before the first batch
    server, _ = start_http_server(port, address)
    return server  # shutdown() stops it


def exposition() -> bytes:
    """This process's metrics in Prometheus' text format; in multiprocess mode
    (``PROMETHEUS_MULTIPROC_DIR``), those of every process sharing the directory."""
    get_metrics()  # every family shows, at zero, before the first call
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry)
    return generate_latest(REGISTRY)


def metrics_view(request: HttpRequest) -> HttpResponse:
    """The ``/metrics`` endpoint for Prometheus to scrape::

        # urls.py
        from django_rpc_audit.integrations.prometheus import metrics_view

        urlpatterns += [path("metrics", metrics_view)]

    Serve it only where Prometheus can reach it (it has no authentication). With
    django-prometheus, use its ``/metrics`` instead: it shows these metrics as well.
    """
    return HttpResponse(exposition(), content_type=CONTENT_TYPE_LATEST)


# -- gunicorn (multiprocess mode) ---------------------------------------------------------------
# In gunicorn.conf.py:
#     from django_rpc_audit.integrations.prometheus import child_exit, on_starting


def on_starting(server: object) -> None:
    """gunicorn's ``on_starting`` hook: empty ``PROMETHEUS_MULTIPROC_DIR`` of an earlier run's
    files, which would otherwise be summed into this run's metrics."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not directory:
        return
    os.makedirs(directory, exist_ok=True)
    for name in os.listdir(directory):
        if name.endswith(".db"):
            os.remove(os.path.join(directory, name))


def child_exit(server: object, worker: object) -> None:
    """gunicorn's ``child_exit`` hook: forget a dead worker's live gauges (its buffer depth);
    its counters stay, so totals never go down."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.mark_process_dead(worker.pid)  # type: ignore[attr-defined,no-untyped-call]
