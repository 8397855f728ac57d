"""``manage.py rpc_logs_cleanup``: delete old ``RPCLog`` rows in batches."""

from __future__ import annotations

import math
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from django_rpc_audit.conf import get_config
from django_rpc_audit.management.arguments import (
    checked,
    non_negative_number,
    positive_integer,
    shown,
)
from django_rpc_audit.models import RPCLog


class Command(BaseCommand):
    help = (
        "Delete RPC log rows older than --days days (default: RETENTION_DAYS), in batches. "
        "Rows still pending within the call timeout are kept. Each row is counted in the hourly "
        "rollups as it is deleted (usage reports do not change); rollups older than "
        "ROLLUP_RETENTION_DAYS are deleted too."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--days",
            type=non_negative_number,
            default=None,
            help="Keep this many days of logs (default: the RETENTION_DAYS setting).",
        )
        parser.add_argument(
            "--batch-size",
            type=positive_integer,
            default=5_000,
            help="Rows deleted per transaction (default: 5000).",
        )
        parser.add_argument(
            "--dry-run", action="store_true", help="Count the rows that would go; delete none."
        )

    def handle(
        self, *args: Any, days: object, batch_size: object, dry_run: bool, **options: Any
    ) -> None:
        # Again: call_command() passes its keyword arguments without argparse's conversion.
        kept = (
            get_config().retention_days
            if days is None
            else checked(non_negative_number, days, "--days")
        )
        size = checked(positive_integer, batch_size, "--batch-size")
        try:
            count = RPCLog.objects.prune(days=kept, batch_size=size, dry_run=dry_run)
        except ValueError as exc:
            raise CommandError(str(exc)) from exc
        verb = "Would delete" if dry_run else "Deleted"
        self.stdout.write(f"{verb} {count} RPC log row(s) older than {shown(kept)} day(s).")
        rollup_days = get_config().rollup_retention_days
        if rollup_days:
            from django_rpc_audit.rollups.maintain import prune_rollups

            # Never the rollups of rows this run keeps.
            rollup_days = max(rollup_days, math.ceil(kept))
            rollups = prune_rollups(rollup_days, batch_size=size, dry_run=dry_run)
            if rollups:
                self.stdout.write(
                    f"{verb} {rollups} rollup row(s) older than {rollup_days} day(s) "
                    "(ROLLUP_RETENTION_DAYS)."
                )
        # The alerts' outbox keeps the same days (its pending rows stay until delivered).
        from django_rpc_audit.alerts.delivery import prune_deliveries

        alerts = prune_deliveries(kept, batch_size=size, dry_run=dry_run)
        if alerts or get_config().webhooks:
            self.stdout.write(
                f"{verb} {alerts} webhook delivery row(s) older than {shown(kept)} day(s)."
            )
