"""Prune throughput on a big table, and whether inserts keep working while it runs.

Fills ``RPCLog`` on PostgreSQL with ``--rows`` old rows (and ``--recent`` rows inside the
retention window) by one ``INSERT ... SELECT generate_series``, then runs
``RPCLog.objects.prune(days=30)`` while another process writes finished calls as the log
writer does (``record_finished``, each in its own transaction), as fast as it can. Before the
prune the same inserter runs alone for ``--baseline`` seconds, so insert latency with and without
the prune is measured side by side in one run.

    createdb -h 127.0.0.1 -U postgres rpc_bench
    DATABASE_URL=postgres://postgres@127.0.0.1:5432/rpc_bench .venv/bin/python benchmarks/prune.py
    ... benchmarks/prune.py --rows 1000000 --batch-size 1000,5000,20000 --single-delete

``prune()`` counts every row it deletes into the hourly rollups in the same transaction
(``django_rpc_audit.rollups``). ``--plain-batches`` also times deleting the same rows the way
``prune()`` did before rollups, batches of keys chosen by ``LIMIT`` and nothing counted,
``--single-delete`` one plain ``DELETE`` in a single transaction (each refilling the table
first), for comparison. The tables are emptied at the start and the end.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def setup_django(database_url: str, migrate: bool = True) -> None:
    import django
    import environ
    from django.conf import settings

    settings.configure(
        DATABASES={"default": environ.Env.db_url_config(database_url)},
        INSTALLED_APPS=["django.contrib.auth", "django.contrib.contenttypes", "django_rpc_audit"],
        USE_TZ=True,
        DJANGO_CFG_RPC={"TRANSPORT": "local"},
    )
    django.setup()
    from django.core.management import call_command
    from django.db import connection

    if connection.vendor != "postgresql":
        sys.exit("This benchmark needs PostgreSQL: set DATABASE_URL=postgres://...")
    if migrate:
        call_command("migrate", verbosity=0)


FILL_SQL = """
INSERT INTO django_rpc_audit_rpclog (
    id, correlation_id, method, params, response, status, error_code, error_message,
    duration_ms, caller_ip, user_agent, created_at, completed_at, sample_rate
)
SELECT
    gen_random_uuid(), gen_random_uuid()::text, 'method.' || (i %% 20),
    jsonb_build_object('n', i, 'payload', repeat('x', 200)), '{"ok": true}'::jsonb,
    CASE WHEN i %% 50 = 0 THEN 'failed' ELSE 'success' END, '', '',
    (i %% 1000) / 10.0, '10.0.0.1', 'bench/1.0',
    now() - %s * interval '1 day' - (i %% 86400) * interval '1 second',
    now() - %s * interval '1 day', 1.0
