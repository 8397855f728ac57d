"""Metrics and traces: optional integrations, enabled by settings and imported lazily.

The client builds one :class:`~django_rpc_audit.integrations.base.Instrumentation` from the
settings (:func:`build_instrumentation`; ``None`` when every integration is off, so a call
then pays for nothing) and asks it for a probe at the start of every call and ends the probe
when the call ends.

- :mod:`~django_rpc_audit.integrations.base`: that seam:
  :class:`~django_rpc_audit.integrations.base.Instrumentation`, the per-call
  :class:`~django_rpc_audit.integrations.base.CallProbe`, the bounded method labels
  (``_OTHER``) and the trace context added to the request message. Imports no optional
  package.
- :mod:`~django_rpc_audit.integrations.otel`: OpenTelemetry (extra ``[otel]``): a CLIENT span
  per call from the global tracer provider, W3C ``traceparent``/``tracestate`` on the wire,
  and the histogram ``rpc.client.call.duration`` through the metrics API.
- :mod:`~django_rpc_audit.integrations.prometheus`: Prometheus (extra ``[prometheus]``):
  call counters and durations by method, status and error type, the log pipeline's health
  (buffer depth, rows written, dropped and refused, write retries and latency; the ingest
  workers' rows, batches, claimed and dead-lettered entries, and the stream's lag), the
  ``/metrics`` view, multiprocess (gunicorn) support.
- ``grafana-dashboard.json``: an importable Grafana dashboard over the Prometheus metrics
  (:data:`GRAFANA_DASHBOARD` is its path).

Nothing here ever raises into a call: a failing tracer, exporter or metric is logged
(``django_rpc_audit.integrations`` logger) and the call goes on.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from django_rpc_audit.conf import DjangoCfgRPCConfig
    from django_rpc_audit.integrations.base import Instrumentation
    from django_rpc_audit.writers.base import WriterObserver
    from django_rpc_audit.writers.ingest import IngestObserver

logger = logging.getLogger(__name__)

#: The Grafana dashboard shipped with the package (import it in Grafana, pick a Prometheus).
GRAFANA_DASHBOARD = Path(__file__).with_name("grafana-dashboard.json")

#: The package each integration needs, by the setting that turns it on.
REQUIRED_PACKAGES = {
    "OTEL_TRACES": ("opentelemetry", "django-rpc-audit[otel]"),
    "OTEL_METRICS": ("opentelemetry", "django-rpc-audit[otel]"),
    "PROMETHEUS_METRICS": ("prometheus_client", "django-rpc-audit[prometheus]"),
}


def missing_packages(config: DjangoCfgRPCConfig) -> dict[str, tuple[str, str]]:
    """The integrations ``config`` turns on whose package is not installed, by setting."""
    wanted = {
        "OTEL_TRACES": config.otel_traces,
        "OTEL_METRICS": config.otel_metrics,
        "PROMETHEUS_METRICS": config.prometheus_metrics,
    }
    return {
        key: REQUIRED_PACKAGES[key]
        for key, on in wanted.items()
        if on and importlib.util.find_spec(REQUIRED_PACKAGES[key][0]) is None
    }


def build_instrumentation(config: DjangoCfgRPCConfig) -> Instrumentation | None:
    """The tracing and metrics of a client built from ``config``; ``None`` when all are off.

    Never raises: an integration whose package is missing (``manage.py check`` reports it as
    ``django_rpc_audit.E004``) or that cannot be set up is logged and left out, and calls go on
    without it.
    """
    if not (config.otel_traces or config.otel_metrics or config.prometheus_metrics):
        return None
    from django_rpc_audit.integrations.base import CallRecorder, CallTracer, Instrumentation

    missing = missing_packages(config)
    for key, (_, extra) in missing.items():
        logger.error("DJANGO_CFG_RPC[%r] is on but %s is not installed; it is off.", key, extra)
    tracer: CallTracer | None = None
    recorders: list[CallRecorder] = []
    try:
        if config.otel_traces and "OTEL_TRACES" not in missing:
            from django_rpc_audit.integrations.otel import OTelTracer

            tracer = OTelTracer(config)
        if config.otel_metrics and "OTEL_METRICS" not in missing:
            from django_rpc_audit.integrations.otel import OTelDurationRecorder

            recorders.append(OTelDurationRecorder(config))
        if config.prometheus_metrics and "PROMETHEUS_METRICS" not in missing:
            from django_rpc_audit.integrations.prometheus import PrometheusCallRecorder

            recorders.append(PrometheusCallRecorder())
    except Exception:
        logger.exception("Could not set up RPC call metrics or traces; calls go on without them.")
    if tracer is None and not recorders:
        return None
    return Instrumentation(tracer, recorders, max_methods=config.metrics_max_methods)


def build_writer_observer(config: DjangoCfgRPCConfig) -> WriterObserver | None:
    """What publishes the buffered writer's health: Prometheus when it is on, else nothing."""
    observer: WriterObserver | None = _prometheus_observer(config, "PipelineMetrics")
    return observer


def build_ingest_observer(config: DjangoCfgRPCConfig) -> IngestObserver | None:
    """What publishes an ingest worker's figures: Prometheus when it is on, else nothing."""
    observer: IngestObserver | None = _prometheus_observer(config, "IngestMetrics")
    return observer


def _prometheus_observer(config: DjangoCfgRPCConfig, name: str) -> Any:
    """A new ``integrations.prometheus.<name>`` when Prometheus is on and installed, else
    ``None``; never raises."""
    if not config.prometheus_metrics or "PROMETHEUS_METRICS" in missing_packages(config):
        return None
    try:
        from django_rpc_audit.integrations import prometheus

        return getattr(prometheus, name)()
    except Exception:
        logger.exception("Could not set up the RPC log pipeline's metrics (%s).", name)
        return None
