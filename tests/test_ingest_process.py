"""The log stream pipeline with real processes: crashes, outages, and two workers sharing.

Ingest workers run as ``manage.py rpc_logs_ingest`` processes (``python -m django``), web
processes as ``tests/stream_process.py``; Redis is the real server (a private
``redis-server`` on a free loopback port for the restart test, never the shared one:
conftest's ``private_redis``), and
the rows land in the PostgreSQL or MariaDB test database (these tests need a server database
that several processes share; the in-process tests in ``test_writers_stream.py`` run on SQLite
too).
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from django.conf import settings as django_settings
from django.db import connection

from django_rpc_audit import get_rpc_client
from django_rpc_audit.models import RPCLog
from django_rpc_audit.writers import StreamLogWriter, use_writer
from tests.calls import calls_for
from tests.conftest import SERVER_DATABASES, PrivateRedis
from tests.tcp_proxy import TCPProxy

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [
    pytest.mark.skipif(
        "sqlite" in django_settings.DATABASES["default"]["ENGINE"],
        reason="several processes share the database: PostgreSQL or MariaDB",
    ),
    pytest.mark.django_db(transaction=True),
]


@pytest.fixture
def pipeline_env(redis_url: str, redis_client: redis.Redis) -> Iterator[dict[str, str]]:
    """Environment of the child processes: the test database, Redis, a log stream of its own."""
    stream = f"rpc_audit_test:{uuid.uuid4().hex}:log"
    db = connection.settings_dict
    scheme, port = SERVER_DATABASES[connection.vendor]
    auth = db["USER"] + (f":{db['PASSWORD']}" if db["PASSWORD"] else "")
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("DJANGO_CFG_RPC__", "PYTEST_"))
    }
    env.update(
        PYTHONPATH=str(ROOT),
        DJANGO_SETTINGS_MODULE="tests.settings",
        DATABASE_URL=f"{scheme}://{auth}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or port}/"
        f"{db['NAME']}",
        DJANGO_CFG_RPC__REDIS_URL=redis_url,
        DJANGO_CFG_RPC__LOG_STREAM=stream,
    )
    yield env
    redis_client.delete(stream, f"{stream}:dead")


def start_worker(env: dict[str, str], consumer: str, *options: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "django", "rpc_logs_ingest", "--consumer", consumer, *options],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def stop_worker(worker: subprocess.Popen[str]) -> tuple[str, str]:
    """SIGTERM, as a supervisor stops it: it finishes its batch and exits 0."""
    worker.send_signal(signal.SIGTERM)
    out, err = worker.communicate(timeout=60)
    assert worker.returncode == 0, err
    return out, err


def web_process(env: dict[str, str], calls: int, who: str, *, wait: bool = False) -> Any:
    args = [sys.executable, "-m", "tests.stream_process", str(calls), who]
    return subprocess.Popen(
        [*args, "wait"] if wait else args,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(condition: Callable[[], bool], seconds: float = 120) -> None:
    """Poll ``condition``; the limit only keeps a broken run from hanging CI."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "gave up waiting"
        time.sleep(0.05)


def rows(who: str | None = None) -> int:
    queryset = RPCLog.objects.all() if who is None else RPCLog.objects.filter(params__who=who)
    return queryset.count()


def ship(env: dict[str, str], events: int, who: str) -> None:
    """Put ``events`` finished calls in the stream, as a web process would."""
    child = web_process(env, events, who)
    out, err = child.communicate(timeout=120)
    assert child.returncode == 0, err
    assert json.loads(out.splitlines()[-1])["shipped"] is True


def consumers(client: redis.Redis, stream: str) -> int:
    groups = client.xinfo_groups(stream)
    return int(groups[0]["consumers"]) if groups else 0


def backlog(client: redis.Redis, stream: str) -> tuple[int, int]:
    (group,) = client.xinfo_groups(stream)
    return int(group["lag"] or 0), int(group["pending"])


def test_a_worker_killed_mid_batch_loses_no_row_and_its_restart_writes_none_twice(
    pipeline_env: dict[str, str], redis_client: redis.Redis
) -> None:
    total = 2_500
    ship(pipeline_env, total, "kill")
    # Small batches: many commits, so the kill lands between some of them.
    worker = start_worker(pipeline_env, "w1", "--batch-size", "50")
    wait_for(lambda: rows() >= 200)
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    stream = pipeline_env["DJANGO_CFG_RPC__LOG_STREAM"]
    written = rows()
    lag, pending = backlog(redis_client, stream)
    # Killed mid-way: some rows in, some entries delivered to it and not acknowledged.
    assert 0 < written < total
    assert pending > 0

    # Its restart (same consumer name) re-reads its own pending entries first.
    restarted = start_worker(pipeline_env, "w1")
    wait_for(lambda: rows() == total and backlog(redis_client, stream) == (0, 0))
    out, _ = stop_worker(restarted)
    assert rows("kill") == total
    assert RPCLog.objects.values("correlation_id").distinct().count() == total
    assert set(RPCLog.objects.values_list("status", flat=True)) == {"success"}
    assert "Stopped:" in out


