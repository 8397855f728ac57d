"""Billing is exact: the monthly usage report equals, to the cent, the calls actually made.

Thousands of calls by several users (and anonymous ones) of priced, per-recipient, free and
failing methods, with uncosted successes sampled at 10 %, in ``WRITE_MODE = "stream"``; the
ingest worker's database is cut for a while (a TCP proxy, as in ``test_ingest_process.py``),
the worker is killed mid-batch and restarted, a web process is killed right after shipping
its calls, ``rpc_rollup`` runs while rows are still arriving, and finally ``rpc_logs_cleanup
--days 0`` deletes every row. The test keeps its own ledger of what each call must cost
(``tests/billing_process.py``) and compares the report with it, before and after cleanup.
"""

from __future__ import annotations

import json
import random
import signal
from decimal import Decimal
from io import StringIO
from typing import Any

import pytest
import redis
from django.core.management import call_command
from django.db import connection
from django.db.models import Count, F, FloatField, Sum, Value

from django_rpc_audit.models import RPCLog, RPCRollup
from django_rpc_audit.rollups.maintain import roll_up
from django_rpc_audit.usage import month_range, usage
from django_rpc_audit.writers import StreamLogWriter, use_writer
from tests import billing_process
from tests.billing_process import Ledger, make_calls, register_handlers
from tests.conftest import SERVER_DATABASES
from tests.factories import UserFactory
from tests.tcp_proxy import TCPProxy
from tests.test_ingest_process import (
    ROOT,
    backlog,
    pipeline_env,  # noqa: F401  (a fixture)
    rows,
    start_worker,
    stop_worker,
    wait_for,
)


def is_stopped(pid: int) -> bool:
    """Whether the process is stopped (``T`` in ``/proc/<pid>/stat``, after its name)."""
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rpartition(")")[2].split()[0] == "T"


SERVER_ONLY = pytest.mark.skipif(
    connection.vendor == "sqlite",
    reason="several processes share the database: PostgreSQL or MariaDB",
)


def report(months: set[str]) -> dict[tuple[str, str, str], list[Any]]:
    """The usage report of ``months``: billed calls and cost per (month, user, method)."""
    lines = {}
    for month in sorted(months):
        for line in usage(*month_range(month), by=("user", "method"), billed_only=True):
            lines[(month, line.username or "", line.method or "")] = [
                line.billed_calls,
                line.cost,
            ]
    return lines


def expected(ledger: Ledger) -> dict[tuple[str, str, str], list[Any]]:
    return {key: [count, cost] for key, (count, cost) in ledger.lines.items()}


