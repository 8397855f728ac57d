"""``manage.py rpc_logs_ingest``: write the log stream's rows to the database, until SIGTERM."""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from django_rpc_audit.writers.ingest import IngestStats, IngestWorker


def positive_int(raw: str) -> int:
    value = int(raw)
    if value < 1:
        raise ValueError(raw)
    return value


def positive_number(raw: str) -> float:
    value = float(raw)
    if not value > 0:
        raise ValueError(raw)
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
            "--batch-size", type=positive_int, default=None, help="Default: INGEST_BATCH_SIZE."
        )
        parser.add_argument(
            "--claim-idle",
            type=positive_number,
            default=None,
            metavar="SECONDS",
            help="Default: INGEST_CLAIM_IDLE_SECONDS.",
        )
        parser.add_argument(
            "--max-deliveries",
            type=positive_int,
            default=None,
            help="Default: INGEST_MAX_DELIVERIES.",
        )
        parser.add_argument(
            "--stats-interval",
            type=positive_number,
            default=10.0,
            metavar="SECONDS",
            help="Seconds between the progress lines (rows, rate, lag). Default: 10.",
        )

    def handle(
        self,
        *args: Any,
        consumer: str | None,
        batch_size: int | None,
        claim_idle: float | None,
        max_deliveries: int | None,
        stats_interval: float,
        **options: Any,
    ) -> None:
        worker = IngestWorker.from_config(
            consumer=consumer,
            batch_size=batch_size,
            claim_idle_seconds=claim_idle,
            max_deliveries=max_deliveries,
            stats_interval=stats_interval,
        )
        self._install_stop(worker)
        self.stdout.write(
            f"Ingesting {worker.stream} as {worker.consumer} in group {worker.group} "
            f"(batches of {worker.batch_size}); dead letters go to {worker.dead_letter_stream}."
        )
        worker.run(on_stats=self._report)
        stats = worker.stats()
        self.stdout.write(
            f"Stopped: {stats.rows} row(s) written in {stats.batches} batch(es), "
            f"{stats.dead_lettered} dead-lettered, {stats.trimmed} trimmed unread."
        )

    def _report(self, stats: IngestStats) -> None:
        lag = "?" if stats.lag is None else str(stats.lag)
        pending = "?" if stats.pending is None else str(stats.pending)
        self.stdout.write(
            f"rows={stats.rows} rate={stats.rows_per_second:.0f}/s lag={lag} pending={pending} "
            f"claimed={stats.claimed} dead={stats.dead_lettered} trimmed={stats.trimmed} "
            f"retries={stats.retries}"
        )
        self.stdout.flush()

    @staticmethod
    def _install_stop(worker: IngestWorker) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # call_command() from another thread: the caller stops the worker

        def stop(signum: int, frame: FrameType | None) -> None:
            worker.stop()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