FROM generate_series(1, %s) AS i
"""


def fill(old_rows: int, recent_rows: int) -> float:
    from django.db import connection

    start = time.perf_counter()
    with connection.cursor() as cursor:
        cursor.execute("TRUNCATE django_rpc_audit_rpclog")
        cursor.execute("TRUNCATE django_rpc_audit_rpcrollup, django_rpc_audit_rpcrollupbucket")
        cursor.execute(FILL_SQL, [60, 60, old_rows])
        cursor.execute(FILL_SQL, [1, 1, recent_rows])
        cursor.execute("VACUUM ANALYZE django_rpc_audit_rpclog")
    return time.perf_counter() - start


def insert_until_stopped(database_url: str, stop: Any, ready: Any, results: Any) -> None:
    """In its own process (no GIL shared with the prune): write finished calls one by one."""
    setup_django(database_url, migrate=False)
    from django.db import connection, transaction
    from django.utils import timezone

    from django_rpc_audit.models import RPCLog
    from django_rpc_audit.writers.sink import record_finished

    latencies: list[float] = []
    errors = 0
    ready.set()
    while not stop.is_set():
        now = timezone.now()
        begin = time.perf_counter()
        try:
            with transaction.atomic():
                record_finished(
                    RPCLog.objects.all(),
                    correlation_id=str(uuid.uuid4()),
                    method="bench.insert",
                    params={"n": len(latencies)},
                    user=None,
                    caller_ip="10.0.0.2",
                    user_agent="bench/1.0",
                    started_at=now,
                    status="success",
                    response={"ok": True},
                    error_code=None,
                    error_message=None,
                    duration_ms=1.0,
                    completed_at=now,
                )
        except Exception:
            errors += 1
        latencies.append(time.perf_counter() - begin)
    connection.close()
    results.put((latencies, errors))


def run_with_inserter(
    database_url: str, work: Callable[[], Any]
) -> tuple[Any, float, list[float], int]:
    """Run ``work`` while another process inserts; its result, seconds, insert latencies, errors."""
    context = multiprocessing.get_context("spawn")
    stop, ready, results = context.Event(), context.Event(), context.Queue()
    process = context.Process(
        target=insert_until_stopped, args=(database_url, stop, ready, results)
    )
    process.start()
    ready.wait()
    begin = time.perf_counter()
    try:
        result = work()
    finally:
        elapsed = time.perf_counter() - begin
        stop.set()
        latencies, errors = results.get()
        process.join()
    return result, elapsed, latencies, errors


def describe(name: str, latencies: list[float], seconds: float, errors: int) -> str:
    ms = sorted(value * 1000 for value in latencies)
    if not ms:
        return f"  {name}: no inserts"
    p99 = ms[min(len(ms) - 1, int(len(ms) * 0.99))]
    return (
        f"  {name}: {len(ms)} inserts in {seconds:.1f} s ({len(ms) / seconds:.0f}/s), "
        f"latency median {statistics.median(ms):.2f} ms, p99 {p99:.2f} ms, "
        f"max {ms[-1]:.1f} ms, errors {errors}"
    )


def plain_batches(size: int) -> int:
    """Delete the rows older than 30 days as ``prune()`` did before rollups: batches of keys
    chosen by ``LIMIT``, each its own transaction, nothing counted."""
    from django.db import transaction
    from django.db.models import Subquery
    from django.utils import timezone

    from django_rpc_audit.models import RPCLog

    old = RPCLog.objects.filter(created_at__lt=timezone.now() - timedelta(days=30))
    deleted = 0
    while True:
        with transaction.atomic():
            keys = old.order_by("created_at").values("pk")[:size]
            count, _ = RPCLog.objects.filter(pk__in=Subquery(keys)).delete()
        deleted += count
        if count < size:
            return deleted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="old rows to prune")
    parser.add_argument("--recent", type=int, default=100_000, help="rows inside the window")
    parser.add_argument(
        "--batch-size",
        type=lambda raw: [int(size) for size in raw.split(",")],
        default=[5_000],
        help="rows per batch; several, comma-separated, are run one after the other",
    )
    parser.add_argument("--baseline", type=float, default=5.0, help="seconds of inserts alone")
    parser.add_argument("--single-delete", action="store_true", help="also time one DELETE")
    parser.add_argument(
        "--plain-batches",
        action="store_true",
        help="also time batched deletes that count nothing into the rollups (the old prune)",
    )
    args = parser.parse_args()

    url = os.environ.get("DATABASE_URL")
    if not url:
        sys.exit("Set DATABASE_URL to a PostgreSQL database the benchmark may fill and empty.")
    setup_django(url)
    from django.db import connection, transaction
    from django.utils import timezone

    from django_rpc_audit.models import RPCLog

    print(
        f"PostgreSQL {connection.cursor().connection.info.server_version}, "
        f"{args.rows:,} old rows + {args.recent:,} recent rows"
    )
    for number, batch_size in enumerate(args.batch_size):
        if number:
            print()
        print(
            f"fill (INSERT ... SELECT generate_series + VACUUM ANALYZE): "
            f"{fill(args.rows, args.recent):.1f} s"
        )
        # Inserts alone, then inserts while the prune runs: same process, same code, one run.
        _, base_seconds, alone, alone_errors = run_with_inserter(
            url, lambda: time.sleep(args.baseline)
        )
        deleted, seconds, during, during_errors = run_with_inserter(
            url, lambda size=batch_size: RPCLog.objects.prune(days=30, batch_size=size)
        )
        left = RPCLog.objects.count()
        print(
            f"prune(days=30, batch_size={batch_size:,}): deleted {deleted:,} rows in "
            f"{seconds:.1f} s = {deleted / seconds:,.0f} rows/s; {left:,} rows left "
            f"({args.recent:,} recent + {len(alone) + len(during):,} inserted)"
        )
        print("concurrent inserts from another process (record_finished, one transaction each):")
        print(describe("alone        ", alone, base_seconds, alone_errors))
        print(describe("during prune ", during, seconds, during_errors))

    if args.plain_batches:
        print(f"refill: {fill(args.rows, args.recent):.1f} s")
        size = args.batch_size[0]
        deleted, seconds, during, errors = run_with_inserter(url, lambda: plain_batches(size))
        print(
            f"plain batches of {size:,}, nothing rolled up: {deleted:,} rows in "
            f"{seconds:.1f} s = {deleted / seconds:,.0f} rows/s"
        )
        print(describe("during plain ", during, seconds, errors))

    if args.single_delete:
        print(f"refill: {fill(args.rows, args.recent):.1f} s")
        cutoff = timezone.now() - timedelta(days=30)

        def single_delete() -> int:
            with transaction.atomic():
                return RPCLog.objects.filter(created_at__lt=cutoff)._raw_delete(RPCLog.objects.db)

        deleted, seconds, during, errors = run_with_inserter(url, single_delete)
        print(
            f"one DELETE in one transaction: {deleted:,} rows in {seconds:.1f} s "
            f"= {deleted / seconds:,.0f} rows/s"
        )
        print(describe("during DELETE", during, seconds, errors))

    with connection.cursor() as cursor:
        cursor.execute("TRUNCATE django_rpc_audit_rpclog")
        cursor.execute("TRUNCATE django_rpc_audit_rpcrollup, django_rpc_audit_rpcrollupbucket")


if __name__ == "__main__":
    main()
