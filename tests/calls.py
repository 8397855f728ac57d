"""Calls made at a steady pace for a while, timed: what the outage tests measure."""

from __future__ import annotations

import time

from django_rpc_audit.client import RPCClient


def calls_for(client: RPCClient, seconds: float, who: str) -> list[float]:
    """Call ``test.echo`` every 2 ms for ``seconds``; return each call's latency."""
    latencies = []
    deadline = time.monotonic() + seconds
    n = 0
    while time.monotonic() < deadline:
        clock = time.perf_counter()
        client.call("test.echo", {"who": who, "n": n})
        latencies.append(time.perf_counter() - clock)
        n += 1
        time.sleep(0.002)
    return latencies
