"""``manage.py rpc_logs_stats``: the per-method statistics table, in the terminal."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from django_rpc_audit.management.arguments import checked, positive_number, shown
from django_rpc_audit.models import RPCLog

COLUMNS = (
    ("method", "Method"),
    ("total_calls", "Calls"),
    ("success_count", "OK"),
    ("failed_count", "Failed"),
    ("timeout_count", "Timeout"),
    ("rate_limited_count", "Limited"),
    ("avg_duration_ms", "Avg ms"),
    ("p95_duration_ms", "p95 ms"),
)


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


class Command(BaseCommand):
    help = "Print call counts by outcome and durations per RPC method for the last --hours hours."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--hours", type=positive_number, default=24.0, help="Window (default: 24)."
        )
        parser.add_argument("--method", default=None, help="Only this method (exact name).")

    def handle(self, *args: Any, hours: object, method: str | None, **options: Any) -> None:
        # Again: call_command() passes its keyword arguments without argparse's conversion.
        window = checked(positive_number, hours, "--hours")
        try:
            logs = RPCLog.objects.recent(hours=window)
        except ValueError as exc:
            raise CommandError(str(exc)) from exc
        if method is not None:
            if not method:
                raise CommandError("--method must not be empty.")
            logs = logs.for_method(method)
        stats = logs.stats_by_method()
        if not stats:
            self.stdout.write(f"No RPC calls in the last {shown(window)} hour(s).")
            return
        rows = [[title for _key, title in COLUMNS]]
        rows += [[_cell(item[key]) for key, _title in COLUMNS] for item in stats]  # type: ignore[literal-required]
        widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
        for number, row in enumerate(rows):
            cells = [row[0].ljust(widths[0])] + [
                cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True)
            ]
            self.stdout.write("  ".join(cells).rstrip())
            if number == 0:
                self.stdout.write("  ".join("-" * width for width in widths))
        total = sum(item["total_calls"] for item in stats)
        self.stdout.write(
            f"{total} call(s) in the last {shown(window)} hour(s)"
            + (
                " (estimated: sampled rows are scaled up)."
                if logs.filter(sample_rate__lt=1).exists()
                else "."
            )
        )
