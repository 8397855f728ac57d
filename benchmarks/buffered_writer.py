"""What logging costs the caller with each writer, how fast the buffered one ingests, its memory.

In one process, side by side and interleaved in rounds so machine noise hits every variant
alike, over real Redis with a responder process answering the django-ipc protocol and a real
database (PostgreSQL, MariaDB or MySQL with ``DATABASE_URL``; a SQLite file otherwise):

1. ``call()`` with logging off; with the sync writer; with the buffered writer; with the
   buffered writer's enqueue alone (no thread writing meanwhile: the caller's own share, the
   rows written between rounds); and the reference design re-implemented
   (``RPCLog.objects.create()`` a pending row, make the call with logging off, then a full
   ``save()``). Median and p99 per call, and the ratio of each
   median to logging off. The same for ``acall()`` (off / buffered).
2. Ingestion: finished-call events are put in a buffered writer as fast as possible, and the
   time its thread takes to write them all to the database gives rows per second. Then the
   writer's CPU per row for events as the client makes them (5,000 calls over the in-process
   transport, their payloads deferred to the writer), its flush timed with ``thread_time``.
3. Memory: 1,000,000 calls logged with the buffered writer (over the in-process transport, to
   keep the run short; the writer does the same work whatever the transport), printing the
   peak RSS along the way: flat once the buffer is at its bound (``BUFFER_SIZE``).

    createdb -h 127.0.0.1 -U postgres rpc_bench
    DATABASE_URL=postgres://postgres@127.0.0.1:5432/rpc_bench .venv/bin/python \\
        benchmarks/buffered_writer.py --redis redis://127.0.0.1:6379/9
    mariadb -h 127.0.0.1 -u root -e "CREATE DATABASE rpc_bench"
    DATABASE_URL=mysql://root@127.0.0.1:3306/rpc_bench .venv/bin/python \\
        benchmarks/buffered_writer.py --redis redis://127.0.0.1:6379/9

``--local`` times the calls over the in-process transport instead (the caller's share of
logging without Redis's noise); ``--skip latency ingest memory`` leaves parts out.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import multiprocessing
import os
import resource
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from call_overhead import responder  # noqa: E402


def setup_django(
    database_url: str | None, redis_url: str, stream: str, *, migrate: bool = True
) -> str:
    import django
    import environ
    from django.conf import settings

    if database_url is None:
        database_url = f"sqlite:///{Path(tempfile.mkdtemp()) / 'bench.sqlite3'}"
    settings.configure(
        DATABASES={"default": environ.Env.db_url_config(database_url)},
        INSTALLED_APPS=["django.contrib.auth", "django.contrib.contenttypes", "django_rpc_audit"],
        USE_TZ=True,
        DJANGO_CFG_RPC={"TRANSPORT": "redis", "REDIS_URL": redis_url, "REQUEST_STREAM": stream},
    )
    django.setup()
    from django.core.management import call_command
    from django.db import connection

    if migrate:
        call_command("migrate", verbosity=0)
    return f"{connection.vendor} (database {connection.settings_dict['NAME']})"


def configure(**keys: Any) -> None:
    """Switch ``DJANGO_CFG_RPC`` keys, as ``override_settings`` would, keeping the rest."""
    from django.conf import settings

    from django_rpc_audit.conf import clear_config_cache

    settings.DJANGO_CFG_RPC = {**settings.DJANGO_CFG_RPC, **keys}
    clear_config_cache()


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


def timed_calls(calls: int, call: Callable[[int], object]) -> list[float]:
    samples = []
    for n in range(calls):
        started = time.perf_counter()
        call(n)
        samples.append((time.perf_counter() - started) * 1e6)
    return samples


def variant_call(variant: str) -> Callable[[int], object]:
    """One call of ``variant``, ready to be timed."""
    from django_rpc_audit import get_rpc_client
    from django_rpc_audit.models import RPCLog
    from django_rpc_audit.writers.sink import outcome_values

    if variant == "reference":
        configure(ENABLE_LOGGING=False)
        client = get_rpc_client()

        def reference(n: int) -> object:
            # The original design: a pending row, the call, then the whole row saved again.
            params = {"n": n, "who": "benchmark"}
            log = RPCLog.objects.create(
                correlation_id=str(uuid.uuid4()), method="bench.echo", params=params
            )
            clock = time.perf_counter()
            result = client.call("bench.echo", params)
            for name, value in outcome_values(
                status="success",
                response=result,
                error_code=None,
                error_message=None,
                duration_ms=(time.perf_counter() - clock) * 1000,
                completed_at=datetime.now(UTC),
            ).items():
                setattr(log, name, value)
            log.save()
            return result

        return reference
    if variant == "enqueue":
        # The caller's own share: the buffered writer without its thread, so nothing is written
        # while the calls are timed (measure_latency writes the rows between rounds).
        configure(ENABLE_LOGGING=True, WRITE_MODE="buffered")
        client = get_rpc_client()
        return lambda n: client.call("bench.echo", {"n": n, "who": "benchmark"})
    if variant == "off":
        configure(ENABLE_LOGGING=False)
    else:
        configure(ENABLE_LOGGING=True, WRITE_MODE=variant)
    client = get_rpc_client()
    return lambda n: client.call("bench.echo", {"n": n, "who": "benchmark"})


async def timed_acalls(calls: int) -> list[float]:
    from django_rpc_audit import get_rpc_client

    client = get_rpc_client()
    samples = []
    for n in range(calls):
        started = time.perf_counter()
        await client.acall("bench.echo", {"n": n, "who": "benchmark"})
        samples.append((time.perf_counter() - started) * 1e6)
    return samples


def print_table(
    title: str,
    results: dict[str, list[float]],
    labels: dict[str, str],
    rounds: dict[str, list[float]] | None = None,
) -> None:
    """Per variant: median and p99 of its samples, and the ratio of that median to logging
    off's; with ``rounds`` (each round's median, by variant), also the median of the per-round
    ratios (each round's median over the same round's logging off: what noise between rounds
    moves least)."""
    base = statistics.median(results["off"])
    print(f"\n{title}")
    header = f"{'variant':<28}{'median µs':>11}{'p99 µs':>10}{'overhead µs':>13}{'ratio':>8}"
    print(header + (f"{'round ratio':>13}" if rounds else ""))
    for variant, label in labels.items():
        samples = results[variant]
        median = statistics.median(samples)
        line = (
            f"{label:<28}{median:>11.1f}{percentile(samples, 0.99):>10.1f}"
            f"{median - base:>13.1f}{median / base:>8.3f}"
        )
        if rounds:
            ratios = [mine / off for mine, off in zip(rounds[variant], rounds["off"], strict=True)]
            line += f"{statistics.median(ratios):>13.3f}"
        print(line)


def measure_latency(calls: int, rounds: int, transport: str) -> None:
    from django_rpc_audit.models import RPCLog
    from django_rpc_audit.writers import BufferedLogWriter, flush, use_writer

    labels = {
        "off": "logging off",
        "enqueue": "buffered, enqueue only",
        "buffered": "buffered writer",
        "sync": "sync writer",
        "reference": "reference (create + save)",
    }
    results: dict[str, list[float]] = {variant: [] for variant in labels}
    round_medians: dict[str, list[float]] = {variant: [] for variant in labels}
    deferred = BufferedLogWriter(buffer_size=10 * calls, background=False)

    def run(variant: str, count: int) -> list[float]:
        call = variant_call(variant)
        if variant != "enqueue":
            return timed_calls(count, call)
        with use_writer(deferred):
            samples = timed_calls(count, call)
        deferred.flush()  # untimed: the same rows, written on this thread afterwards
        return samples

    for variant in labels:  # warm-up: connections, caches, the writer thread
        run(variant, 200)
    configure(ENABLE_LOGGING=True, WRITE_MODE="buffered")
    flush()
    for _round in range(rounds):
        for variant in labels:
            samples = run(variant, calls)
            results[variant].extend(samples)
            round_medians[variant].append(statistics.median(samples))
            configure(ENABLE_LOGGING=True, WRITE_MODE="buffered")
            flush()  # the next variant does not pay for this one's backlog
    print_table(
        f"call() over {transport}, {rounds} rounds x {calls} calls per variant",
        results,
        labels,
        round_medians,
    )

    async_results: dict[str, list[float]] = {"off": [], "buffered": []}
    async_medians: dict[str, list[float]] = {"off": [], "buffered": []}
    for variant in ("off", "buffered"):
        variant_call(variant)  # configures
        asyncio.run(timed_acalls(200))
    for _round in range(rounds):
        for variant in ("off", "buffered"):
            variant_call(variant)
            samples = asyncio.run(timed_acalls(calls))
            async_results[variant].extend(samples)
            async_medians[variant].append(statistics.median(samples))
    configure(ENABLE_LOGGING=True, WRITE_MODE="buffered")
    flush()
    print_table(
        f"acall() over {transport}, {rounds} rounds x {calls} calls per variant",
        async_results,
        {"off": "logging off", "buffered": "buffered writer"},
        async_medians,
    )
    print(f"rows logged: {RPCLog.objects.count()}")
    RPCLog.objects.all().delete()


def finished_events(count: int) -> list[dict[str, Any]]:
    now = datetime.now(UTC)
    return [
        {
            "correlation_id": str(uuid.uuid4()),
            "method": "bench.echo",
            "params": {"n": n, "who": "benchmark"},
            "user": None,
            "caller_ip": "10.0.0.1",
            "user_agent": "benchmark/1.0",
            "started_at": now,
            "status": "success",
            "response": {"echo": {"n": n}},
            "error_code": None,
            "error_message": None,
            "duration_ms": 0.8,
            "completed_at": now,
        }
        for n in range(count)
    ]


def measure_ingestion(rows: int, batch_size: int) -> None:
    from django_rpc_audit.models import RPCLog
    from django_rpc_audit.writers import BufferedLogWriter

    RPCLog.objects.all().delete()  # the benchmark database is the script's own
    events = finished_events(rows)
    # Room for every event, in items and in bytes: this part measures writing, not dropping.
    writer = BufferedLogWriter(
        buffer_size=rows, buffer_max_bytes=2**40, batch_size=batch_size, flush_interval=3600
    )
    cpu = time.process_time()
    started = time.perf_counter()
    for event in events:
        writer.finished(event)
    enqueued = time.perf_counter()
    assert writer.flush(timeout=None)
    done = time.perf_counter()
    cpu = time.process_time() - cpu
    writer.close()
    written = RPCLog.objects.count()
    assert written == rows, (written, rows)
    RPCLog.objects.all().delete()
    print(
        f"\ningestion: {rows} finished calls put in {(enqueued - started) * 1e3:.0f} ms "
        f"({(enqueued - started) / rows * 1e6:.2f} µs each); written in {done - started:.2f} s "
        f"= {rows / (done - started):,.0f} rows/s (batches of {batch_size})"
    )
    print(
        f"  process CPU time {cpu:.2f} s = {cpu / rows * 1e6:.0f} µs per row "
        f"({rows / cpu:,.0f} rows per CPU second: the rate with a core to itself)"
    )
    from django.db import connection

    from django_rpc_audit.writers.sink import event_row_values

    # What the writer builds on this database: COPY's text values on PostgreSQL; on MySQL and
    # MariaDB those, then each column through its field's get_db_prep_save (writers/mysql.py).
    build: Callable[[dict[str, Any]], Any] = event_row_values
    if connection.vendor == "postgresql":
        build = functools.partial(event_row_values, for_copy=True)
    elif connection.vendor == "mysql":
        from django_rpc_audit.writers.mysql import _row_maker

        row_of = _row_maker(list(RPCLog._meta.concrete_fields), connection)
        build = functools.partial(row_of, live_users=set())  # the events have no user
    cpu = time.process_time()
    for event in events[:20_000]:
        build(event)
    values_cpu = (time.process_time() - cpu) / min(rows, 20_000)
    print(f"  of which building the column values (the sink's helpers): {values_cpu * 1e6:.0f} µs")


def measure_client_rows(calls: int, batch_size: int, rounds: int = 5) -> None:
    """The writer's CPU per row for events as the client makes them (their payloads deferred
    to the writer's thread, as with only the built-in receivers): ``calls`` calls over the
    in-process transport into a writer without a thread, then its flush timed on this thread
    (``thread_time``: the CPU the writer's thread would spend), median of ``rounds``."""
    from django_rpc_audit import get_rpc_client
    from django_rpc_audit.models import RPCLog
    from django_rpc_audit.transports import register_local_handler
    from django_rpc_audit.writers import BufferedLogWriter, use_writer

    register_local_handler("bench.echo", lambda params: {"echo": params})
    configure(TRANSPORT="local", ENABLE_LOGGING=True, WRITE_MODE="buffered")
    client = get_rpc_client()
    per_row = []
    for _round in range(rounds):
        writer = BufferedLogWriter(
            buffer_size=calls, buffer_max_bytes=2**40, batch_size=batch_size, background=False
        )
        with use_writer(writer):
            for n in range(calls):
                client.call("bench.echo", {"n": n, "who": "benchmark"})
        cpu = time.thread_time()
        assert writer.flush()
        per_row.append((time.thread_time() - cpu) / calls * 1e6)
        assert writer.stats().written == calls
        RPCLog.objects.all().delete()
    print(
        f"  the client's events ({calls:,} calls, local transport, payloads deferred): the "
        f"writer's CPU {statistics.median(per_row):.1f} µs per row (median of {rounds}: "
        + ", ".join(f"{value:.1f}" for value in per_row)
        + ")"
    )


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    """Resident memory now (Linux ``/proc``), in MB; the peak where that is unavailable."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return peak_rss_mb()


def measure_memory(calls: int) -> None:
    from django_rpc_audit import get_rpc_client
    from django_rpc_audit.models import RPCLog
    from django_rpc_audit.transports import register_local_handler
    from django_rpc_audit.writers import flush, writer_stats

    RPCLog.objects.all().delete()
    register_local_handler("bench.echo", lambda params: {"echo": params})
    configure(TRANSPORT="local", ENABLE_LOGGING=True, WRITE_MODE="buffered")
    client = get_rpc_client()
    config_buffer = writer_stats()  # builds the writer
    del config_buffer
    print(f"\nmemory: {calls:,} calls, local transport, buffered writer")
    print(
        f"{'calls':>10}{'RSS MB':>9}{'peak RSS MB':>13}{'buffered':>10}{'written':>10}"
        f"{'dropped':>10}"
    )
    checkpoints = {calls // 10, calls // 4, calls // 2, calls * 3 // 4, calls}
    started = time.perf_counter()
    print(f"{0:>10}{current_rss_mb():>9.1f}{peak_rss_mb():>13.1f}")
    for n in range(1, calls + 1):
        client.call("bench.echo", {"n": n, "who": "benchmark"})
        if n in checkpoints:
            stats = writer_stats()
            print(
                f"{n:>10}{current_rss_mb():>9.1f}{peak_rss_mb():>13.1f}{stats.buffered:>10}"
                f"{stats.written:>10}{stats.dropped:>10}"
            )
    elapsed = time.perf_counter() - started
    flush(timeout=None)
    stats = writer_stats()
    print(
        f"{calls:,} calls in {elapsed:.1f} s ({calls / elapsed:,.0f} calls/s); after the final "
        f"flush: {stats.written:,} rows written, {stats.dropped:,} dropped (buffer full), "
        f"{RPCLog.objects.count():,} rows in the table"
    )
    RPCLog.objects.all().delete()


def delete_stream(redis_url: str, stream: str) -> None:
    """Delete the run's request stream: each run has its own, which keeps up to
    ``STREAM_MAXLEN`` requests (1 MB each in ``payload_cost.py``: gigabytes left in Redis)."""
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        client.delete(stream)
    finally:
        client.close()


def wait_for_responder() -> None:
    from django_rpc_audit import get_rpc_client
    from django_rpc_audit.exceptions import RPCTimeoutError

    configure(ENABLE_LOGGING=False)
    for _ in range(20):
        try:
            get_rpc_client().call("bench.echo", timeout=0.5)
            return
        except RPCTimeoutError:
            continue
    raise SystemExit("the responder process does not answer")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis", metavar="URL", default="redis://127.0.0.1:6379/9")
    parser.add_argument("--calls", type=int, default=1000, help="calls per variant per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--ingest-rows", type=int, default=200_000)
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--memory-calls", type=int, default=1_000_000)
    parser.add_argument("--skip", nargs="*", default=[], choices=["latency", "ingest", "memory"])
    parser.add_argument(
        "--local",
        action="store_true",
        help="time the calls over the in-process transport instead of Redis (less noise)",
    )
    args = parser.parse_args()

    stream = f"bench:{uuid.uuid4().hex}"
    database = setup_django(os.environ.get("DATABASE_URL"), args.redis, stream)
    stop = multiprocessing.get_context("fork").Event()
    answering = multiprocessing.get_context("fork").Process(
        target=responder, args=(args.redis, stream, stop), daemon=True
    )
    answering.start()
    wait_for_responder()
    print(
        f"database: {database}; Redis {args.redis} with a responder process; "
        f"python {sys.version.split()[0]}; {os.cpu_count()} CPUs"
    )
    transport = "Redis"
    if args.local:
        from django_rpc_audit.transports import register_local_handler

        register_local_handler("bench.echo", lambda params: {"echo": params})
        configure(TRANSPORT="local")
        transport = "the local transport"
    try:
        if "latency" not in args.skip:
            measure_latency(args.calls, args.rounds, transport)
    finally:
        stop.set()
        answering.join(5)
        delete_stream(args.redis, stream)
    if "ingest" not in args.skip:
        measure_ingestion(args.ingest_rows, args.batch_size)
        measure_client_rows(min(args.ingest_rows, 5_000), args.batch_size)
    if "memory" not in args.skip:
        measure_memory(args.memory_calls)


if __name__ == "__main__":
    main()