def test_two_workers_share_one_stream_without_duplicates_or_losses(
    pipeline_env: dict[str, str], redis_client: redis.Redis
) -> None:
    workers = [start_worker(pipeline_env, name, "--batch-size", "200") for name in "ab"]
    stream = pipeline_env["DJANGO_CFG_RPC__LOG_STREAM"]
    # Both in the group, waiting for entries, before any arrives (a slow start would leave
    # the other all the work).
    wait_for(lambda: redis_client.exists(stream) and consumers(redis_client, stream) == 2)
    webs = [web_process(pipeline_env, 800, f"web{n}") for n in range(2)]
    for web in webs:
        _, err = web.communicate(timeout=120)
        assert web.returncode == 0, err
    wait_for(lambda: rows() == 1_600 and backlog(redis_client, stream) == (0, 0))
    written, acked = [], []
    for worker in workers:
        out, _ = stop_worker(worker)
        (stopped,) = [line for line in out.splitlines() if line.startswith("Stopped:")]
        written.append(int(stopped.split()[1]))
        acked.append(int(stopped.split(", ")[1].split()[0]))  # "... N entries acknowledged"
    assert rows("web0") == rows("web1") == 800
    assert set(RPCLog.objects.values_list("status", flat=True)) == {"success"}
    # Each entry was taken and acknowledged by exactly one of them, and both took a share. (A
    # call still running when its web process shipped a batch has two entries, pending then
    # finished; when both reach one batch, they are one row: written counts rows.)
    assert sum(acked) == redis_client.xlen(stream) >= 1_600
    assert 1_600 <= sum(written) <= sum(acked)
    assert min(written) > 0


def test_a_web_process_killed_right_after_shipping_loses_no_row(
    pipeline_env: dict[str, str],
) -> None:
    web = web_process(pipeline_env, 500, "killed-web", wait=True)
    assert web.stdout is not None
    report = json.loads(web.stdout.readline())
    # Entries: one per call, two for a call in flight when a batch was shipped.
    assert report["shipped"] is True
    assert report["dropped"] == 0
    assert report["written"] >= 500
    web.send_signal(signal.SIGKILL)  # no exit handler, no flush
    web.wait()
    assert rows() == 0  # the web process never writes to the database in stream mode
    worker = start_worker(pipeline_env, "w")
    wait_for(lambda: rows("killed-web") == 500)
    stop_worker(worker)


OUTAGE_SECONDS = 30.0


def test_the_database_unreachable_for_30_s_neither_fails_nor_slows_calls_and_loses_nothing(
    pipeline_env: dict[str, str],
    redis_url: str,
    redis_client: redis.Redis,
    echo_handler: None,
) -> None:
    """The worker reaches the database through a TCP proxy in this process, cut for 30 s (the
    shared server is not stopped); calls go on in this process in stream mode all along."""
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
    worker = start_worker(env, "w", "--stats-interval", "1")
    client = get_rpc_client()

    try:
        with use_writer(writer):
            before = calls_for(client, 3, "before")
            wait_for(lambda: rows("before") == len(before))
            proxy.cut()
            during = calls_for(client, OUTAGE_SECONDS, "during")
            assert writer.flush(timeout=30)  # in the stream: the web side is unaffected
            assert rows("during") == 0
            lag, pending = backlog(redis_client, stream)
            assert lag + pending >= len(during)  # the stream holds the backlog
            proxy.restore()
            after = calls_for(client, 2, "after")
            assert writer.flush(timeout=30)
        wait_for(lambda: rows() == len(before) + len(during) + len(after))
        out, err = stop_worker(worker)
    finally:
        writer.close()
        proxy.stop()
        if worker.poll() is None:
            worker.kill()
    assert rows("during") == len(during)
    assert writer.stats().dropped == 0
    assert "the database is unreachable" in err
    assert "RPC log rows are being written again" in err
    median_before, median_during = statistics.median(before), statistics.median(during)
    # As in the buffered writer's outage test: a caller touching the database or Redis
    # synchronously would take milliseconds, far above this.
    assert median_during < 2 * median_before + 0.000_5, (median_before, median_during)
    assert max(during) < 0.5


def test_the_web_side_recovers_by_itself_when_redis_restarts(
    echo_handler: None, private_redis: PrivateRedis
) -> None:
    """A private Redis (the shared one is never restarted) is stopped for about a second, then
    started again on the same port: no call fails, and every call made from then on reaches it."""
    stream = "log"
    writer = StreamLogWriter(
        redis_url=private_redis.url,
        stream=stream,
        maxlen=100_000,
        flush_interval=0.05,
        max_retry_delay=0.5,
    )
    client = get_rpc_client()

    def calls(count: int, who: str) -> None:
        for n in range(count):
            client.call("test.echo", {"who": who, "n": n})
            time.sleep(0.002)

    try:
        with use_writer(writer):
            calls(100, "before")
            assert writer.flush(timeout=30)
            private_redis.stop()
            calls(300, "during")  # about a second: shipping fails, the events stay buffered
            assert writer.flush(timeout=0.5) is False
            private_redis.start()  # empty: it saves nothing
            calls(100, "after")
            assert writer.flush(timeout=30)
        stats = writer.stats()
        assert stats.retries > 0
        assert stats.dropped == 0
        # Every call made while it was down, and after.
        assert redis.Redis.from_url(private_redis.url).xlen(stream) == 400
    finally:
        writer.close()