def web_child(env: dict[str, str], calls: int, seed: int, usernames: list[str]) -> Any:
    import subprocess
    import sys

    child_env = dict(env)
    child_env.update(
        DJANGO_CFG_RPC__COSTS=billing_process.COSTS_ENV,
        DJANGO_CFG_RPC__SAMPLE_RATE="0.1",
    )
    return subprocess.Popen(
        [sys.executable, "-m", "tests.billing_process", str(calls), str(seed), *usernames],
        cwd=ROOT,
        env=child_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@SERVER_ONLY
@pytest.mark.django_db(transaction=True)
def test_the_monthly_usage_report_equals_the_calls_made_to_the_cent(
    pipeline_env: dict[str, str],  # noqa: F811
    redis_url: str,
    redis_client: redis.Redis,
    rpc_settings: Any,
    local_handler: Any,
) -> None:
    rpc_settings(COSTS=billing_process.COSTS, SAMPLE_RATE=0.1)
    register_handlers(local_handler)
    users = [UserFactory(username=name) for name in ("alice", "bob", "carol", "dave")]
    callers = [*users[:3], None]  # dave only calls from the web process killed below
    rng = random.Random(14)
    ledger = Ledger()

    db = connection.settings_dict
    port = int(db["PORT"] or SERVER_DATABASES[connection.vendor][1])
    proxy = TCPProxy(db["HOST"] or "127.0.0.1", port)
    proxy.start()
    env = dict(pipeline_env)
    env["DATABASE_URL"] = env["DATABASE_URL"].replace(f":{port}/", f":{proxy.port}/")
    stream = env["DJANGO_CFG_RPC__LOG_STREAM"]
    writer = StreamLogWriter(
        redis_url=redis_url, stream=stream, maxlen=100_000, flush_interval=0.05
    )
    worker = start_worker(env, "w1", "--batch-size", "50", "--stats-interval", "1")
    try:
        with use_writer(writer):
            make_calls(800, callers, rng, ledger)
            assert writer.flush(timeout=30)
            wait_for(lambda: rows() > 0)
            roll_up()  # rows still arriving: the next runs remake these hours

            # The database unreachable for the worker while calls go on.
            proxy.cut()
            make_calls(1_200, callers, rng, ledger)
            assert writer.flush(timeout=30)
            roll_up()
            proxy.restore()

            # The worker killed mid-batch, with entries delivered to it and not acknowledged:
            # stopped until a look finds it holding some (a stopped process acknowledges
            # nothing, so the kill leaves what the look saw), fed more calls whenever it has
            # drained the stream between two looks.
            written = rows()
            wait_for(lambda: rows() > written)
            for _ in range(100):
                worker.send_signal(signal.SIGSTOP)
                wait_for(lambda: is_stopped(worker.pid))
                if backlog(redis_client, stream)[1] > 0:
                    break
                worker.send_signal(signal.SIGCONT)
                make_calls(50, callers, rng, ledger)
                assert writer.flush(timeout=30)
            worker.send_signal(signal.SIGKILL)
            _, killed_err = worker.communicate(timeout=60)
            assert "the database is unreachable" in killed_err
            assert backlog(redis_client, stream)[1] > 0
            worker = start_worker(env, "w1", "--batch-size", "50", "--stats-interval", "1")

            # A web process killed right after shipping its calls.
            child = web_child(env, 400, 7, ["dave", "alice"])
            assert child.stdout is not None
            shipped = json.loads(child.stdout.readline())
            child.send_signal(signal.SIGKILL)
            child.wait()
            assert shipped["shipped"] is True
            assert shipped["dropped"] == 0
            ledger.merge(shipped["ledger"])

            make_calls(600, callers, rng, ledger)
            assert writer.flush(timeout=30)
        assert writer.stats().dropped == 0
        total = ledger.calls + 400
        wait_for(lambda: backlog(redis_client, stream) == (0, 0), seconds=120)
        stop_worker(worker)
    finally:
        writer.close()
        proxy.stop()
        if worker.poll() is None:
            worker.kill()

    roll_up()
    months = {month for month, _, _ in ledger.lines}
    bill = report(months)
    assert bill == expected(ledger)
    assert sum(cost for _, cost in bill.values()) > Decimal(1000)
    assert {user for _, user, _ in bill} == {"alice", "bob", "carol", "dave", ""}

    # The rollups hold every row, weighted: the same figures as the rows themselves.
    stored = RPCLog.objects.aggregate(
        rows=Count("pk"),
        calls=Sum(Value(1.0) / F("sample_rate"), output_field=FloatField()),
        cost=Sum("cost"),
    )
    rolled = RPCRollup.objects.aggregate(rows=Sum("rows"), calls=Sum("calls"), cost=Sum("cost"))
    assert rolled["rows"] == stored["rows"] < total  # sampled successes were left out
    assert rolled["calls"] == pytest.approx(stored["calls"])
    assert rolled["cost"] == stored["cost"]
    assert RPCLog.objects.filter(cost__isnull=False, sample_rate__lt=1).count() == 0
    assert RPCLog.objects.values("correlation_id").distinct().count() == stored["rows"]

    out = StringIO()
    call_command("rpc_logs_cleanup", "--days", "0", stdout=out)
    assert f"Deleted {stored['rows']} RPC log row(s)" in out.getvalue()
    assert not RPCLog.objects.exists()
    assert report(months) == bill
    roll_up()  # rerunning changes nothing either
    assert report(months) == bill


@pytest.mark.django_db(transaction=True)
def test_the_report_is_exact_with_the_sync_writer_on_any_database(
    rpc_settings: Any, local_handler: Any
) -> None:
    """In one process (SQLite too): each row written on the caller's connection, rollups run
    between batches of calls, then every row deleted by cleanup."""
    rpc_settings(COSTS=billing_process.COSTS, SAMPLE_RATE=0.1, WRITE_MODE="sync")
    register_handlers(local_handler)
    callers = [UserFactory(username=name) for name in ("alice", "bob")] + [None]
    rng = random.Random(41)
    ledger = Ledger()
    for _ in range(3):
        make_calls(500, callers, rng, ledger)
        roll_up()
    months = {month for month, _, _ in ledger.lines}
    bill = report(months)
    assert bill == expected(ledger)
    assert RPCLog.objects.count() < ledger.calls  # sampled successes were left out
    call_command("rpc_logs_cleanup", "--days", "0", stdout=StringIO())
    assert not RPCLog.objects.exists()
    assert report(months) == bill
