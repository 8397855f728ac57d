"""The limit holds across processes: four processes hammer one rate-limited method on the real
django-ipc server, and only the algorithm's bound of calls gets through.

Processes (``tests/ratelimit_process.py``): two with threads calling ``call()``, one with
asyncio tasks calling ``acall()``, one with threads calling ``fire_and_forget()``; all as the
same anonymous caller IP, so they share one budget. The server's consumer group counts what
reached it; the log rows are in the test database (PostgreSQL and MariaDB runs) or a SQLite
file.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from django.db import connection

from django_rpc_audit.models import RPCStatus
from django_rpc_audit.ratelimit import Limit
from scripts.ipc_server import IPCServer, ipc_python
from tests.conftest import REDIS_URL, ROOT, unavailable

pytestmark = [pytest.mark.redis, pytest.mark.ipc]

#: 20 calls a second, 5 at once: T = 50 ms.
LIMIT = Limit.parse("20/second burst 5")
SECONDS = 2.0
#: (mode, workers) of each process.
PROCESSES = (("call", 4), ("call", 4), ("acall", 4), ("send", 4))


@pytest.fixture
def server() -> Iterator[IPCServer]:
    if ipc_python() is None:
        unavailable("No interpreter with django-ipc (.venv-ipc or RPC_AUDIT_IPC_PYTHON)")
    stream = f"rpc_audit_test:rl:{uuid.uuid4().hex}:requests"
    with IPCServer(redis_url=REDIS_URL, stream=stream) as running:
        yield running
    client = redis.Redis.from_url(REDIS_URL)
    client.delete(stream)
    for key in client.scan_iter(f"{stream}:limits:*"):
        client.delete(key)
    client.close()


def rows_by_status_and_ip(database_url: str) -> dict[tuple[str, str], int]:
    """The children's rows counted by status and caller IP: in the test database on
    PostgreSQL and MariaDB, in the children's SQLite file otherwise."""
    query = "SELECT status, caller_ip, COUNT(*) FROM django_rpc_audit_rpclog GROUP BY 1, 2"
    if database_url.startswith("sqlite:///"):
        with contextlib.closing(sqlite3.connect(database_url.removeprefix("sqlite:///"))) as db:
            rows = db.execute(query).fetchall()
    else:
        if connection.vendor == "postgresql":  # inet as its text; MariaDB stores text already
            query = query.replace("caller_ip", "host(caller_ip)")
        with connection.cursor() as cursor:
            cursor.execute(query)
            rows = cursor.fetchall()
    return {(status, ip): count for status, ip, count in rows}


def entries_read(client: redis.Redis, stream: str) -> int:
    """How many requests the server's consumer group has read off the stream."""
    (group,) = client.xinfo_groups(stream)
    return int(group["entries-read"] or 0)


@pytest.mark.django_db(transaction=True)
def test_four_processes_get_no_more_than_the_limit_through(
    server: IPCServer, child_env: dict[str, str]
) -> None:
    env = {
        **child_env,
        "DJANGO_CFG_RPC__TRANSPORT": "redis",
        "DJANGO_CFG_RPC__REDIS_URL": REDIS_URL,
        "DJANGO_CFG_RPC__REQUEST_STREAM": server.stream,
        "DJANGO_CFG_RPC__RATE_LIMITS": f"system.echo={LIMIT}",
        "DJANGO_CFG_RPC__RATE_LIMIT_KEY_PREFIX": f"{server.stream}:limits:",
    }
    children = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.ratelimit_process", mode, str(workers)],
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for mode, workers in PROCESSES
    ]
    reports: list[dict[str, Any]] = []
    try:
        for child in children:
            assert child.stdout is not None
            assert json.loads(child.stdout.readline() or "{}") == {"ready": True}, (
                child.communicate(timeout=30)[1][-3000:]
            )
        go = time.time()
        for child in children:
            assert child.stdin is not None
            child.stdin.write(f"go {SECONDS}\n")
            child.stdin.flush()
        for child in children:
            output, errors = child.communicate(timeout=120)
            assert child.returncode == 0, errors[-3000:]
            reports.append(json.loads(output.splitlines()[-1]))
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.communicate()

    allowed = sum(report["allowed"] for report in reports)
    refused = sum(report["refused"] for report in reports)
    window = max(report["ended"] for report in reports) - go
    # Every call either went through or was refused with RPCRateLimitedError; nothing else.
    # (Which process got the allowed calls is the scheduler's business: only totals count.)
    assert [report["errors"] for report in reports] == [[]] * len(PROCESSES), reports
    assert all(report["refused_otherwise"] == 0 for report in reports), reports
    assert all(report["allowed"] + report["refused"] for report in reports), reports
    assert refused, reports
    # GCRA's bound over the window the calls were made in: burst + window / T.
    bound = LIMIT.burst + window * 1_000_000 / LIMIT.interval_us
    assert LIMIT.burst < allowed <= bound, (allowed, bound, window, reports)
    # No refused caller was told to wait longer than one emission interval.
    assert max(r["longest_retry_after"] for r in reports) <= LIMIT.interval_us / 1_000_000

    # What reached the server: the allowed requests, each read by its consumer group.
    client = redis.Redis.from_url(REDIS_URL)
    try:
        assert client.xlen(server.stream) == allowed
        deadline = time.monotonic() + 30
        while entries_read(client, server.stream) < allowed and time.monotonic() < deadline:
            time.sleep(0.05)
        assert entries_read(client, server.stream) == allowed
    finally:
        client.close()

    # And every call left its row: a success for each allowed one, rate_limited for the rest.
    assert all(report["flushed"] for report in reports)
    assert rows_by_status_and_ip(env["DATABASE_URL"]) == {
        (RPCStatus.SUCCESS, "192.0.2.77"): allowed,
        (RPCStatus.RATE_LIMITED, "192.0.2.77"): refused,
    }
