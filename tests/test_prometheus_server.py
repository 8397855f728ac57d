"""A real Prometheus scrapes live servers: the counts and rates it computes from our metrics,
gunicorn's multiprocess mode, and every query of the shipped Grafana dashboard.

One module-scoped scenario (:func:`scenario`), so Prometheus and gunicorn start once:

- **live**: this test process, single-process mode, its ``/metrics/`` served by pytest-django's
  live server. The test makes a known number of calls (some failing, some timing out) in two
  phases, and Prometheus is asked for counts and rates.
- **ingest**: ``manage.py rpc_logs_ingest --metrics-port`` as the docs say, writing the
  entries of a log stream of its own (the real Redis) into a SQLite file of this test.
- **gunicorn**: two sync workers in prometheus-client's multiprocess mode, set up as the docs
  say (``PROMETHEUS_MULTIPROC_DIR``, the ``on_starting`` and ``child_exit`` hooks), each worker
  logging its calls with the buffered writer into a SQLite file of this test.

Prometheus scrapes both every 0.5 s (Debian's ``prometheus``; ``.ci/run`` installs it).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
from django.test import override_settings

from django_rpc_audit import get_rpc_client
from django_rpc_audit.exceptions import RPCError, RPCRemoteError
from django_rpc_audit.integrations import GRAFANA_DASHBOARD
from django_rpc_audit.transports import register_local_handler, unregister_local_handler
from scripts.ipc_server import free_port
from tests.conftest import unavailable
from tests.prometheus_server import PrometheusServer, prometheus_binary
from tests.settings import DJANGO_CFG_RPC
from tests.test_writers_process import run_child, wait_for_port
from tests.test_writers_stream import event, ship

pytestmark = pytest.mark.prometheus

ROOT = Path(__file__).resolve().parent.parent

#: Calls of the live process per method, in the phase the rates are measured over.
LIVE_CALLS = {"ok": 30, "fail": 8, "slow": 4}
#: Log stream entries the live process's ingest worker writes.
INGESTED = 25


@dataclass
class Scenario:
    prometheus: PrometheusServer
    prefix: str  # the live calls' method names start with it
    #: When the live calls of phase 2 were all scraped.
    live_done_at: float = 0.0
    gunicorn_calls: Counter[str] = field(default_factory=Counter)  # by status
    gunicorn_pids: Counter[int] = field(default_factory=Counter)  # calls by worker pid
    multiproc_dir: Path | None = None
    killed_pid: int | None = None
    done_at: float = 0.0


def get_json(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=30) as reply:
        answer: dict[str, Any] = json.load(reply)
        return answer


@pytest.fixture(scope="module")
def gunicorn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path, Path]]:
    """Two gunicorn workers in multiprocess mode; yields (port, multiprocess dir, database)."""
    workdir = tmp_path_factory.mktemp("gunicorn")
    multiproc_dir = workdir / "prometheus"
    multiproc_dir.mkdir()
    (multiproc_dir / "counter_999999.db").write_bytes(b"stale")  # on_starting removes it
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("DJANGO_CFG_RPC__", "PYTEST_", "PROMETHEUS_"))
    }
    env["PYTHONPATH"] = str(ROOT)
    env["PROMETHEUS_MULTIPROC_DIR"] = str(multiproc_dir)
    # The workers' rows go to a database of their own, whatever this run's database is.
    database = workdir / "workers.sqlite3"
    env["DATABASE_URL"] = f"sqlite:///{database}"
    run_child(env, "migrate")
    port = free_port()
    gunicorn = [
        "gunicorn",
        "tests.metrics_app:application",
        "--config=python:tests.gunicorn_prometheus",
    ]
    with serving(
        env, port, *gunicorn, "--workers=2", f"--bind=127.0.0.1:{port}", "--graceful-timeout=10"
    ):
        yield port, multiproc_dir, database


@contextlib.contextmanager
def serving(env: dict[str, str], port: int, module: str, *args: str) -> Iterator[None]:
    """``python -m module args`` running until the block ends (SIGTERM), once it listens on
    ``port``."""
    server = subprocess.Popen(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_for_port(port, server, timeout=60)
        yield
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.communicate()


@pytest.fixture(scope="module")
def ingest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, str]]:
    """``rpc_logs_ingest --metrics-port`` on a log stream of its own; yields (port, stream)."""
    workdir = tmp_path_factory.mktemp("ingest")
    stream = f"rpc_audit_test:{uuid.uuid4().hex}:log"
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("DJANGO_CFG_RPC__", "PYTEST_", "PROMETHEUS_"))
    }
    env.update(
        PYTHONPATH=str(ROOT),
        DATABASE_URL=f"sqlite:///{workdir / 'ingest.sqlite3'}",
        DJANGO_CFG_RPC__PROMETHEUS_METRICS="true",
        DJANGO_CFG_RPC__REDIS_URL=DJANGO_CFG_RPC["REDIS_URL"],
        DJANGO_CFG_RPC__LOG_STREAM=stream,
    )
    run_child(env, "migrate")
    port = free_port()
    command = ["rpc_logs_ingest", "--settings=tests.settings", "--stats-interval=0.2"]
    try:
        with serving(env, port, "django", *command, f"--metrics-port={port}"):
            yield port, stream
    finally:
        redis.Redis.from_url(DJANGO_CFG_RPC["REDIS_URL"]).delete(stream, f"{stream}:dead")


def live_calls(prefix: str, counts: dict[str, int]) -> None:
    client = get_rpc_client()
    for kind, count in counts.items():
        for _ in range(count):
            with contextlib.suppress(RPCError):
                client.call(f"{prefix}.{kind}", timeout=0.01 if kind == "slow" else 5)


@pytest.fixture(scope="module")
def scenario(
    live_server: Any,
    gunicorn: tuple[int, Path, Path],
    ingest: tuple[int, str],
    django_db_blocker: Any,
) -> Iterator[Scenario]:
    if prometheus_binary() is None:
        unavailable("prometheus is not installed (Debian: apt-get install prometheus)")
    port, multiproc_dir, _ = gunicorn
    live = live_server.url.removeprefix("http://")
    prefix = f"live{uuid.uuid4().hex[:8]}"

    def fail(params: dict[str, Any]) -> None:
        raise RPCRemoteError("user_offline", "User is offline")

    register_local_handler(f"{prefix}.ok", lambda params: {"ok": True})
    register_local_handler(f"{prefix}.fail", fail)
    register_local_handler(f"{prefix}.slow", lambda params: time.sleep(0.03))
    rpc = {
        "TRANSPORT": "local",
        "PROMETHEUS_METRICS": True,
        "ENABLE_LOGGING": False,  # rows are the gunicorn workers' part
    }
    with (
        # The live server's thread touches its database connection on every request (Django's
        # request_started closes stale connections), /metrics/ included.
        django_db_blocker.unblock(),
        override_settings(DJANGO_CFG_RPC=rpc),
        PrometheusServer(
            {
                "live": live,
                "gunicorn": f"127.0.0.1:{port}",
                "ingest": f"127.0.0.1:{ingest[0]}",
            }
        ) as prometheus,
    ):
        result = Scenario(prometheus, prefix, multiproc_dir=multiproc_dir)
        live_total = f'sum(rpc_audit_calls_total{{job="live", method=~"{prefix}[.].*"}})'
        # Phase 1: every series exists (one call each) and has been scraped...
        live_calls(prefix, dict.fromkeys(LIVE_CALLS, 1))
        prometheus.wait_for(live_total, len(LIVE_CALLS))
        # ... phase 2: the calls whose rates are measured.
        live_calls(prefix, LIVE_CALLS)
        result.live_done_at = prometheus.wait_for(
            live_total, len(LIVE_CALLS) + sum(LIVE_CALLS.values())
        )

        # The ingest worker: entries shipped as a web process in stream mode would.
        ingest_port, stream = ingest
        ship(DJANGO_CFG_RPC["REDIS_URL"], stream, [event(n) for n in range(INGESTED)])
        prometheus.wait_for('sum(rpc_audit_ingest_rows_written_total{job="ingest"})', INGESTED)
        prometheus.wait_for('max(rpc_audit_ingest_lag_entries{job="ingest"})', 0)

        # gunicorn: calls through HTTP until both workers made some, every kind of call.
        base = f"http://127.0.0.1:{port}/call"
        kinds = ["test.echo", "test.echo", "test.echo", "test.fail", "test.slow"]
        n = 0
        while n < 40 or len(result.gunicorn_pids) < 2:
            assert n < 1000, f"gunicorn sent every request to one worker: {result.gunicorn_pids}"
            method = kinds[n % len(kinds)]
            answer = get_json(f"{base}/{method}/?timeout={0.01 if method == 'test.slow' else 5}")
            result.gunicorn_pids[answer["pid"]] += 1
            result.gunicorn_calls[answer.get("code", "success")] += 1
            n += 1
        total = sum(result.gunicorn_calls.values())
        prometheus.wait_for('sum(rpc_audit_calls_total{job="gunicorn"})', total)
        # Rows written: one per call, two for a call written pending then completed.
        prometheus.wait_for(
            'sum(rpc_audit_log_rows_written_total{job="gunicorn"})', lambda v: v >= total
        )
        prometheus.wait_for('sum(rpc_audit_log_buffered_calls{job="gunicorn"})', 0)

        # A worker dies (gunicorn starts another, child_exit marks it dead); wait until
        # Prometheus has scraped the directory without the dead worker's live gauge.
        result.killed_pid = next(iter(result.gunicorn_pids))
        gauge = multiproc_dir / f"gauge_livesum_{result.killed_pid}.db"
        assert gauge.exists()  # the worker's buffer depth, summed while it lives
        os.kill(result.killed_pid, signal.SIGTERM)
        deadline = time.monotonic() + 60
        while gauge.exists():
            assert time.monotonic() < deadline, "child_exit never marked the worker dead"
            time.sleep(0.1)
        time.sleep(2 * 0.5)
        result.done_at = prometheus.wait_for('sum(rpc_audit_calls_total{job="gunicorn"})', total)
        yield result
    for kind in LIVE_CALLS:
        unregister_local_handler(f"{prefix}.{kind}")


def samples_by_time(series: list[dict[str, Any]]) -> dict[int, float]:
    """Sum a range query's series per sample timestamp (ms), where every series has one."""
    per_time: dict[int, list[float]] = {}
    for one in series:
        for stamp, value in one["values"]:
            per_time.setdefault(round(float(stamp) * 1000), []).append(float(value))
    return {t: sum(v) for t, v in sorted(per_time.items()) if len(v) == len(series)}


