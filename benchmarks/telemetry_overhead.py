"""What tracing and metrics cost the caller: ``call()`` and ``acall()`` over real Redis with
each integration on, against all of them off, interleaved in rounds in one process.

A responder process answers the django-ipc protocol (``XREAD`` the stream, ``LPUSH`` the reply);
the rows go through the default buffered writer into the database (PostgreSQL with
``DATABASE_URL``, a SQLite file otherwise), as in production. The OpenTelemetry SDK is set up
as a project would: a ``BatchSpanProcessor`` and a ``PeriodicExportingMetricReader`` (every
second) whose exporters take the data and drop it, on their own threads.

Variants: ``off`` (every integration off: the caller's path as before them), ``sdk-span``
(every integration off, each call inside a bare SDK span: the floor of any tracing),
``traces`` (``OTEL_TRACES``, every trace sampled), ``traces-10%`` and ``traces-sampled-out``
(the SDK's sampler ``ParentBased(TraceIdRatioBased(0.1))``, and ``(0)``: no trace kept),
``otel-metrics`` (``OTEL_METRICS``), ``prometheus`` (``PROMETHEUS_METRICS``), ``all`` (the
three), ``all-10%`` (the three, traces sampled at 10 %), ``traces-10%+prom`` (traces sampled
at 10 % and Prometheus). Per variant: median and p99 µs per call, the
ratio to ``off`` (the median over rounds of the ratio within each round, so that the machine's
drift between rounds cancels out), and CPU µs per call of the calling thread (the caller's own
cost) and of the whole process (the writer's and the exporters' threads too).

    createdb -h 127.0.0.1 -U postgres rpc_bench
    DATABASE_URL=postgres://postgres@127.0.0.1:5432/rpc_bench .venv/bin/python \\
        benchmarks/telemetry_overhead.py --redis redis://127.0.0.1:6379/9

``--multiprocess`` runs prometheus-client in multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``
in a temporary directory), as under gunicorn. ``--baseline PATH`` instead compares the ``off``
path of this tree with the tree at PATH (a checkout of an earlier commit): child processes,
alternately of each tree, each time ``--calls`` calls with no integration, over the same Redis
with logging on (with ``--local``: the in-process transport, logging off, the client's path
alone); the ratios within each round and their median.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from buffered_writer import (  # noqa: E402
    configure,
    delete_stream,
    setup_django,
    wait_for_responder,
)
from call_overhead import responder  # noqa: E402

ALL = {"OTEL_TRACES": True, "OTEL_METRICS": True, "PROMETHEUS_METRICS": True}
VARIANTS: dict[str, dict[str, bool]] = {
    "off": {},
    "sdk-span": {},
    "traces": {"OTEL_TRACES": True},
    "traces-10%": {"OTEL_TRACES": True},
    "traces-sampled-out": {"OTEL_TRACES": True},
    "otel-metrics": {"OTEL_METRICS": True},
    "prometheus": {"PROMETHEUS_METRICS": True},
    "all": ALL,
    "all-10%": ALL,
    "traces-10%+prom": {"OTEL_TRACES": True, "PROMETHEUS_METRICS": True},
}
KEYS = ("OTEL_TRACES", "OTEL_METRICS", "PROMETHEUS_METRICS")
#: Variants whose traces the SDK samples at this ratio (``ParentBased(TraceIdRatioBased)``, as
#: ``OTEL_TRACES_SAMPLER=parentbased_traceidratio``); the others keep the SDK's default
#: (``ParentBased(ALWAYS_ON)``: every trace).
SAMPLING = {"traces-10%": 0.1, "traces-sampled-out": 0.0, "all-10%": 0.1, "traces-10%+prom": 0.1}
#: The SDK's own floor: every integration off, each call inside a bare SDK span (started with
#: the same kind and attributes as ours, ended after the call; no context made current, no
#: trace context on the wire), which any instrumentation of a call pays at least.
BARE_SPAN = "sdk-span"
#: The attributes of our spans, for the bare span.
SPAN_ATTRIBUTES = {
    "rpc.system.name": "django_ipc",
    "rpc.method": "bench.echo",
    "server.address": "127.0.0.1",
    "server.port": 6379,
}


def setup_otel_sdk() -> dict[str, int]:
    """Global providers as a project sets them up; exporters that count and drop."""
    from opentelemetry import metrics, trace
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import (
        MetricExporter,
        MetricExportResult,
        PeriodicExportingMetricReader,
    )
    from opentelemetry.sdk.trace import TracerProvider, sampling
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

    exported = {"spans": 0, "metric_exports": 0}

    class DropSpans(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            exported["spans"] += len(spans)
            return SpanExportResult.SUCCESS

    class DropMetrics(MetricExporter):
        def export(self, metrics_data: Any, timeout_millis: float = 0, **kwargs: Any) -> Any:
            exported["metric_exports"] += 1
            return MetricExportResult.SUCCESS

        def force_flush(self, timeout_millis: float = 0) -> bool:
            return True

        def shutdown(self, timeout_millis: float = 0, **kwargs: Any) -> None:
            pass

    class VariantSampler(sampling.Sampler):
        """Samples as the current variant's sampler (one more Python call per span, in every
        variant that makes spans)."""

        def should_sample(self, *args: Any, **kwargs: Any) -> Any:
            return VARIANT_SAMPLER["sampler"].should_sample(*args, **kwargs)

        def get_description(self) -> str:
            return f"VariantSampler{{{VARIANT_SAMPLER['sampler'].get_description()}}}"

    use_sampler(None)
    provider = TracerProvider(sampler=VariantSampler())
    provider.add_span_processor(BatchSpanProcessor(DropSpans()))
    trace.set_tracer_provider(provider)
    reader = PeriodicExportingMetricReader(DropMetrics(), export_interval_millis=1000)
    metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
    return exported


@dataclass
class Round:
    """One variant's calls in one round: µs per call, and CPU µs per call of the calling thread
    and of the whole process (writer and exporter threads included)."""

    samples: list[float]
    thread_cpu: float
    process_cpu: float


#: The sampler of the global tracer provider: it samples as the variant's sampler does (the
#: SDK keeps one tracer per scope, made with the provider's sampler of that time).
VARIANT_SAMPLER: dict[str, Any] = {}


def use_sampler(ratio: float | None) -> None:
    """Sample traces with ``ParentBased(TraceIdRatioBased(ratio))`` from now on, or as the
    SDK's default (``ParentBased(ALWAYS_ON)``) with ``None``."""
    from opentelemetry.sdk.trace import sampling

    VARIANT_SAMPLER["sampler"] = (
        sampling.DEFAULT_ON
        if ratio is None
        else sampling.ParentBased(sampling.TraceIdRatioBased(ratio))
    )


