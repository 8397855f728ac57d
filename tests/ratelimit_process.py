"""One of the processes that hammer a rate-limited method (``test_ratelimit_processes.py``).

Run as ``python -m tests.ratelimit_process MODE WORKERS`` with the ``DJANGO_CFG_RPC__*``
variables naming the Redis, the stream and the limits. MODE is ``call`` (threads),
``acall`` (asyncio tasks) or ``send`` (threads calling ``fire_and_forget``). It prints
``{"ready": true}``, waits for a line ``go SECONDS`` on stdin, calls ``system.echo`` from every
worker until the time is up, flushes its log rows and prints what happened as one JSON line.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
import time
from collections import Counter
from typing import Any

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")
os.environ.setdefault("DJANGO_CFG_RPC__WRITE_MODE", "buffered")

import django  # noqa: E402

django.setup()

from django_rpc_audit import get_rpc_client  # noqa: E402
from django_rpc_audit.context import rpc_context  # noqa: E402
from django_rpc_audit.exceptions import RPCRateLimitedError  # noqa: E402
from django_rpc_audit.writers import flush  # noqa: E402

METHOD = "system.echo"
#: Every process and worker is the same anonymous caller: one budget for all of them.
CALLER_IP = "192.0.2.77"
#: A refused worker tries again this soon: still hundreds of attempts a second per worker.
PAUSE_AFTER_REFUSAL = 0.002


class Tally:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self.longest_retry_after = 0.0
        self.errors: list[str] = []

    def refused(self, exc: RPCRateLimitedError) -> None:
        with self.lock:
            self.counts[exc.code] += 1
            self.longest_retry_after = max(self.longest_retry_after, exc.retry_after)

    def count(self, name: str) -> None:
        with self.lock:
            self.counts[name] += 1

    def error(self, exc: Exception) -> None:
        with self.lock:
            self.errors.append(repr(exc)[:300])


def thread_worker(mode: str, deadline: float, tally: Tally) -> None:
    client = get_rpc_client()
    n = 0
    with rpc_context(caller_ip=CALLER_IP):
        while time.time() < deadline:
            n += 1
            try:
                if mode == "send":
                    client.fire_and_forget(METHOD, {"data": {"n": n}})
                else:
                    assert client.call(METHOD, {"data": {"n": n}})["echo"] == {"n": n}
            except RPCRateLimitedError as exc:
                tally.refused(exc)
                time.sleep(PAUSE_AFTER_REFUSAL)
            except Exception as exc:
                tally.error(exc)
            else:
                tally.count("allowed")


async def task_worker(deadline: float, tally: Tally) -> None:
    client = get_rpc_client()
    n = 0
    with rpc_context(caller_ip=CALLER_IP):
        while time.time() < deadline:
            n += 1
            try:
                assert (await client.acall(METHOD, {"data": {"n": n}}))["echo"] == {"n": n}
            except RPCRateLimitedError as exc:
                tally.refused(exc)
                await asyncio.sleep(PAUSE_AFTER_REFUSAL)
            except Exception as exc:
                tally.error(exc)
            else:
                tally.count("allowed")


async def run_tasks(workers: int, deadline: float, tally: Tally) -> None:
    await asyncio.gather(*(task_worker(deadline, tally) for _ in range(workers)))


def main(mode: str, workers: int) -> None:
    get_rpc_client()  # built before the start, as in a warm server
    print(json.dumps({"ready": True}), flush=True)
    command, seconds = sys.stdin.readline().split()
    assert command == "go"
    started = time.time()
    deadline = started + float(seconds)
    tally = Tally()
    if mode == "acall":
        asyncio.run(run_tasks(workers, deadline, tally))
    else:
        threads = [
            threading.Thread(target=thread_worker, args=(mode, deadline, tally))
            for _ in range(workers)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    ended = time.time()
    report: dict[str, Any] = {
        "mode": mode,
        "started": started,
        "ended": ended,
        "allowed": tally.counts["allowed"],
        "refused": tally.counts["rate_limited"],
        "refused_otherwise": tally.counts["rate_limiter_unavailable"],
        "longest_retry_after": tally.longest_retry_after,
        "errors": tally.errors[:5],
        "error_count": len(tally.errors),
        "flushed": flush(timeout=60),
    }
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