# -- one process ------------------------------------------------------------------------------


def test_prometheus_counts_the_calls_by_method_status_and_error_type(scenario: Scenario):
    p = scenario.prefix
    selector = f'rpc_audit_calls_total{{job="live", method=~"{p}[.].*"}}'
    result = scenario.prometheus.query(
        f"sum by (method, status, error_type) ({selector})", at=scenario.live_done_at
    )
    counts = {
        (s["metric"]["method"], s["metric"]["status"], s["metric"].get("error_type", "")): float(
            s["value"][1]
        )
        for s in result
    }
    assert counts == {
        (f"{p}.ok", "success", ""): 1 + LIVE_CALLS["ok"],
        (f"{p}.fail", "failed", "user_offline"): 1 + LIVE_CALLS["fail"],
        (f"{p}.slow", "timeout", "timeout"): 1 + LIVE_CALLS["slow"],
    }
    histogram_count = scenario.prometheus.value(
        f'sum(rpc_audit_call_duration_seconds_count{{job="live", method=~"{p}[.].*"}})',
        at=scenario.live_done_at,
    )
    assert histogram_count == len(LIVE_CALLS) + sum(LIVE_CALLS.values())
    # Timeouts waited 30 ms for a 10 ms limit: none of them in the 25 ms bucket.
    fast_timeouts = scenario.prometheus.value(
        f'sum(rpc_audit_call_duration_seconds_bucket{{job="live", method="{p}.slow", le="0.025"}})',
        at=scenario.live_done_at,
    )
    assert fast_timeouts == 0


