"""What a traced call's span costs the caller, in instructions: our probe against the
OpenTelemetry SDK's own span, counted by valgrind's callgrind (repeatable to a fraction of a
percent on a noisy machine, where CPU time varies by tens of percent between runs).

Each part runs in a child process under callgrind, twice: once after a warm-up only, once
with ``--calls`` more runs of the part; the difference over ``--calls`` is its count per call.
Parts: ``probe`` (tracing on, every trace sampled: the span started, its trace context added
to the message, the span ended), ``probe-sampled-out`` (the SDK's sampler drops the trace:
``ParentBased(TraceIdRatioBased(0))``), ``sdk-span`` (a bare SDK span with the same name,
kind and attributes: the floor any instrumentation pays), ``sdk-span+inject`` (and the
global propagator's ``inject()`` through its generic path) and ``sdk-span-sampled-out`` (the
bare span when the sampler drops the trace). The SDK is set up as in
``telemetry_overhead.py`` (batch span processor, an exporter that drops).

    .venv/bin/python benchmarks/telemetry_instructions.py
    # our probe in another tree (a checkout of an earlier commit) as well:
    .venv/bin/python benchmarks/telemetry_instructions.py --baseline ../baseline

Needs ``valgrind`` on the path. A child takes 15 to 30 seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PARTS = ("probe", "probe-sampled-out", "sdk-span", "sdk-span+inject", "sdk-span-sampled-out")
WARM_UP = 300


def child(tree: Path, part: str, calls: int) -> None:
    """Set up, warm every part up, then run ``part`` ``calls`` times."""
    # The helpers of this script's tree (they put it on the path), then the package of
    # ``tree`` before it.
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from buffered_writer import configure, setup_django
    from telemetry_overhead import SPAN_ATTRIBUTES, setup_otel_sdk, use_sampler

    sys.path.insert(0, str(tree))
    setup_django(None, "redis://127.0.0.1:6379/9", "bench:instructions", migrate=False)
    import django_rpc_audit

    assert Path(django_rpc_audit.__file__).is_relative_to(tree), django_rpc_audit.__file__
    setup_otel_sdk()
    from opentelemetry import propagate, trace
    from opentelemetry.trace import SpanKind

    from django_rpc_audit import get_rpc_client
    from django_rpc_audit.transports import RPCRequest

    message = {"type": "rpc", "method": "bench.echo", "params": {"n": 1, "who": "benchmark"}}
    request = RPCRequest(
        "bench.echo",
        message["params"],
        str(uuid.uuid4()),
        "list:response:x",
        5.0,
        json.dumps(message, separators=(",", ":")),
    )
    configure(OTEL_TRACES=True, OTEL_METRICS=False, PROMETHEUS_METRICS=False)
    instrumentation: Any = get_rpc_client().instrumentation
    tracer = trace.get_tracer("benchmark.sdk_span")

    def probe() -> None:
        instrumentation.start(request).finish("success", None, None, 1.0)

    def sdk_span() -> None:
        tracer.start_span("bench.echo", kind=SpanKind.CLIENT, attributes=SPAN_ATTRIBUTES).end()

    def sdk_span_and_inject() -> None:
        span = tracer.start_span("bench.echo", kind=SpanKind.CLIENT, attributes=SPAN_ATTRIBUTES)
        propagate.inject({}, context=trace.set_span_in_context(span))
        span.end()

    def sampled_out(body: Any) -> Any:
        def run() -> None:
            use_sampler(0.0)
            body()
            use_sampler(None)

        return run

    bodies = {
        "probe": probe,
        "probe-sampled-out": sampled_out(probe),
        "sdk-span": sdk_span,
        "sdk-span+inject": sdk_span_and_inject,
        "sdk-span-sampled-out": sampled_out(sdk_span),
    }
    for body in bodies.values():
        for _ in range(WARM_UP):
            body()
    if part.endswith("-sampled-out"):
        use_sampler(0.0)
        body = bodies[part.removesuffix("-sampled-out")]
    else:
        body = bodies[part]
    for _ in range(calls):
        body()


def count(
    tree: Path, part: str, calls: int, script: Path | None = None, env: dict[str, str] | None = None
) -> int:
    """Instructions of a child of ``script`` (default: this one) running ``part`` ``calls``
    times after its warm-up, with ``env`` added to the environment."""
    script = script or Path(__file__).resolve()
    with tempfile.TemporaryDirectory() as directory:
        out = Path(directory) / "callgrind.out"
        done = subprocess.run(
            [
                "valgrind",
                "--tool=callgrind",
                f"--callgrind-out-file={out}",
                sys.executable,
                str(script),
                "--child",
                str(tree),
                part,
                str(calls),
            ],
            check=False,
            capture_output=True,
            text=True,
            env={**os.environ, **(env or {})},
        )
        if done.returncode:
            sys.exit(f"{part} in {tree} failed:\n{done.stderr}")
        totals = re.search(r"^(?:summary|totals): (\d+)", out.read_text(), re.MULTILINE)
        assert totals is not None
        return int(totals.group(1))


def command_line(
    description: str,
    run_child: Callable[[Path, str, int], None],
    options: Callable[[argparse.ArgumentParser], None] | None = None,
) -> argparse.Namespace | None:
    """The arguments of a script that counts with :func:`count` (``--calls``, ``--baseline``,
    and what ``options`` adds), or ``None`` once ``run_child`` has run what
    ``--child TREE PART CALLS`` asks (the process :func:`count` starts under callgrind). Exits
    when valgrind is not on the path."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--baseline", type=Path, metavar="PATH")
    if options is not None:
        options(parser)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        tree, part, calls = args.child
        run_child(Path(tree).resolve(), part, int(calls))
        return None
    if shutil.which("valgrind") is None:
        parser.error("valgrind is not on the path")
    return args


def main() -> None:
    args = command_line(__doc__.splitlines()[0], child)
    if args is None:
        return
    rows: list[tuple[str, str]] = [("this tree", part) for part in PARTS]
    if args.baseline is not None:
        rows[1:1] = [("baseline", "probe")]
        rows[3:3] = [("baseline", "probe-sampled-out")]
    trees = {"this tree": ROOT, "baseline": args.baseline.resolve() if args.baseline else ROOT}
    names = {name for name, _ in rows}
    warm = {name: count(tree, "probe", 0) for name, tree in trees.items() if name in names}
    print(f"instructions per call (callgrind), {args.calls} calls after a warm-up")
    print(f"{'tree':<11}{'part':<20}{'instructions':>14}")
    for name, part in rows:
        per_call = (count(trees[name], part, args.calls) - warm[name]) / args.calls
        print(f"{name:<11}{part:<20}{per_call:>14,.0f}")


if __name__ == "__main__":
    main()
