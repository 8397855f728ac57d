"""What PostgreSQL spends storing the logged payloads: pglz (the server's default) against LZ4
(what migration 0010 sets on the payload columns).

PostgreSQL compresses each ``jsonb`` (or text) value of more than about 2 KB before it stores
it. The buffered writer's path stores each payload twice: as text in its staging table
(``COPY``), then as ``jsonb`` in the log table (the upsert). This benchmark runs that path
itself: calls with an echoed payload through the in-process transport into a buffered writer
without its thread, then one timed ``flush()``. Before each flush both tables' payload
columns are set to the variant's compression; the variants alternate, round after round. For
each payload kind it prints, per row (params and response):

- the CPU time of the PostgreSQL backend that ran the flush (read from
  ``/proc/<pid>/stat``, so the server must run on this machine; its clock ticks are 10 ms,
  hence flushes of 20 MB and more);
- the flush's wall time, and the writer thread's own CPU time (the same for both variants);
- the bytes the log table grew by;
- the ratio LZ4 / pglz of each, the median over the rounds.

    createdb -h 127.0.0.1 -U postgres rpc_bench
    DATABASE_URL=postgres://postgres@127.0.0.1:5432/rpc_bench .venv/bin/python \\
        benchmarks/payload_storage.py

The log table is emptied (``TRUNCATE``) before each flush: use a database of its own.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from buffered_writer import configure, setup_django  # noqa: E402
from payload_cost import base64_blob, hex_blob, many_keys, prose  # noqa: E402

PAYLOADS = {
    "10 KB prose": prose(10_240),
    "64 KB hex": hex_blob(65_536),
    "1 MB base64": base64_blob(1_048_576),
    "10 KB many keys": many_keys(10_240),
}
VARIANTS = ("pglz", "lz4")
#: Payload bytes per flush (params and response together): enough clock ticks to count.
BYTES_PER_FLUSH = 24 * 2**20


def backend_cpu(pid: int) -> float:
    """Seconds of CPU (user and system) the server process ``pid`` has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def one_flush(params: dict[str, Any], calls: int, method: str) -> dict[str, float]:
    """``calls`` echoed calls with ``params``, then the flush with ``method`` set on both
    tables' payload columns: per-row figures."""
    from django.db import connection

    from django_rpc_audit import get_rpc_client
    from django_rpc_audit.databases import PAYLOAD_FIELDS, set_payload_compression
    from django_rpc_audit.models import RPCLog
    from django_rpc_audit.writers import BufferedLogWriter, use_writer
    from django_rpc_audit.writers.sink import _STAGING_TABLE

    table = RPCLog._meta.db_table
    columns = tuple(RPCLog._meta.get_field(name).column for name in PAYLOAD_FIELDS)
    writer = BufferedLogWriter(buffer_size=10 * calls, background=False)
    with use_writer(writer):
        client = get_rpc_client()
        client.call("bench.echo", {"warm": "up"})
        writer.flush()  # makes this session's staging table
        for name in (table, _STAGING_TABLE):
            set_payload_compression(connection, name, columns, method)
        with connection.cursor() as cursor:
            cursor.execute(f"TRUNCATE {connection.ops.quote_name(table)}")
            cursor.execute("SELECT pg_backend_pid()")
            pid = cursor.fetchone()[0]
        for _ in range(calls):
            client.call("bench.echo", params)
        server, wall, thread = backend_cpu(pid), time.perf_counter(), time.thread_time()
        assert writer.flush() is True
        server = backend_cpu(pid) - server
        wall, thread = time.perf_counter() - wall, time.thread_time() - thread
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_total_relation_size(%s)", [table])
            size = cursor.fetchone()[0]
        assert RPCLog.objects.count() == calls
    return {
        "server": server * 1e6 / calls,
        "wall": wall * 1e6 / calls,
        "writer": thread * 1e6 / calls,
        "bytes": size / calls,
    }


def median(runs: list[dict[str, float]], key: str) -> float:
    return statistics.median(run[key] for run in runs)


def ratio(runs: dict[str, list[dict[str, float]]], key: str) -> float:
    """The median over the rounds of LZ4's figure over pglz's."""
    pairs = zip(runs["lz4"], runs["pglz"], strict=True)
    return statistics.median(lz4[key] / max(pglz[key], 1e-9) for lz4, pglz in pairs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if not os.environ.get("DATABASE_URL", "").startswith(("postgres://", "postgresql://")):
        sys.exit("DATABASE_URL must name a PostgreSQL database on this machine.")
    database = setup_django(os.environ["DATABASE_URL"], "redis://127.0.0.1:6379/9", "unused")
    from django.db import connection

    from django_rpc_audit.databases import lz4_available
    from django_rpc_audit.transports import register_local_handler

    if not lz4_available(connection):
        sys.exit("This PostgreSQL server was built without LZ4: nothing to compare.")
    configure(TRANSPORT="local", ENABLE_LOGGING=True, WRITE_MODE="buffered")
    register_local_handler("bench.echo", lambda params: params)
    with connection.cursor() as cursor:
        cursor.execute("SELECT version()")
        server = cursor.fetchone()[0].split(" on ")[0]
    print(f"database: {database}, {server}; python {sys.version.split()[0]}; {os.cpu_count()} CPUs")
    print(f"{args.rounds} rounds; per row (params and response), medians over the rounds\n")
    header = (
        f"{'payload':16} {'rows':>5}"
        + "".join(f" {f'{v} server µs':>15} {f'{v} wall µs':>13}" for v in VARIANTS)
        + f" {'writer µs':>10} {'pglz bytes':>11} {'lz4 bytes':>10}"
        + f" {'server lz4/pglz':>16} {'wall lz4/pglz':>14}"
    )
    print(header)
    for kind, params in PAYLOADS.items():
        size = len(str(params))
        calls = max(10, BYTES_PER_FLUSH // (2 * size))
        runs: dict[str, list[dict[str, float]]] = {variant: [] for variant in VARIANTS}
        for round_ in range(args.rounds):
            order = VARIANTS if round_ % 2 == 0 else VARIANTS[::-1]
            for variant in order:
                runs[variant].append(one_flush(params, calls, variant))
        line = f"{kind:16} {calls:5}"
        for variant in VARIANTS:
            line += (
                f" {median(runs[variant], 'server'):15.0f} {median(runs[variant], 'wall'):13.0f}"
            )
        writer = median([run for variant in VARIANTS for run in runs[variant]], "writer")
        line += f" {writer:10.0f} {median(runs['pglz'], 'bytes'):11.0f}"
        line += f" {median(runs['lz4'], 'bytes'):10.0f}"
        line += f" {ratio(runs, 'server'):16.3f} {ratio(runs, 'wall'):14.3f}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