def test_prometheus_rates_are_the_calls_over_the_time_they_took(scenario: Scenario):
    """The rate over a window from the last scrape before phase 2 to the last one after it is
    exactly the phase's calls divided by the time between those two scrapes (Prometheus
    extrapolates nothing when the window starts 1 ms before its first sample)."""
    prometheus, p = scenario.prometheus, scenario.prefix
    selector = f'rpc_audit_calls_total{{job="live", method=~"{p}[.].*"}}'
    matrix = prometheus.query(f"{selector}[5m]", at=scenario.live_done_at)
    totals = samples_by_time(matrix)
    phase1, final = len(LIVE_CALLS), len(LIVE_CALLS) + sum(LIVE_CALLS.values())
    before = max(t for t, total in totals.items() if total == phase1)
    after = max(totals)
    assert totals[after] == final
    window_ms = after - before + 1
    at = after / 1000
    seconds = (after - before) / 1000

    rate = prometheus.value(f"sum(rate({selector}[{window_ms}ms]))", at=at)
    assert rate == pytest.approx(sum(LIVE_CALLS.values()) / seconds, rel=1e-9)
    by_status = {
        s["metric"]["status"]: float(s["value"][1])
        for s in prometheus.query(f"sum by (status) (rate({selector}[{window_ms}ms]))", at=at)
    }
    assert by_status == pytest.approx(
        {
            "success": LIVE_CALLS["ok"] / seconds,
            "failed": LIVE_CALLS["fail"] / seconds,
            "timeout": LIVE_CALLS["slow"] / seconds,
        },
        rel=1e-9,
    )
    error_ratio = prometheus.value(
        f'sum(rate({selector[:-1]}, status!="success"}}[{window_ms}ms])) '
        f"/ sum(rate({selector}[{window_ms}ms]))",
        at=at,
    )
    failed = LIVE_CALLS["fail"] + LIVE_CALLS["slow"]
    assert error_ratio == pytest.approx(failed / sum(LIVE_CALLS.values()), rel=1e-9)