def bare_span_tracer(variant: str) -> Any:
    """The tracer of the bare SDK span around each call, for :data:`BARE_SPAN`."""
    if variant != BARE_SPAN:
        return None
    from opentelemetry import trace

    return trace.get_tracer("benchmark.sdk_span")


def timed_calls(calls: int, variant: str = "off") -> Round:
    from opentelemetry.trace import SpanKind

    from django_rpc_audit import get_rpc_client

    client = get_rpc_client()
    tracer = bare_span_tracer(variant)
    samples = []
    thread, process = time.thread_time(), time.process_time()
    for n in range(calls):
        started = time.perf_counter()
        if tracer is None:
            client.call("bench.echo", {"n": n, "who": "benchmark"})
        else:
            span = tracer.start_span("bench.echo", kind=SpanKind.CLIENT, attributes=SPAN_ATTRIBUTES)
            client.call("bench.echo", {"n": n, "who": "benchmark"})
            span.end()
        samples.append((time.perf_counter() - started) * 1e6)
    thread, process = time.thread_time() - thread, time.process_time() - process
    return Round(samples, thread / calls * 1e6, process / calls * 1e6)


async def timed_acalls(calls: int, variant: str = "off") -> Round:
    from opentelemetry.trace import SpanKind

    from django_rpc_audit import get_rpc_client

    client = get_rpc_client()
    tracer = bare_span_tracer(variant)
    samples = []
    thread, process = time.thread_time(), time.process_time()
    for n in range(calls):
        started = time.perf_counter()
        if tracer is None:
            await client.acall("bench.echo", {"n": n, "who": "benchmark"})
        else:
            span = tracer.start_span("bench.echo", kind=SpanKind.CLIENT, attributes=SPAN_ATTRIBUTES)
            await client.acall("bench.echo", {"n": n, "who": "benchmark"})
            span.end()
        samples.append((time.perf_counter() - started) * 1e6)
    thread, process = time.thread_time() - thread, time.process_time() - process
    return Round(samples, thread / calls * 1e6, process / calls * 1e6)


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


