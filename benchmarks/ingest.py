"""The log stream pipeline: ingest rows/s per worker, end-to-end lag, the caller's cost.

Over real Redis and a real database (PostgreSQL with ``DATABASE_URL``), each part in one run:

1. **Ingest.** N finished-call rows are put in a fresh log stream (as the stream writer puts
   them), then 1 worker, then 2 workers (separate ``IngestWorker`` processes started
   together) write them all. Per run: wall-clock rows/s (from the first worker's start to the
   last row acknowledged), the workers' process CPU per row, and their PostgreSQL backends'
   CPU per row (read from ``/proc``: the server runs on this machine); the load average
   before and after.
2. **Lag.** Calls at a steady rate (local transport) with ``WRITE_MODE = "stream"`` while one
   worker ingests; every 100 ms the newest row's ``created_at`` (the call's start; the calls
   take microseconds) is compared with the clock read just before the query: median and p95
   of that end-to-end lag, from the call to its row committed and visible.
3. **Caller.** ``call()`` over Redis with a responder process: logging off, the buffered
   writer, the stream writer, interleaved rounds; median per call and the ratio to off.

    createdb -h 127.0.0.1 -U postgres rpc_bench
    DATABASE_URL=postgres://postgres@127.0.0.1:5432/rpc_bench .venv/bin/python \\
        benchmarks/ingest.py --redis redis://127.0.0.1:6379/9
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from buffered_writer import (  # noqa: E402
    configure,
    finished_events,
    print_table,
    setup_django,
    timed_calls,
    variant_call,
    wait_for_responder,
)
from call_overhead import responder  # noqa: E402


def loadavg() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def backend_cpu_seconds() -> float:
    """CPU time of this connection's PostgreSQL backend process (same machine)."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        (pid,) = cursor.fetchone()
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def fill_stream(redis_url: str, stream: str, rows: int) -> None:
    import redis

    from django_rpc_audit.writers.entry import FIELD, encode_row
    from django_rpc_audit.writers.sink import event_row_values

    client = redis.Redis.from_url(redis_url)
    client.delete(stream)
    for start in range(0, rows, 10_000):
        pipe = client.pipeline(transaction=False)
        for event in finished_events(min(10_000, rows - start)):
            pipe.xadd(stream, {FIELD: encode_row(event_row_values(event, for_copy=True))})
        pipe.execute()


def worker_main(redis_url: str, stream: str, group: str, expected: int) -> None:
    """A worker process: ingest until the group has nothing left, print its figures."""
    from django_rpc_audit.writers.ingest import IngestWorker, stream_backlog

    worker = IngestWorker(
        redis_url=redis_url, stream=stream, group=group, block_ms=100, stats_interval=0.2
    )
    backend = {"cpu": 0.0}
    original_write = worker._write

    def write(*args: Any) -> int:
        # The writer thread's own connection: note its backend's CPU at each batch.
        if not backend.get("start"):
            backend["start"] = backend_cpu_seconds()
        written = original_write(*args)
        backend["cpu"] = backend_cpu_seconds() - backend["start"]
        return written

    worker._write = write  # type: ignore[method-assign]
    cpu = time.process_time()

    def stop_when_done(stats: Any) -> None:
        lag, pending = stream_backlog(worker._client, stream, group)
        if lag == 0 and pending == 0:
            worker.stop()

    begin = time.time()
    worker.run(on_stats=stop_when_done)
    print(
        json.dumps(
            {
                "begin": begin,
                "rows": worker.stats().rows,
                "cpu": time.process_time() - cpu,
                "backend_cpu": backend["cpu"],
                "done": time.time(),
            }
        ),
        flush=True,
    )


def measure_ingest(redis_url: str, rows: int, workers: int) -> dict[str, float]:
    from django_rpc_audit.models import RPCLog

    RPCLog.objects.all().delete()
    stream = f"bench:log:{uuid.uuid4().hex}"
    fill_stream(redis_url, stream, rows)
    load_before = loadavg()
    started = time.time()
    processes = [
        subprocess.Popen(
            [sys.executable, __file__, "--worker", redis_url, stream, "g", str(rows)],
            stdout=subprocess.PIPE,
            text=True,
            env=os.environ,
        )
        for _ in range(workers)
    ]
    reports = [json.loads(p.communicate()[0].splitlines()[-1]) for p in processes]
    # From the first worker ready to read (Django set up) to the last row acknowledged.
    wall = max(r["done"] for r in reports) - min(r["begin"] for r in reports)
    del started
    written = RPCLog.objects.count()
    assert written == rows, (written, rows)
    import redis

    redis.Redis.from_url(redis_url).delete(stream)
    RPCLog.objects.all().delete()
    result = {
        "rows/s": rows / wall,
        "rows/s per worker": rows / wall / workers,
        "worker CPU µs/row": sum(r["cpu"] for r in reports) / rows * 1e6,
        "PostgreSQL CPU µs/row": sum(r["backend_cpu"] for r in reports) / rows * 1e6,
    }
    print(
        f"ingest, {workers} worker(s), {rows:,} rows: {result['rows/s']:,.0f} rows/s "
        f"({result['rows/s per worker']:,.0f} per worker); worker CPU "
        f"{result['worker CPU µs/row']:.1f} µs/row, PostgreSQL backend CPU "
        f"{result['PostgreSQL CPU µs/row']:.1f} µs/row; load {load_before} -> {loadavg()}"
    )
    return result