def test_prometheus_sees_the_ingest_workers_rows_batches_and_lag(scenario: Scenario):
    prometheus, at = scenario.prometheus, scenario.done_at
    rows = prometheus.value('sum(rpc_audit_ingest_rows_written_total{job="ingest"})', at=at)
    assert rows == INGESTED
    batches = prometheus.value('sum(rpc_audit_ingest_batches_total{job="ingest"})', at=at)
    assert batches is not None
    assert batches >= 1
    timed = prometheus.value(
        'sum(rpc_audit_ingest_batch_duration_seconds_count{job="ingest"})', at=at
    )
    assert timed == batches
    assert prometheus.value('max(rpc_audit_ingest_lag_entries{job="ingest"})', at=at) == 0
    assert prometheus.value('max(rpc_audit_ingest_pending_entries{job="ingest"})', at=at) == 0


# -- gunicorn, multiprocess -------------------------------------------------------------------


def test_the_scrape_of_two_gunicorn_workers_reports_their_sum(scenario: Scenario):
    prometheus = scenario.prometheus
    assert len(scenario.gunicorn_pids) == 2  # both workers made calls...
    assert min(scenario.gunicorn_pids.values()) >= 1
    total = sum(scenario.gunicorn_pids.values())
    # ... and one scrape (served by either worker) reports all of them, by status.
    by_status = {
        (s["metric"]["status"], s["metric"].get("error_type", "")): float(s["value"][1])
        for s in prometheus.query(
            'sum by (status, error_type) (rpc_audit_calls_total{job="gunicorn"})',
            at=scenario.done_at,
        )
    }
    assert by_status == {
        ("success", ""): scenario.gunicorn_calls["success"],
        ("failed", "user_offline"): scenario.gunicorn_calls["user_offline"],
        ("timeout", "timeout"): scenario.gunicorn_calls["timeout"],
    }
    assert sum(by_status.values()) == total
    # Each worker kept its own files; the collector summed them.
    assert scenario.multiproc_dir is not None
    for pid in scenario.gunicorn_pids:
        assert (scenario.multiproc_dir / f"counter_{pid}.db").exists()
    assert not (scenario.multiproc_dir / "counter_999999.db").exists()  # on_starting


