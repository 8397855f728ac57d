"""``manage.py rpc_logs_reap``: mark rows left pending by dead processes as timed out."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from django_rpc_audit.conf import get_config
from django_rpc_audit.management.arguments import checked, non_negative_number
from django_rpc_audit.models import RPCLog
from django_rpc_audit.querysets import OUTCOME_LOST


class Command(BaseCommand):
    help = (
        "Mark RPC log rows pending for longer than the call timeout plus REAP_MARGIN_SECONDS "
        f"as 'timeout' with error code '{OUTCOME_LOST}'."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--timeout",
            type=non_negative_number,
            default=None,
            help="Seconds a call may take (default: RPC_TIMEOUT); pass your longest per-call "
            "timeout if some calls use a longer one.",
        )
        parser.add_argument(
            "--dry-run", action="store_true", help="Count the stale rows; change none."
        )

    def handle(self, *args: Any, timeout: object, dry_run: bool, **options: Any) -> None:
        config = get_config()
        # Again: call_command() passes its keyword arguments without argparse's conversion.
        seconds = (
            config.rpc_timeout
            if timeout is None
            else checked(non_negative_number, timeout, "--timeout")
        )
        try:
            count = RPCLog.objects.reap(timeout=seconds, dry_run=dry_run)
        except ValueError as exc:
            raise CommandError(str(exc)) from exc
        verb = "Would mark" if dry_run else "Marked"
        self.stdout.write(
            f"{verb} {count} RPC log row(s) pending for over "
            f"{seconds + config.reap_margin_seconds:g} s as timed out."
        )