def round_ratio(rounds: list[Round], base: list[Round], figure: Any) -> float:
    """The median over rounds of this variant's figure over ``off``'s in the same round: the
    machine's drift between rounds cancels out."""
    return statistics.median(figure(r) / figure(b) for r, b in zip(rounds, base, strict=True))


def print_table(title: str, results: dict[str, list[Round]]) -> None:
    base = results["off"]
    base_median = statistics.median(s for r in base for s in r.samples)
    print(f"\n{title}")
    print(
        f"{'variant':<20}{'median µs':>11}{'p99 µs':>10}{'overhead µs':>13}{'ratio':>8}"
        f"{'caller CPU µs':>15}{'ratio':>8}{'process CPU µs':>16}{'ratio':>8}"
    )
    for variant, rounds in results.items():
        samples = [s for r in rounds for s in r.samples]
        median = statistics.median(samples)
        print(
            f"{variant:<20}{median:>11.1f}{percentile(samples, 0.99):>10.1f}"
            f"{median - base_median:>13.1f}"
            f"{round_ratio(rounds, base, lambda r: statistics.median(r.samples)):>8.3f}"
            f"{statistics.median(r.thread_cpu for r in rounds):>15.1f}"
            f"{round_ratio(rounds, base, lambda r: r.thread_cpu):>8.3f}"
            f"{statistics.median(r.process_cpu for r in rounds):>16.1f}"
            f"{round_ratio(rounds, base, lambda r: r.process_cpu):>8.3f}"
        )


def use(variant: str, **settings: Any) -> None:
    """Switch to ``variant``: its settings (the client is made again) and its sampler."""
    use_sampler(SAMPLING.get(variant))
    configure(**settings, **{key: VARIANTS[variant].get(key, False) for key in KEYS})


def measure(calls: int, rounds: int, variants: list[str]) -> None:
    from django_rpc_audit.writers import flush

    results: dict[str, list[Round]] = {v: [] for v in variants}
    async_variants = [
        v for v in ("off", BARE_SPAN, "all", "all-10%", "traces-10%+prom") if v in variants
    ]
    async_results: dict[str, list[Round]] = {v: [] for v in async_variants}

    def use_logging(variant: str) -> None:
        use(variant, ENABLE_LOGGING=True, WRITE_MODE="buffered")

    for variant in variants:  # warm-up: connections, caches, instruments, threads
        use_logging(variant)
        timed_calls(200, variant)
        asyncio.run(timed_acalls(50, variant))
    for _round in range(rounds):
        for variant in variants:
            use_logging(variant)
            results[variant].append(timed_calls(calls, variant))
            flush()  # the next variant does not pay for this one's rows
        for variant in async_variants:
            use_logging(variant)
            async_results[variant].append(asyncio.run(timed_acalls(calls, variant)))
            flush()
    print_table(f"call() over Redis, {rounds} rounds x {calls} calls per variant", results)
    print_table(f"acall() over Redis, {rounds} rounds x {calls} calls", async_results)


