"""``manage.py rpc_webhooks_deliver``: deliver the queued webhook alerts (a worker, or once)."""

from __future__ import annotations

import threading
import time
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from django_rpc_audit.alerts.delivery import DeliveryReport, deliver_due
from django_rpc_audit.alerts.worker import run_loop
from django_rpc_audit.conf import get_config
from django_rpc_audit.management.arguments import checked, positive_seconds
from django_rpc_audit.management.stopping import stop_on_signals


class Command(BaseCommand):
    help = (
        "Deliver the webhook alerts in the outbox: retries, digests, and alerts left by "
        "processes that died. Runs until stopped (SIGTERM/SIGINT), or one pass with --once."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--once", action="store_true", help="Deliver what is due now, then exit."
        )
        parser.add_argument(
            "--max-seconds",
            type=positive_seconds,
            default=None,
            help="Stop the loop after this many seconds (default: run until stopped).",
        )

    def handle(self, *args: Any, once: bool, max_seconds: object, **options: Any) -> None:
        # Again: call_command() passes its keyword arguments without argparse's conversion.
        limit = (
            None if max_seconds is None else checked(positive_seconds, max_seconds, "--max-seconds")
        )
        if not get_config().webhooks:
            raise CommandError("No webhook endpoints: DJANGO_CFG_RPC['WEBHOOKS'] is empty.")
        total = DeliveryReport()
        if once:
            while True:
                report = deliver_due()
                total += report
                if not report.claimed:
                    break
        else:
            stop = threading.Event()
            wake = threading.Event()

            def finish(*_: object) -> None:
                stop.set()
                wake.set()

            if limit is not None:
                timer = threading.Timer(limit, finish)
                timer.daemon = True
                timer.start()

            def on_pass(report: object) -> None:
                nonlocal total
                assert isinstance(report, DeliveryReport)
                total += report
                if report.claimed:
                    self.stdout.write(_summary(report), ending="\n")
                    self.stdout.flush()

            started = time.monotonic()
            with stop_on_signals(finish):
                run_loop(stop, wake, on_pass=on_pass)
            self.stdout.write(f"Stopped after {time.monotonic() - started:.0f} s.")
        self.stdout.write(_summary(total))


def _summary(report: DeliveryReport) -> str:
    return (
        f"Delivered {report.delivered}, retrying {report.retrying}, failed {report.failed}, "
        f"grouped {report.grouped}, skipped {report.skipped}, cancelled {report.cancelled} "
        f"(claimed {report.claimed})."
    )
