"""``manage.py rpc_logs_ingest``: write the log stream's rows to the database, until SIGTERM."""

from __future__ import annotations

import argparse
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from django_rpc_audit.conf import get_config
from django_rpc_audit.management.arguments import checked, positive_integer, positive_seconds
from django_rpc_audit.management.stopping import stop_on_signals
from django_rpc_audit.writers.ingest import IngestStats, IngestWorker

_MAX_PORT = 65_535


def port_number(raw: object) -> int:
    """A TCP port, 1 to 65535 (``argparse`` ``type``)."""
    value = positive_integer(raw)
    if value > _MAX_PORT:
        raise argparse.ArgumentTypeError(f"{raw!r} is not a port (1 to {_MAX_PORT})")
    return value


class Command(BaseCommand):
    help = (
        "Ingest worker: read the RPC log stream (WRITE_MODE 'stream') in its consumer group and "
        "write the rows to the database. Run one or more; SIGTERM or Ctrl-C finishes the batch "
        "in hand and exits."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--consumer", default=None, help="Consumer name in the group (default: host-pid)."
        )
        parser.add_argument(
            "--batch-size", type=positive_integer, default=None, help="Default: INGEST_BATCH_SIZE."
        )
        parser.add_argument(
            "--claim-idle",
            type=positive_seconds,
            default=None,
            metavar="SECONDS",
            help="Default: INGEST_CLAIM_IDLE_SECONDS.",
        )
        parser.add_argument(
            "--max-deliveries",
            type=positive_integer,
            default=None,
            help="Default: INGEST_MAX_DELIVERIES.",
        )
        parser.add_argument(
            "--stats-interval",
            type=positive_seconds,
            default=10.0,
            metavar="SECONDS",
            help="Seconds between the progress lines (rows, rate, lag). Default: 10.",
        )
        parser.add_argument(
            "--metrics-port",
            type=port_number,
            default=None,
            metavar="PORT",
            help="Serve the worker's Prometheus metrics on this port (needs PROMETHEUS_METRICS).",
        )
        parser.add_argument(
            "--metrics-address",
            default="127.0.0.1",
            metavar="ADDRESS",
            help="Address the metrics are served on. Default: 127.0.0.1.",
        )

    def handle(
        self,
        *args: Any,
        consumer: str | None,
        batch_size: int | None,
        claim_idle: float | None,
        max_deliveries: int | None,
        stats_interval: float,
        metrics_port: int | None,
        metrics_address: str,
        **options: Any,
    ) -> None:
        # call_command() skips argparse's conversions: every number is checked here again.
        if batch_size is not None:
            batch_size = checked(positive_integer, batch_size, "--batch-size")
        if claim_idle is not None:
            claim_idle = checked(positive_seconds, claim_idle, "--claim-idle")
        if max_deliveries is not None:
            max_deliveries = checked(positive_integer, max_deliveries, "--max-deliveries")
        stats_interval = checked(positive_seconds, stats_interval, "--stats-interval")
        if metrics_port is not None:
            metrics_port = checked(port_number, metrics_port, "--metrics-port")
        server = None
        if metrics_port is not None:
            server = self._serve_metrics(metrics_port, metrics_address)
        worker = IngestWorker.from_config(
            consumer=consumer,
            batch_size=batch_size,
            claim_idle_seconds=claim_idle,
            max_deliveries=max_deliveries,
            stats_interval=stats_interval,
        )
        self.stdout.write(
            f"Ingesting {worker.stream} as {worker.consumer} in group {worker.group} "
            f"(batches of {worker.batch_size}); dead letters go to {worker.dead_letter_stream}."
        )
        try:
            with stop_on_signals(worker.stop):
                worker.run(on_stats=self._report)
        finally:
            if server is not None:
                server.shutdown()
                server.server_close()
        stats = worker.stats()
        self.stdout.write(
            f"Stopped: {stats.rows} row(s) written in {stats.batches} batch(es), "
            f"{stats.acked} entries acknowledged, {stats.dead_lettered} dead-lettered, "
            f"{stats.trimmed} trimmed unread."
        )

    def _serve_metrics(self, port: int, address: str) -> Any:
        from django_rpc_audit.integrations import missing_packages

        config = get_config()
        if not config.prometheus_metrics:
            raise CommandError("--metrics-port needs DJANGO_CFG_RPC['PROMETHEUS_METRICS'] = True.")
        missing = missing_packages(config).get("PROMETHEUS_METRICS")
        if missing is not None:
            raise CommandError(f"--metrics-port needs {missing[1]}.")
        from django_rpc_audit.integrations.prometheus import serve_metrics

        try:
            server = serve_metrics(port, address)
        except OSError as exc:
            raise CommandError(f"Cannot serve metrics on {address}:{port}: {exc}") from exc
        self.stdout.write(f"Metrics on http://{address}:{port}/metrics")
        return server

    def _report(self, stats: IngestStats) -> None:
        lag = "?" if stats.lag is None else str(stats.lag)
        pending = "?" if stats.pending is None else str(stats.pending)
        self.stdout.write(
            f"rows={stats.rows} rate={stats.rows_per_second:.0f}/s lag={lag} pending={pending} "
            f"claimed={stats.claimed} dead={stats.dead_lettered} trimmed={stats.trimmed} "
            f"retries={stats.retries}"
        )
        self.stdout.flush()