def measure_parts(repeat: int = 5000) -> None:
    """CPU of the calling thread for one call's share of each integration alone: the probe
    started and finished (span, trace context added to the message, metrics), no transport."""
    import json as json_module

    from django_rpc_audit import get_rpc_client
    from django_rpc_audit.transports import RPCRequest

    message = {"type": "rpc", "method": "bench.echo", "params": {"n": 1, "who": "benchmark"}}
    request = RPCRequest(
        "bench.echo",
        message["params"],
        str(uuid.uuid4()),
        "list:response:x",
        5.0,
        json_module.dumps(message),
    )
    from opentelemetry import propagate, trace
    from opentelemetry.trace import SpanKind

    def cpu(body: Any) -> float:
        for _ in range(1000):
            body()
        figures = []
        for _ in range(7):
            started = time.thread_time()
            for _ in range(repeat):
                body()
            figures.append((time.thread_time() - started) / repeat * 1e6)
        return statistics.median(figures)

    print(f"\none call's share alone (probe started and finished), {repeat} times x 7")
    print(f"{'variant':<20}{'caller CPU µs':>15}")
    for variant in (
        "traces",
        "traces-sampled-out",
        "otel-metrics",
        "prometheus",
        "all",
        "all-10%",
    ):
        use(variant)
        instrumentation = get_rpc_client().instrumentation
        assert instrumentation is not None

        def probe(instrumentation: Any = instrumentation) -> None:
            instrumentation.start(request).finish("success", None, None, 1.0)

        print(f"{variant:<20}{cpu(probe):>15.1f}")

    # The SDK's own part, the same way: a bare span (the floor), and with the global
    # propagator's inject() through its generic path (what the tracer did before it wrote the
    # default propagator's fields itself).
    use("traces")
    tracer = trace.get_tracer("benchmark.sdk_span")

    def bare_span() -> None:
        tracer.start_span("bench.echo", kind=SpanKind.CLIENT, attributes=SPAN_ATTRIBUTES).end()

    def bare_span_and_inject() -> None:
        span = tracer.start_span("bench.echo", kind=SpanKind.CLIENT, attributes=SPAN_ATTRIBUTES)
        propagate.inject({}, context=trace.set_span_in_context(span))
        span.end()

    print(f"{'SDK span alone':<20}{cpu(bare_span):>15.1f}")
    print(f"{'+ generic inject()':<20}{cpu(bare_span_and_inject):>15.1f}")
    use("off")


def with_responder(redis_url: str, stream: str, body: Any) -> None:
    stop = multiprocessing.get_context("fork").Event()
    answering = multiprocessing.get_context("fork").Process(
        target=responder, args=(redis_url, stream, stop), daemon=True
    )
    answering.start()
    try:
        wait_for_responder()
        body()
    finally:
        stop.set()
        answering.join(5)
        delete_stream(redis_url, stream)


def child_off(tree: Path, redis_url: str, calls: int, local: bool) -> None:
    """One baseline child: ``calls`` timed calls of the package in ``tree`` with no
    integration; over Redis with logging on (the buffered writer), or with ``local`` over the
    in-process transport with logging off (the client's own path alone, little noise)."""
    # Before anything imports the package: the tree's copy, not this script's.
    sys.path.insert(0, str(tree))
    stream = f"bench:{uuid.uuid4().hex}"
    setup_django(None, redis_url, stream)
    import django_rpc_audit

    assert Path(django_rpc_audit.__file__).is_relative_to(tree), django_rpc_audit.__file__

    def body() -> None:
        from django_rpc_audit.writers import flush

        timed_calls(200)
        flush()
        timed = timed_calls(calls)
        flush()
        print(json.dumps({"median": statistics.median(timed.samples), "cpu": timed.thread_cpu}))

    if local:
        from django_rpc_audit.transports import register_local_handler

        register_local_handler("bench.echo", lambda params: {"echo": params})
        configure(TRANSPORT="local", ENABLE_LOGGING=False)
        body()
    else:
        configure(ENABLE_LOGGING=True)
        with_responder(redis_url, stream, body)


