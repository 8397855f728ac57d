"""What logging costs the caller as payloads grow: by kind and size, end to end, and in memory.

1. End to end, over real Redis (a responder process speaking django-ipc's protocol echoes the
   params) and the real database, through the public API, interleaved in rounds: ``call()``
   with logging on (the buffered writer) and off (``ENABLE_LOGGING=False``, as a user sets
   it), and the transport alone (the wire encoding and the round trip, no signal at all), for
   params holding 10 KB of prose, a 64 KB hex blob and a 1 MB base64 attachment. Median per
   call, the median of the per-round ratios (each round runs the variants one after the
   other, in a rotating order), the caller thread's CPU per call, and the whole process's
   (the log writer's thread included, its flush after each variant's calls too).
1b. Steady state: logging on and off for ``--steady-seconds`` of calls each (10 KB prose,
   64 KB hex), the writer flushing during the calls, as on a site that calls all the time;
   p50, p90, p99 and the median of the per-round median ratios.
2. Growth: CPU time on the caller's thread to build what the signals carry (the stored form
   of the params and of the echoed response, :func:`django_rpc_audit.payload.stored`) by
   payload kind (prose, hex, base64, one long run, many keys, deep nesting) and size
   (100 B ... 4 MB), median of several runs: flat once the cap is reached.
3. Memory: a stream of calls with 1 MB params through the in-process transport into a
   buffered writer whose thread is held back, so the buffer sits at ``BUFFER_MAX_BYTES``;
   resident memory at checkpoints.
4. The pause of a full (generation 2) garbage collection, which runs on whichever thread
   allocates, with an empty buffer and with 100,000 small calls buffered.

    createdb -h 127.0.0.1 -U postgres rpc_bench
    DATABASE_URL=postgres://postgres@127.0.0.1:5432/rpc_bench .venv/bin/python \\
        benchmarks/payload_cost.py --redis redis://127.0.0.1:6379/9
"""

from __future__ import annotations

import argparse
import base64
import multiprocessing
import os
import random
import resource
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from buffered_writer import (  # noqa: E402
    configure,
    current_rss_mb,
    delete_stream,
    percentile,
    setup_django,
    wait_for_responder,
)
from call_overhead import responder  # noqa: E402

WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "seven",
    "wizards",
    "quietly",
    "judge",
]


