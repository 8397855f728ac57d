"""What alerts cost the caller: webhooks and slow-call detection on, against logging on and off.

In one process, interleaved in rounds so machine noise hits every variant alike, over real
Redis with a responder process speaking the django-ipc protocol (every 20th call is of a
method it answers with an error, so failures and their alerts are part of the load), and a
real database (PostgreSQL with ``DATABASE_URL``; a SQLite file otherwise):

- *logging off*: ``ENABLE_LOGGING`` and ``SLOW_CALL_DETECTION`` off, no webhooks;
- *logging on*: the buffered writer (the default), detection off, no webhooks;
- *alerts on*: the buffered writer, slow-call detection, and a webhook endpoint (a real HTTP
  server in another process) for ``rpc.failed``, ``rpc.timeout`` and ``rpc.slow``: the writer
  thread queues the alerts with the rows and this process's delivery thread sends them.

Rounds rotate the variants' order. Per variant: median and p99 latency per call, the ratio
to logging off, and the process CPU time per call (callers, writer and delivery threads
together). Then the detector alone: CPU time per ``observe()``.

    createdb -h 127.0.0.1 -U postgres rpc_bench_alerts
    DATABASE_URL=postgres://postgres@127.0.0.1:5432/rpc_bench_alerts .venv/bin/python \\
        benchmarks/alerts_overhead.py --redis redis://127.0.0.1:6379/14
"""

from __future__ import annotations

import argparse
import base64
import json
import multiprocessing
import os
import statistics
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from buffered_writer import configure, delete_stream, print_table, setup_django  # noqa: E402

FAIL_EVERY = 20
WINDOW_SECONDS = 60.0


def responder(redis_url: str, stream: str, stop: Any) -> None:
    """Answers every request on ``stream`` at once; ``bench.fail`` with an error."""
    import redis

    client = redis.Redis.from_url(redis_url)
    last = "$"
    while not stop.is_set():
        for _stream, entries in client.xread({stream: last}, block=100, count=100) or []:
            for entry_id, fields in entries:
                last = entry_id
                request = json.loads(fields[b"payload"])
                failed = request["method"] == "bench.fail"
                reply = {
                    "correlation_id": request["correlation_id"],
                    "timestamp": "2026-01-01T00:00:00Z",
                    "success": not failed,
                    "error": "upstream down" if failed else None,
                    "error_code": "upstream_down" if failed else None,
                    "result": None if failed else {"echo": request["params"]},
                }
                client.lpush(request["reply_to"], json.dumps(reply))
    client.close()