def test_a_dead_workers_counts_stay_and_its_live_gauge_goes(scenario: Scenario, gunicorn):
    _, multiproc_dir, database = gunicorn
    prometheus = scenario.prometheus
    total = sum(scenario.gunicorn_pids.values())
    # Killed after its calls: the scrape still counts them (mark_process_dead keeps counters).
    assert (
        prometheus.value('sum(rpc_audit_calls_total{job="gunicorn"})', at=scenario.done_at) == total
    )
    assert not (multiproc_dir / f"gauge_livesum_{scenario.killed_pid}.db").exists()
    assert (multiproc_dir / f"counter_{scenario.killed_pid}.db").exists()
    # The pipeline: every call's row was written (counted by the workers' writer threads).
    written = prometheus.value(
        'sum(rpc_audit_log_rows_written_total{job="gunicorn"})', at=scenario.done_at
    )
    assert written is not None
    assert written >= total
    (report,) = run_child(
        {**os.environ, "PYTHONPATH": str(ROOT), "DATABASE_URL": f"sqlite:///{database}"},
        "report",
    )
    assert report["by_who"]["web"] == total
    batches = prometheus.value(
        'sum(rpc_audit_log_write_duration_seconds_count{job="gunicorn"})', at=scenario.done_at
    )
    assert batches is not None
    assert batches >= 1


# -- the Grafana dashboard ---------------------------------------------------------------------

#: What Grafana puts in place of the dashboard's variables: every job and method ("All"),
#: and a rate window that covers the whole scenario.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$job": ".*", "$method": ".*"}


def dashboard_queries() -> list[tuple[str, str]]:
    dashboard = json.loads(GRAFANA_DASHBOARD.read_text())
    queries = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            queries.append((panel["title"], target["expr"]))
    return queries


def grafana_expr(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"a variable the test does not know: {expr}"
    return expr


def test_the_dashboard_has_a_prometheus_datasource_variable_and_queries():
    dashboard = json.loads(GRAFANA_DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert panel["targets"], panel["title"]
    assert len(dashboard_queries()) >= 15


def test_every_dashboard_query_returns_data_from_prometheus(scenario: Scenario):
    prometheus = scenario.prometheus
    empty = []
    for title, expr in dashboard_queries():
        result = prometheus.query(grafana_expr(expr), at=scenario.done_at)
        values = [float(sample["value"][1]) for sample in result]
        if not any(math.isfinite(v) for v in values):
            empty.append((title, expr, values))
    assert empty == []


def test_the_dashboard_variables_find_the_jobs_and_methods(scenario: Scenario):
    dashboard = json.loads(GRAFANA_DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["job"]["definition"] == "label_values(rpc_audit_calls_total, job)"
    jobs = scenario.prometheus.api("label/job/values", **{"match[]": "rpc_audit_calls_total"})
    assert {"live", "gunicorn"} <= set(jobs)
    methods = scenario.prometheus.api(
        "label/method/values", **{"match[]": grafana_expr('rpc_audit_calls_total{job=~"$job"}')}
    )
    assert {"test.echo", "test.fail", "test.slow", f"{scenario.prefix}.ok"} <= set(methods)
