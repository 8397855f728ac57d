"""What logging costs the calling thread, in instructions: ``call()`` and ``acall()`` with
logging on (the buffered writer) against logging off, counted by valgrind's callgrind
(repeatable to a fraction of a percent on a noisy machine, where CPU time varies by tens of
percent between runs).

Each part runs in a child process under callgrind, twice: once after a warm-up only, once
with ``--calls`` more calls; the difference over ``--calls`` is its count per call. The calls
go through the in-process transport (an echo handler): what is counted is the client's own
work, not Redis'. With logging on, the writer holds the calls without a thread
(``background=False``), so only the caller's share is counted: signals, receivers, the
buffer's bookkeeping. ``PYTHONHASHSEED=0`` keeps the dictionaries' layout the same between
the two runs of a part.

    .venv/bin/python benchmarks/caller_instructions.py
    # the same parts in another tree (a checkout of an earlier commit) as well:
    .venv/bin/python benchmarks/caller_instructions.py --baseline ../baseline
    # over real Redis instead (a responder process, not counted, echoes the params):
    .venv/bin/python benchmarks/caller_instructions.py --redis redis://127.0.0.1:6379/9

With ``--redis`` the counts take in the Redis client's work as well (redis-py, the socket
calls), the same with logging on and off: the difference is still logging's own.

Needs ``valgrind`` on the path. A child takes 15 to 30 seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import sys
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from telemetry_instructions import command_line  # noqa: E402
from telemetry_instructions import count as callgrind_count  # noqa: E402

PARTS = ("call off", "call on", "acall off", "acall on")
WARM_UP = 300
PARAMS = {"n": 1, "who": "benchmark"}


def child(tree: Path, part: str, calls: int) -> None:
    """Set up, warm up, then make ``calls`` calls of ``part``."""
    # The helpers of this script's tree (on the path since the imports above), then the
    # package of ``tree`` before it.
    from buffered_writer import configure, setup_django

    sys.path.insert(0, str(tree))
    redis_url = os.environ.get("BENCH_REDIS_URL")
    stream = os.environ.get("BENCH_STREAM", "bench:instructions")
    setup_django(None, redis_url or "redis://127.0.0.1:6379/9", stream, migrate=False)
    import django_rpc_audit

    assert Path(django_rpc_audit.__file__).is_relative_to(tree), django_rpc_audit.__file__
    from django_rpc_audit import get_rpc_client
    from django_rpc_audit.transports import register_local_handler
    from django_rpc_audit.writers import BufferedLogWriter, use_writer

    api, mode = part.split()
    transport = "redis" if redis_url else "local"
    configure(TRANSPORT=transport, ENABLE_LOGGING=mode == "on", WRITE_MODE="buffered")
    register_local_handler("bench.echo", lambda params: params)
    writer = BufferedLogWriter(buffer_size=10 * (calls + WARM_UP), background=False)
    with use_writer(writer):
        client = get_rpc_client()
        if api == "acall":

            async def run() -> None:
                for _ in range(WARM_UP + calls):
                    await client.acall("bench.echo", PARAMS)

            asyncio.run(run())
        else:
            for _ in range(WARM_UP + calls):
                client.call("bench.echo", PARAMS)


#: The children's environment: the Redis server and stream to call over, with ``--redis``.
CHILD_ENV = {"PYTHONHASHSEED": "0"}


def count(tree: Path, part: str, calls: int) -> int:
    """Instructions of a child making ``calls`` calls of ``part`` (after the warm-up)."""
    return callgrind_count(tree, part, calls, script=Path(__file__).resolve(), env=CHILD_ENV)


def options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--redis", metavar="URL", help="call over this Redis server")


def main() -> None:
    args = command_line(__doc__.splitlines()[0], child, options)
    if args is None:
        return
    if args.redis:
        from buffered_writer import delete_stream
        from call_overhead import responder

        stream = f"bench:instructions:{uuid.uuid4().hex}"
        CHILD_ENV.update(BENCH_REDIS_URL=args.redis, BENCH_STREAM=stream)
        stop = multiprocessing.get_context("fork").Event()
        answering = multiprocessing.get_context("fork").Process(
            target=responder, args=(args.redis, stream, stop), daemon=True
        )
        answering.start()
        try:
            report(args)
        finally:
            stop.set()
            answering.join(5)
            delete_stream(args.redis, stream)
    else:
        report(args)


def report(args: argparse.Namespace) -> None:
    trees = {"this tree": ROOT}
    if args.baseline is not None:
        trees["baseline"] = args.baseline.resolve()
    over = f"over Redis ({args.redis})" if args.redis else "over the in-process transport"
    print(f"instructions per call (callgrind), {args.calls} calls after a warm-up, {over}")
    print(f"{'tree':<11}{'part':<11}{'instructions':>14}{'on - off':>11}{'on / off':>10}")
    for name, tree in trees.items():
        counts = {
            part: (count(tree, part, args.calls) - count(tree, part, 0)) / args.calls
            for part in PARTS
        }
        for part, per_call in counts.items():
            line = f"{name:<11}{part:<11}{per_call:>14,.0f}"
            if part.endswith(" on"):
                off = counts[part.replace(" on", " off")]
                line += f"{per_call - off:>11,.0f}{per_call / off:>10.3f}"
            print(line)


if __name__ == "__main__":
    main()