def compare_trees(baseline: Path, redis_url: str, calls: int, rounds: int, local: bool) -> None:
    trees = {"this tree": ROOT, "baseline": baseline.resolve()}
    medians: dict[str, list[float]] = {name: [] for name in trees}
    cpus: dict[str, list[float]] = {name: [] for name in trees}
    for _round in range(rounds):
        for name, tree in trees.items():
            env = {key: value for key, value in os.environ.items() if key != "DATABASE_URL"}
            output = subprocess.run(
                [
                    sys.executable,
                    str(Path(__file__).resolve()),
                    "--child-off",
                    str(tree),
                    "--redis",
                    redis_url,
                    "--calls",
                    str(calls),
                    *(["--local"] if local else []),
                ],
                env=env,
                cwd=tree,
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            figures = json.loads(output.strip().splitlines()[-1])
            medians[name].append(figures["median"])
            cpus[name].append(figures["cpu"])
    print(
        f"\nintegrations off, this tree vs {baseline}: {rounds} rounds of one child process per "
        f"tree, alternating, {calls} calls each "
        f"({'local transport, logging off' if local else 'Redis, buffered writer, SQLite file'})"
    )
    print(
        f"{'tree':<12}{'median µs':>11}{'ratio':>8}{'caller CPU µs':>15}{'ratio':>8}"
        f"{'CPU ratio range':>19}"
    )
    for name in trees:
        # Ratios within each round (the two children ran one after the other), then their
        # median: the machine's drift between rounds cancels out.
        ratios = [a / b for a, b in zip(medians[name], medians["baseline"], strict=True)]
        cpu_ratios = sorted(a / b for a, b in zip(cpus[name], cpus["baseline"], strict=True))
        print(
            f"{name:<12}{statistics.median(medians[name]):>11.1f}"
            f"{statistics.median(ratios):>8.3f}{statistics.median(cpus[name]):>15.1f}"
            f"{statistics.median(cpu_ratios):>8.3f}"
            f"{f'{cpu_ratios[0]:.3f}-{cpu_ratios[-1]:.3f}':>19}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis", metavar="URL", default="redis://127.0.0.1:6379/9")
    parser.add_argument("--calls", type=int, default=250, help="calls per variant per round")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--multiprocess", action="store_true")
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help="comma-separated; off is always measured"
    )
    parser.add_argument("--baseline", type=Path, metavar="PATH")
    parser.add_argument(
        "--local",
        action="store_true",
        help="with --baseline: the in-process transport, logging off (the client's path alone)",
    )
    parser.add_argument("--child-off", type=Path, metavar="TREE", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_off is not None:
        child_off(args.child_off, args.redis, args.calls, args.local)
        return
    if args.baseline is not None:
        compare_trees(args.baseline, args.redis, args.calls, args.rounds, args.local)
        return
    if args.multiprocess:
        # Before prometheus-client is imported: it picks its value class at import.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="bench-prometheus-")
    stream = f"bench:{uuid.uuid4().hex}"
    database = setup_django(os.environ.get("DATABASE_URL"), args.redis, stream)
    exported = setup_otel_sdk()
    print(
        f"database: {database}; Redis {args.redis} with a responder process; "
        f"python {sys.version.split()[0]}; {os.cpu_count()} CPUs; prometheus-client "
        f"{'multiprocess' if args.multiprocess else 'single-process'} mode"
    )
    variants = ["off", *(v for v in args.variants.split(",") if v != "off")]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; known: {', '.join(VARIANTS)}")
    print("load average at the start: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    with_responder(args.redis, stream, lambda: measure(args.calls, args.rounds, variants))
    measure_parts()
    print("\nload average at the end: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    from opentelemetry import metrics, trace

    trace.get_tracer_provider().force_flush()  # type: ignore[attr-defined]
    metrics.get_meter_provider().force_flush()  # type: ignore[attr-defined]
    print(f"\nexported: {exported['spans']} spans, {exported['metric_exports']} metric exports")


if __name__ == "__main__":
    main()