def prose(size: int) -> dict[str, Any]:
    rng = random.Random(size)
    text = " ".join(rng.choice(WORDS) for _ in range(size // 4 + 1))
    return {"subject": "Report", "body": text[:size]}


def hex_blob(size: int) -> dict[str, Any]:
    return {"sha": "x", "blob": os.urandom(size // 2 + 1).hex()[:size]}


def base64_blob(size: int) -> dict[str, Any]:
    return {
        "filename": "a.pdf",
        "data": base64.b64encode(os.urandom(size * 3 // 4 + 3)).decode()[:size],
    }


def long_run(size: int) -> dict[str, Any]:
    return {"run": "a=" * (size // 2)}


def many_keys(size: int) -> dict[str, Any]:
    return {f"field_{n}": n for n in range(max(1, size // 14))}


def deep(size: int) -> dict[str, Any]:
    value: Any = {"leaf": "x" * max(1, size - 900)}
    for n in range(100):
        value = {f"level{n}": value}
    return value


KINDS: dict[str, Callable[[int], dict[str, Any]]] = {
    "prose": prose,
    "hex": hex_blob,
    "base64": base64_blob,
    "one long run": long_run,
    "many keys": many_keys,
    "deep nesting": deep,
}
SIZES = [100, 10_000, 100_000, 1_000_000, 4_000_000]


def end_to_end(rounds: int, calls: int) -> None:
    from django_rpc_audit import get_rpc_client
    from django_rpc_audit.writers import flush

    payloads = {
        "10 KB prose": prose(10_240),
        "64 KB hex": hex_blob(65_536),
        "1 MB base64": base64_blob(1_048_576),
    }
    print(
        f"\n1. call() over Redis, echoed, {rounds} rounds x {calls} calls per variant; "
        "medians per call, and the medians of the per-round ratios"
    )
    print(
        f"{'params':<14}{'transport µs':>14}{'off µs':>10}{'on µs':>10}{'on/off':>8}"
        f"{'on/transport':>14}{'off/transport':>15}{'on CPU µs':>11}{'off CPU µs':>12}"
        f"{'on all µs':>11}{'off all µs':>12}{'on faults':>11}{'off faults':>12}"
    )
    variants = ("transport", "off", "on")
    for label, params in payloads.items():
        samples: dict[str, list[float]] = {variant: [] for variant in variants}
        cpu: dict[str, list[float]] = {variant: [] for variant in variants}
        # The process's CPU for the calls and the flush after them: the writer's thread too.
        total: dict[str, list[float]] = {variant: [] for variant in variants}
        # Minor page faults of the calling thread per call: memory it touches for the first
        # time (what the buffer holds is not reused by the next call, and glibc gives the
        # freed memory back to the system after a flush).
        faults: dict[str, list[float]] = {variant: [] for variant in variants}
        ratios: dict[str, list[float]] = {"on/off": [], "on/transport": [], "off/transport": []}
        for round_ in range(rounds + 1):  # round 0 warms up
            # Each round runs the variants in another order: none always follows another.
            order = variants[round_ % 3 :] + variants[: round_ % 3]
            medians = {}
            for variant in order:
                configure(ENABLE_LOGGING=variant == "on", WRITE_MODE="buffered")
                client = get_rpc_client()
                times = []
                process_started = time.process_time()
                faults_before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
                cpu_started = time.thread_time()
                for _ in range(calls):
                    started = time.perf_counter()
                    if variant == "transport":
                        request = client._request("bench.echo", params, None, None)
                        client.transport.call(request)
                    else:
                        client.call("bench.echo", params)
                    times.append((time.perf_counter() - started) * 1e6)
                cpu_used = (time.thread_time() - cpu_started) * 1e6 / calls
                faulted = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - faults_before
                configure(ENABLE_LOGGING=True)
                flush()  # untimed: the next variant does not pay for this one's backlog
                process_used = (time.process_time() - process_started) * 1e6 / calls
                if round_:
                    samples[variant] += times
                    cpu[variant].append(cpu_used)
                    total[variant].append(process_used)
                    faults[variant].append(faulted / calls)
                    medians[variant] = statistics.median(times)
            if round_:
                for name, values in ratios.items():
                    top, bottom = name.split("/")
                    values.append(medians[top] / medians[bottom])
        med = {variant: statistics.median(values) for variant, values in samples.items()}
        ratio = {name: statistics.median(values) for name, values in ratios.items()}
        print(
            f"{label:<14}{med['transport']:>14.0f}{med['off']:>10.0f}{med['on']:>10.0f}"
            f"{ratio['on/off']:>8.3f}{ratio['on/transport']:>14.3f}"
            f"{ratio['off/transport']:>15.3f}{statistics.median(cpu['on']):>11.0f}"
            f"{statistics.median(cpu['off']):>12.0f}{statistics.median(total['on']):>11.0f}"
            f"{statistics.median(total['off']):>12.0f}{statistics.median(faults['on']):>11.1f}"
            f"{statistics.median(faults['off']):>12.1f}"
        )


def steady_state(rounds: int, seconds: float) -> None:
    """Logging on and off over long stretches of calls, the log writer's thread flushing
    meanwhile (every ``BUFFER_FLUSH_INTERVAL`` or ``BUFFER_BATCH_SIZE`` calls), as on a site
    that makes calls all the time: what part 1 leaves out by flushing after each variant,
    untimed. The writer's thread and the database server then compete with the calls for the
    GIL and for the machine's cores."""
    from django_rpc_audit import get_rpc_client
    from django_rpc_audit.conf import get_config
    from django_rpc_audit.writers import flush, writer_stats

    payloads = {"10 KB prose": prose(10_240), "64 KB hex": hex_blob(65_536)}
    config = get_config()
    print(
        f"\n1b. call() over Redis, steady state: {rounds} rounds x {seconds:g} s of calls per "
        f"variant, the writer flushing meanwhile (every {config.buffer_flush_interval:g} s or "
        f"{config.buffer_batch_size} calls); percentiles over all calls, and the median of the "
        "per-round median ratios"
    )
    print(
        f"{'params':<14}{'calls':>7}{'off p50':>9}{'on p50':>8}{'off p90':>9}{'on p90':>8}"
        f"{'off p99':>9}{'on p99':>8}{'dropped':>9}{'on/off':>8}  per round"
    )
    for label, params in payloads.items():
        samples: dict[str, list[float]] = {"off": [], "on": []}
        ratios = []
        # Calls the buffer could not hold (the writer falling behind): logged, never raised.
        dropped_before = writer_stats().dropped
        for round_ in range(rounds + 1):  # round 0 warms up
            medians = {}
            for variant in ("on", "off") if round_ % 2 else ("off", "on"):
                configure(ENABLE_LOGGING=variant == "on", WRITE_MODE="buffered")
                client = get_rpc_client()
                times = []
                deadline = time.perf_counter() + seconds
                while time.perf_counter() < deadline:
                    started = time.perf_counter()
                    client.call("bench.echo", params)
                    times.append((time.perf_counter() - started) * 1e6)
                configure(ENABLE_LOGGING=True)
                flush()  # what is left after the stretch: untimed, as in part 1
                if round_:
                    samples[variant] += times
                    medians[variant] = statistics.median(times)
            if round_:
                ratios.append(medians["on"] / medians["off"])
        off, on = samples["off"], samples["on"]
        print(
            f"{label:<14}{len(on) // rounds:>7}"
            f"{percentile(off, 0.5):>9.0f}{percentile(on, 0.5):>8.0f}"
            f"{percentile(off, 0.9):>9.0f}{percentile(on, 0.9):>8.0f}"
            f"{percentile(off, 0.99):>9.0f}{percentile(on, 0.99):>8.0f}"
            f"{writer_stats().dropped - dropped_before:>9}{statistics.median(ratios):>8.3f}  "
            + ", ".join(f"{ratio:.3f}" for ratio in ratios)
        )


def growth(repeats: int) -> None:
    from django_rpc_audit.conf import get_config
    from django_rpc_audit.payload import stored
    from django_rpc_audit.redaction import get_redactor

    config = get_config()
    redactor = get_redactor(config.redact_keys, config.redact_methods)
    print(
        "\n2. caller CPU µs to build the stored params and echoed response "
        f"(MAX_*_BYTES {config.max_params_bytes}), median of {repeats}"
    )
    print(f"{'kind':<14}" + "".join(f"{size:>12,}" for size in SIZES))
    for kind, make in KINDS.items():
        row = []
        for size in SIZES:
            params = make(size)
            response = {"echo": params}
            times = []
            for _ in range(repeats):
                started = time.thread_time()
                # As the client does: the sizes the values had on the wire are known.
                stored(params, config.max_params_bytes, redactor, original_bytes=size)
                stored(response, config.max_response_bytes, redactor, original_bytes=size)
                times.append((time.thread_time() - started) * 1e6)
            row.append(statistics.median(times))
        print(f"{kind:<14}" + "".join(f"{value:>12.0f}" for value in row))


def memory(calls: int, max_bytes: int) -> None:
    from django_rpc_audit import get_rpc_client
    from django_rpc_audit.transports import register_local_handler
    from django_rpc_audit.writers import BufferedLogWriter, use_writer

    register_local_handler("bench.echo", lambda params: {"echo": params})
    configure(TRANSPORT="local", ENABLE_LOGGING=True)
    client = get_rpc_client()
    writer = BufferedLogWriter(buffer_max_bytes=max_bytes, background=False)
    params = base64_blob(1_048_576)
    print(
        f"\n3. memory: {calls} calls with 1 MB params, BUFFER_MAX_BYTES {max_bytes:,}, "
        "nothing written"
    )
    print(f"{'calls':>8}{'RSS MB':>9}{'buffered':>10}{'buffered MB':>13}{'dropped':>9}")
    with use_writer(writer):
        for n in range(1, calls + 1):
            client.call("bench.echo", params)
            if n in {1, calls // 10, calls // 4, calls // 2, calls * 3 // 4, calls}:
                stats = writer.stats()
                print(
                    f"{n:>8}{current_rss_mb():>9.1f}{stats.buffered:>10}"
                    f"{stats.buffered_bytes / 2**20:>13.1f}{stats.dropped:>9}"
                )


def gc_pause(entries: int) -> None:
    """A full collection's pause on the caller's thread with ``entries`` calls buffered."""
    import gc

    from django_rpc_audit import get_rpc_client
    from django_rpc_audit.transports import register_local_handler
    from django_rpc_audit.writers import BufferedLogWriter, use_writer

    register_local_handler("bench.echo", lambda params: {"echo": params})
    configure(TRANSPORT="local", ENABLE_LOGGING=True)
    client = get_rpc_client()

    def pause() -> float:
        times = []
        for _ in range(5):
            started = time.perf_counter()
            gc.collect()
            times.append((time.perf_counter() - started) * 1e3)
        return statistics.median(times)

    print(f"\n4. gen-2 collection, median of 5, with {entries:,} small calls buffered")
    empty = pause()
    writer = BufferedLogWriter(buffer_size=entries, buffer_max_bytes=2**40, background=False)
    with use_writer(writer):
        for n in range(entries):
            client.call("bench.echo", {"user_id": n, "note": "hello"})
    full = pause()
    print(f"empty buffer {empty:.1f} ms; {writer.stats().buffered:,} buffered {full:.1f} ms")
    print(f"objects the collector tracks: {len(gc.get_objects()):,}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis", metavar="URL", default="redis://127.0.0.1:6379/9")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=40, help="calls per variant per round")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--memory-calls", type=int, default=2_000)
    parser.add_argument("--buffer-max-bytes", type=int, default=32 * 2**20)
    parser.add_argument("--gc-entries", type=int, default=100_000)
    parser.add_argument(
        "--steady-seconds",
        type=float,
        default=3.0,
        help="seconds of calls per variant per round in part 1b",
    )
    parser.add_argument(
        "--skip", nargs="*", default=[], choices=["e2e", "steady", "growth", "memory", "gc"]
    )
    args = parser.parse_args()

    stream = f"bench:{uuid.uuid4().hex}"
    database = setup_django(os.environ.get("DATABASE_URL"), args.redis, stream)
    print(f"database: {database}; python {sys.version.split()[0]}; {os.cpu_count()} CPUs")
    if "e2e" not in args.skip or "steady" not in args.skip:
        stop = multiprocessing.get_context("fork").Event()
        answering = multiprocessing.get_context("fork").Process(
            target=responder, args=(args.redis, stream, stop), daemon=True
        )
        answering.start()
        wait_for_responder()
        try:
            if "e2e" not in args.skip:
                end_to_end(args.rounds, args.calls)
            if "steady" not in args.skip:
                steady_state(args.rounds, args.steady_seconds)
        finally:
            stop.set()
            answering.join(5)
            delete_stream(args.redis, stream)
    if "growth" not in args.skip:
        growth(args.repeats)
    if "memory" not in args.skip:
        memory(args.memory_calls, args.buffer_max_bytes)
    if "gc" not in args.skip:
        gc_pause(args.gc_entries)


if __name__ == "__main__":
    main()