def receiver(port: Any, stop: Any, count: Any) -> None:
    """A webhook endpoint answering 200 to everything, counting what it gets."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            with count.get_lock():
                count.value += 1
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    port.value = server.server_address[1]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    stop.wait()
    server.shutdown()


def variant(name: str, webhook_url: str) -> None:
    secret = "whsec_" + base64.b64encode(b"b" * 32).decode()
    endpoint = {"NAME": "bench", "URL": webhook_url, "SECRET": secret}
    if name == "off":
        configure(ENABLE_LOGGING=False, SLOW_CALL_DETECTION=False, WEBHOOKS=[])
    elif name == "logging":
        configure(ENABLE_LOGGING=True, SLOW_CALL_DETECTION=False, WEBHOOKS=[])
    else:
        configure(
            ENABLE_LOGGING=True,
            SLOW_CALL_DETECTION=True,
            WEBHOOKS=[endpoint],
            WEBHOOK_DELIVERY_THREAD=True,
            # The defaults are a 60 s window and a 2 s poll; --window shortens the window to
            # put a digest (and a new window) in every few rounds.
            WEBHOOK_GROUP_WINDOW_SECONDS=WINDOW_SECONDS,
        )


def timed(calls: int) -> tuple[list[float], float]:
    from django_rpc_audit import get_rpc_client
    from django_rpc_audit.exceptions import RPCRemoteError

    client = get_rpc_client()
    samples = []
    cpu = time.process_time()
    for n in range(calls):
        method = "bench.fail" if n % FAIL_EVERY == 0 else "bench.echo"
        started = time.perf_counter()
        try:  # noqa: SIM105  (a bare try costs less than suppress() inside the timing)
            client.call(method, {"n": n, "who": "benchmark"})
        except RPCRemoteError:
            pass
        samples.append((time.perf_counter() - started) * 1e6)
    return samples, time.process_time() - cpu


def measure(calls: int, rounds: int, webhook_url: str) -> None:
    from django_rpc_audit.models import RPCLog, WebhookDelivery
    from django_rpc_audit.writers import flush

    labels = {"off": "logging off", "logging": "logging on", "alerts": "alerts on"}
    results: dict[str, list[float]] = {name: [] for name in labels}
    cpu: dict[str, float] = dict.fromkeys(labels, 0.0)
    for name in labels:  # warm-up: connections, caches, threads, baselines
        variant(name, webhook_url)
        timed(300)
    names = list(labels)
    for round_ in range(rounds):
        # Each round starts with another variant, so none always follows the same one.
        for name in names[round_ % 3 :] + names[: round_ % 3]:
            variant(name, webhook_url)
            samples, seconds = timed(calls)
            results[name] += samples
            cpu[name] += seconds
            # Under the variant's own settings (its alerts are queued with its rows), so that
            # the next variant does not pay for this one's backlog.
            flush()
    print_table(
        f"call() over Redis, {rounds} rounds x {calls} calls per variant, "
        f"1 in {FAIL_EVERY} failing",
        results,
        labels,
    )
    for name, label in labels.items():
        print(f"{label}: process CPU {cpu[name] / len(results[name]) * 1e6:.1f} µs per call")
    alerts = statistics.median(results["alerts"]) / statistics.median(results["logging"])
    print(f"alerts on / logging on: {alerts:.3f}")
    print(
        f"rows: {RPCLog.objects.count()}, outbox: {WebhookDelivery.objects.count()} "
        f"({WebhookDelivery.objects.filter(state='grouped').count()} grouped by storm control)"
    )


def measure_detector(observations: int) -> None:
    from django_rpc_audit.alerts.slow import SlowCallDetector

    detector = SlowCallDetector()
    methods = [f"method.{n}" for n in range(50)]
    durations = [1.0 + (n % 7) * 0.1 for n in range(1000)]
    cpu = time.process_time()
    for n in range(observations):
        detector.observe(methods[n % 50], "success", durations[n % 1000])
    per_call = (time.process_time() - cpu) / observations
    print(
        f"\nSlowCallDetector.observe(): {per_call * 1e6:.2f} µs CPU per call "
        f"({observations:,} calls, 50 methods)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis", metavar="URL", default="redis://127.0.0.1:6379/9")
    parser.add_argument("--calls", type=int, default=500, help="calls per variant per round")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--window", type=float, default=60.0, help="storm window, seconds")
    args = parser.parse_args()
    global WINDOW_SECONDS
    WINDOW_SECONDS = args.window

    stream = f"bench:{uuid.uuid4().hex}"
    database = setup_django(os.environ.get("DATABASE_URL"), args.redis, stream)
    context = multiprocessing.get_context("fork")
    stop = context.Event()
    port = context.Value("i", 0)
    received = context.Value("i", 0)
    helpers = [
        context.Process(target=responder, args=(args.redis, stream, stop), daemon=True),
        context.Process(target=receiver, args=(port, stop, received), daemon=True),
    ]
    for helper in helpers:
        helper.start()
    while not port.value:
        time.sleep(0.05)
    webhook_url = f"http://127.0.0.1:{port.value}/hooks"
    print(
        f"database: {database}; Redis {args.redis} with a responder process; a webhook "
        f"endpoint in another process; python {sys.version.split()[0]}; {os.cpu_count()} CPUs"
    )
    try:
        measure(args.calls, args.rounds, webhook_url)
        time.sleep(2)
        print(f"webhook requests received: {received.value}")
    finally:
        stop.set()
        for helper in helpers:
            helper.join(5)
        delete_stream(args.redis, stream)
    measure_detector(1_000_000)
    from django_rpc_audit.models import RPCLog, WebhookDelivery

    RPCLog.objects.all().delete()
    WebhookDelivery.objects.all().delete()


if __name__ == "__main__":
    main()