def measure_lag(redis_url: str, rate: int, seconds: float) -> None:
    from django_rpc_audit import get_rpc_client
    from django_rpc_audit.models import RPCLog
    from django_rpc_audit.transports import register_local_handler
    from django_rpc_audit.writers import flush

    RPCLog.objects.all().delete()
    stream = f"bench:log:{uuid.uuid4().hex}"
    register_local_handler("bench.echo", lambda params: {"echo": params})
    configure(
        TRANSPORT="local",
        ENABLE_LOGGING=True,
        WRITE_MODE="stream",
        LOG_STREAM=stream,
        LOG_STREAM_REDIS_URL=redis_url,
        BUFFER_FLUSH_INTERVAL=0.1,
    )
    worker = subprocess.Popen(
        [sys.executable, __file__, "--worker", redis_url, stream, "rpc_audit_ingest", "0"],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "BENCH_WORKER_FOREVER": "1"},
    )
    client = get_rpc_client()
    lags: list[float] = []
    stop = threading.Event()

    def sample() -> None:
        from django.db import connection
        from django.utils import timezone

        while not stop.wait(0.1):
            now = timezone.now()  # before the query: its own time is not lag
            newest = RPCLog.objects.order_by("-created_at").values_list("created_at").first()
            if newest is not None:
                lags.append((now - newest[0]).total_seconds())
        connection.close()

    sampler = threading.Thread(target=sample)
    started = time.monotonic()
    calls = 0
    warm = started + 2
    while time.monotonic() - started < seconds + 2:
        client.call("bench.echo", {"n": calls})
        calls += 1
        if calls == 1:
            pass
        if time.monotonic() > warm and not sampler.is_alive() and not stop.is_set():
            sampler.start()
        next_call = started + calls / rate
        delay = next_call - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    stop.set()
    sampler.join()
    flush()
    deadline = time.monotonic() + 60
    while RPCLog.objects.count() < calls and time.monotonic() < deadline:
        time.sleep(0.1)
    worker.terminate()
    worker.wait()
    landed = RPCLog.objects.count()
    lags.sort()
    print(
        f"lag at {rate} calls/s over {seconds:.0f} s ({calls} calls, {landed} rows landed): "
        f"median {statistics.median(lags) * 1000:.0f} ms, p95 "
        f"{lags[int(len(lags) * 0.95)] * 1000:.0f} ms, max {lags[-1] * 1000:.0f} ms "
        f"({len(lags)} samples; BUFFER_FLUSH_INTERVAL 0.1 s)"
    )
    configure(TRANSPORT="redis", BUFFER_FLUSH_INTERVAL=0.5)
    RPCLog.objects.all().delete()


def measure_caller(redis_url: str, calls: int, rounds: int) -> None:
    from django_rpc_audit.writers import flush

    labels = {"off": "logging off", "buffered": "buffered writer", "stream": "stream writer"}
    configure(LOG_STREAM=f"bench:log:{uuid.uuid4().hex}", LOG_STREAM_REDIS_URL=redis_url)
    results: dict[str, list[float]] = {variant: [] for variant in labels}
    for variant in labels:
        timed_calls(200, variant_call(variant))
    for _round in range(rounds):
        for variant in labels:
            results[variant].extend(timed_calls(calls, variant_call(variant)))
            for mode in ("buffered", "stream"):
                configure(ENABLE_LOGGING=True, WRITE_MODE=mode)
                flush()  # the next variant does not pay for this one's backlog
    print_table(f"call() over Redis, {rounds} rounds x {calls} calls per variant", results, labels)


def main() -> None:
    if sys.argv[1:2] == ["--worker"]:
        redis_url, stream, group, expected = sys.argv[2:6]
        setup_django(os.environ.get("DATABASE_URL"), redis_url, "unused", migrate=False)
        if os.environ.get("BENCH_WORKER_FOREVER"):
            from django_rpc_audit.writers.ingest import IngestWorker

            worker = IngestWorker(redis_url=redis_url, stream=stream, group=group, block_ms=100)
            import signal

            signal.signal(signal.SIGTERM, lambda *_: worker.stop())
            worker.run()
            return
        worker_main(redis_url, stream, group, int(expected))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis", metavar="URL", default="redis://127.0.0.1:6379/9")
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=3, help="ingest runs per worker count")
    parser.add_argument("--lag-rate", type=int, default=1000, help="calls per second")
    parser.add_argument("--lag-seconds", type=float, default=20)
    parser.add_argument("--calls", type=int, default=1000, help="calls per variant per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--skip", nargs="*", default=[], choices=["ingest", "lag", "caller"])
    parser.add_argument(
        "--no-migrate",
        action="store_true",
        help="keep the database's schema as it is (to measure an older set of indexes)",
    )
    args = parser.parse_args()

    request_stream = f"bench:{uuid.uuid4().hex}"
    database = setup_django(
        os.environ.get("DATABASE_URL"), args.redis, request_stream, migrate=not args.no_migrate
    )
    print(
        f"database: {database}; Redis {args.redis}; python {sys.version.split()[0]}; "
        f"{os.cpu_count()} CPUs; load {loadavg()}"
    )
    if "ingest" not in args.skip:
        for workers in (1, 2):
            runs = [measure_ingest(args.redis, args.rows, workers) for _ in range(args.repeat)]
            print(
                f"  median of {args.repeat}, {workers} worker(s): "
                + ", ".join(
                    f"{key} {statistics.median(r[key] for r in runs):,.1f}" for key in runs[0]
                )
            )
    if "lag" not in args.skip:
        measure_lag(args.redis, args.lag_rate, args.lag_seconds)
    if "caller" not in args.skip:
        stop = multiprocessing.get_context("fork").Event()
        answering = multiprocessing.get_context("fork").Process(
            target=responder, args=(args.redis, request_stream, stop), daemon=True
        )
        answering.start()
        try:
            configure(TRANSPORT="redis")
            wait_for_responder()
            measure_caller(args.redis, args.calls, args.rounds)
        finally:
            stop.set()
            answering.join(5)


if __name__ == "__main__":
    main()
