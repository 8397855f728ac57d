"""What a rate limit costs the caller: ``call()`` over real Redis, limited and not, side by side.

Variants, interleaved in rounds so machine noise hits them alike, logging off (the limiter's
cost alone), a responder process answering the django-ipc protocol:

- *no RATE_LIMITS*: no limiter at all;
- *unlimited method*: ``RATE_LIMITS`` set, but no rule matches the method;
- *limited, in the XADD script*: a limit never reached, checked inside the request's script;
- *limited, own round trip*: the same limit kept on another Redis URL (``RATE_LIMIT_REDIS_URL``,
  here the same server's next database), so the check is a round trip before the ``XADD``;
- *refused*: over its limit; the call raises ``RPCRateLimitedError`` without being sent.

Prints median and p99 latency, the caller thread's CPU time per call, and ratios to *no
RATE_LIMITS*; then the limiter's own cost for an unlimited method (ns and bytes allocated per
call, measured with ``tracemalloc``).

    .venv/bin/python benchmarks/rate_limit.py --redis redis://127.0.0.1:6379/14
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import time
import tracemalloc
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.call_overhead import responder, setup_django  # noqa: E402

LIMITED, FREE = "bench.limited", "bench.free"


def other_database(url: str) -> str:
    """The same server's next database: another URL, so the check is not combined."""
    base, _, db = url.rpartition("/")
    return f"{base}/{(int(db or 0) + 1) % 16}"


def variants(redis_url: str, stream: str, prefix: str) -> dict[str, dict[str, Any]]:
    base = {
        "TRANSPORT": "redis",
        "REDIS_URL": redis_url,
        "REQUEST_STREAM": stream,
        "ENABLE_LOGGING": False,
    }
    never = {LIMITED: "1000000/second"}
    plan: dict[str, dict[str, Any]] = {
        "no RATE_LIMITS": {**base, "method": LIMITED},
        "unlimited method": {**base, "RATE_LIMITS": never, "method": FREE},
        "limited, in the XADD script": {**base, "RATE_LIMITS": never, "method": LIMITED},
        "limited, own round trip": {
            **base,
            "RATE_LIMITS": never,
            "RATE_LIMIT_REDIS_URL": other_database(redis_url),
            "method": LIMITED,
        },
        "refused": {**base, "RATE_LIMITS": {LIMITED: "1/hour"}, "method": LIMITED},
    }
    # A budget of each variant's own: the state of one limit would hold back another.
    for number, settings in enumerate(plan.values()):
        settings["RATE_LIMIT_KEY_PREFIX"] = f"{prefix}{number}:"
    return plan


def measure(calls: int, settings: dict[str, Any]) -> tuple[list[float], float, int]:
    """Per-call latency in µs, the calling thread's CPU µs per call, and the refusals."""
    from django.test import override_settings

    from django_rpc_audit import get_rpc_client
    from django_rpc_audit.exceptions import RPCRateLimitedError

    config = {key: value for key, value in settings.items() if key != "method"}
    method = settings["method"]
    samples = []
    refused = 0
    with override_settings(DJANGO_CFG_RPC=config):
        client = get_rpc_client()
        cpu = time.thread_time()
        for n in range(calls):
            started = time.perf_counter()
            try:
                client.call(method, {"n": n}, caller_ip="192.0.2.1")
            except RPCRateLimitedError:
                refused += 1
            samples.append((time.perf_counter() - started) * 1e6)
        cpu_per_call = (time.thread_time() - cpu) * 1e6 / calls
    return samples, cpu_per_call, refused


def limiter_cost(calls: int) -> tuple[float, float, float]:
    """ns per ``RateLimiter.limit()`` of an unlimited method, bytes allocated per such call,
    and ns per ``RateLimiter.ticket()`` of a limited one (the Python work before Redis)."""
    from django_rpc_audit.conf import DjangoCfgRPCConfig
    from django_rpc_audit.ratelimit import RateLimiter
    from django_rpc_audit.transports import LocalTransport, RPCRequest

    config = DjangoCfgRPCConfig.from_mapping({"RATE_LIMITS": {LIMITED: "10/second"}})
    limiter = RateLimiter(config, LocalTransport())
    request = RPCRequest(FREE, {}, str(uuid.uuid4()), "r", 1.0, "{}")
    limiter.limit(request, None, "192.0.2.1")  # the method's rule is now cached
    started = time.perf_counter()
    for _ in range(calls):
        limiter.limit(request, None, "192.0.2.1")
    ns = (time.perf_counter() - started) * 1e9 / calls
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    for _ in range(calls):
        limiter.limit(request, None, "192.0.2.1")
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    allocated = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    started = time.perf_counter()
    for _ in range(calls):
        limiter.ticket(LIMITED, None, "192.0.2.1")
    ticket_ns = (time.perf_counter() - started) * 1e9 / calls
    return ns, allocated / calls, ticket_ns


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis", metavar="URL", required=True, help="a real Redis")
    parser.add_argument("--calls", type=int, default=1000, help="calls per variant per round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    setup_django(None)
    import redis

    stream = f"bench:{uuid.uuid4().hex}"
    prefix = f"bench:{uuid.uuid4().hex}:rl:"
    # A process of its own: a thread would contend with the caller for the GIL.
    stop = multiprocessing.get_context("fork").Event()
    answering = multiprocessing.get_context("fork").Process(
        target=responder, args=(args.redis, stream, stop), daemon=True
    )
    answering.start()
    time.sleep(0.5)
    plan = variants(args.redis, stream, prefix)
    latency: dict[str, list[float]] = {name: [] for name in plan}
    cpu: dict[str, list[float]] = {name: [] for name in plan}
    refused = dict.fromkeys(plan, 0)
    for settings in plan.values():  # warm up connections and scripts
        measure(100, settings)
    for _round in range(args.rounds):
        for name, settings in plan.items():
            samples, cpu_per_call, count = measure(args.calls, settings)
            latency[name].extend(samples)
            cpu[name].append(cpu_per_call)
            refused[name] += count
    stop.set()
    answering.join(5)
    for url in (args.redis, other_database(args.redis)):
        client = redis.Redis.from_url(url)
        client.delete(stream, *client.scan_iter(f"{prefix}*"))
        client.close()

    print(f"Redis {args.redis} with a responder process; python {sys.version.split()[0]}")
    print("logging off; the caller's CPU time is its own thread's (time.thread_time)")
    print(f"{args.rounds} rounds x {args.calls} calls per variant, interleaved")
    base = statistics.median(latency["no RATE_LIMITS"])
    base_cpu = statistics.median(cpu["no RATE_LIMITS"])
    header = f"{'variant':<30}{'median µs':>10}{'p99 µs':>10}{'ratio':>7}{'CPU µs':>8}{'ratio':>7}"
    print(f"{header}{'refused':>9}")
    for name in plan:
        samples = sorted(latency[name])
        median = statistics.median(samples)
        p99 = samples[int(len(samples) * 0.99) - 1]
        cpu_median = statistics.median(cpu[name])
        print(
            f"{name:<30}{median:>10.1f}{p99:>10.1f}{median / base:>7.3f}"
            f"{cpu_median:>8.1f}{cpu_median / base_cpu:>7.3f}{refused[name]:>9}"
        )
    ns, allocated, ticket_ns = limiter_cost(200_000)
    print(f"RateLimiter.limit(), unlimited method: {ns:.0f} ns/call, {allocated:.3f} bytes/call")
    print(f"RateLimiter.ticket(), limited method (no Redis): {ticket_ns:.0f} ns/call")


if __name__ == "__main__":
    main()
