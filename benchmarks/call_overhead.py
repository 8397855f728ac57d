"""What logging costs the caller: ``call()`` with logging off, and with the synchronous writer.

Both run side by side in one process, interleaved in rounds so machine noise hits them alike,
over the in-process transport (so the figures are the logging's, not Redis's) and, with
``--redis``, over real Redis with a responder thread answering the django-ipc protocol.

    .venv/bin/python benchmarks/call_overhead.py                    # SQLite file
    DATABASE_URL=postgres://postgres@127.0.0.1:5432/rpc_audit_bench .venv/bin/python \\
        benchmarks/call_overhead.py --redis redis://127.0.0.1:6379/14
    .venv/bin/python benchmarks/call_overhead.py --user   # calls attributed to a saved user

Prints the median and p99 latency per call of each variant and the ratio to logging off.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def setup_django(database_url: str | None) -> str:
    import django
    from django.conf import settings

    label = "sqlite (a temporary file)"
    if database_url is None:
        database_url = f"sqlite:///{Path(tempfile.mkdtemp()) / 'bench.sqlite3'}"
    import environ

    settings.configure(
        DATABASES={"default": environ.Env.db_url_config(database_url)},
        INSTALLED_APPS=[
            "django.contrib.auth",
            "django.contrib.contenttypes",
            "django_rpc_audit",
        ],
        USE_TZ=True,
        DJANGO_CFG_RPC={"TRANSPORT": "local"},
    )
    django.setup()
    from django.core.management import call_command
    from django.db import connection

    call_command("migrate", verbosity=0)
    if connection.vendor != "sqlite":
        label = f"{connection.vendor} (database {connection.settings_dict['NAME']})"
    return label


def responder(redis_url: str, stream: str, stop: threading.Event) -> None:
    """Answers every request on ``stream`` at once, as django-ipc would."""
    import redis

    client = redis.Redis.from_url(redis_url)
    last = "$"
    while not stop.is_set():
        batches = client.xread({stream: last}, block=100, count=100)
        for _stream, entries in batches or []:
            for entry_id, fields in entries:
                last = entry_id
                request = json.loads(fields[b"payload"])
                client.lpush(
                    request["reply_to"],
                    json.dumps(
                        {
                            "correlation_id": request["correlation_id"],
                            "timestamp": "2026-01-01T00:00:00Z",
                            "success": True,
                            "error": None,
                            "error_code": None,
                            "result": {"echo": request["params"]},
                        }
                    ),
                )
    client.close()


def measure(
    calls: int, base_config: dict[str, object], logging_on: bool, user: object = None
) -> list[float]:
    """Per-call latency in µs of ``calls`` calls with logging on or off, by ``user``."""
    from django.test import override_settings

    from django_rpc_audit import get_rpc_client, rpc_context
    from django_rpc_audit.conf import get_config

    # The synchronous writer, named: the default became the buffered writer, which this
    # script used without saying so once the default changed.
    config = {**base_config, "ENABLE_LOGGING": logging_on, "WRITE_MODE": "sync"}
    samples = []
    with override_settings(DJANGO_CFG_RPC=config), rpc_context(user=user):
        assert get_config().enable_logging is logging_on
        client = get_rpc_client()
        for n in range(calls):
            started = time.perf_counter()
            client.call("bench.echo", {"n": n, "who": "benchmark"})
            samples.append((time.perf_counter() - started) * 1e6)
    return samples


def measure_user_lookup(calls: int, user: object) -> list[float]:
    """Per-lookup µs of the query the sink makes before inserting a row with a user."""
    try:
        from django_rpc_audit.writers.sink import _existing_user_pks
    except ImportError:  # a version without it
        return []
    from django_rpc_audit.models import RPCLog

    samples = []
    for _ in range(calls):
        started = time.perf_counter()
        _existing_user_pks(RPCLog.objects.all(), {user.pk})  # type: ignore[attr-defined]
        samples.append((time.perf_counter() - started) * 1e6)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000, help="calls per variant per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--redis", metavar="URL", help="also go through this real Redis")
    parser.add_argument(
        "--user", action="store_true", help="attribute the calls to a saved user (else none)"
    )
    args = parser.parse_args()

    database = setup_django(os.environ.get("DATABASE_URL"))
    from django_rpc_audit.models import RPCLog
    from django_rpc_audit.transports import register_local_handler

    register_local_handler("bench.echo", lambda params: {"echo": params})
    stop = threading.Event()
    config: dict[str, object] = {"TRANSPORT": "local"}
    transport = "local (in-process handler)"
    if args.redis:
        stream = f"bench:{uuid.uuid4().hex}"
        config = {"TRANSPORT": "redis", "REDIS_URL": args.redis, "REQUEST_STREAM": stream}
        threading.Thread(target=responder, args=(args.redis, stream, stop), daemon=True).start()
        transport = "redis + responder thread"

    user = None
    if args.user:
        from django.contrib.auth import get_user_model

        user, _ = get_user_model().objects.get_or_create(username="benchmark")
    results: dict[bool, list[float]] = {False: [], True: []}
    lookups: list[float] = []
    for logging_on in (True, False):  # warm up connections and caches
        measure(200, config, logging_on, user)
    for _round in range(args.rounds):
        for logging_on in (False, True):
            results[logging_on].extend(measure(args.calls, config, logging_on, user))
        if user is not None:
            lookups.extend(measure_user_lookup(args.calls, user))
    stop.set()
    if args.redis:
        import redis

        redis.Redis.from_url(args.redis).delete(stream)  # the run's own: up to STREAM_MAXLEN
    rows = RPCLog.objects.count()
    RPCLog.objects.all().delete()

    print(f"database: {database}; transport: {transport}; python {sys.version.split()[0]}")
    print(f"calls attributed to: {'a saved user' if user is not None else 'no user'}")
    print(f"{args.rounds} rounds x {args.calls} calls per variant, interleaved; {rows} rows logged")
    base = statistics.median(results[False])
    print(f"{'variant':<24}{'median µs':>12}{'p99 µs':>12}{'ratio':>8}")
    for logging_on, label in ((False, "logging off"), (True, "sync writer")):
        samples = sorted(results[logging_on])
        median = statistics.median(samples)
        p99 = samples[int(len(samples) * 0.99) - 1]
        print(f"{label:<24}{median:>12.1f}{p99:>12.1f}{median / base:>8.2f}")
    if lookups:
        lookups.sort()
        print(
            f"{'of which user lookup':<24}{statistics.median(lookups):>12.1f}"
            f"{lookups[int(len(lookups) * 0.99) - 1]:>12.1f}"
            "   (the sink's check that the user still exists, timed alone)"
        )


if __name__ == "__main__":
    main()
