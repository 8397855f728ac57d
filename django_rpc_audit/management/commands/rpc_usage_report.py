"""``manage.py rpc_usage_report``: a month's usage (calls and costs) per user and method."""

from __future__ import annotations

import json
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from django_rpc_audit.usage import cloud_events, month_range, to_csv, total, usage

FORMATS = ("table", "csv", "cloudevents")
DIMENSIONS = ("user", "method")
PERIODS = ("day", "month")


class Command(BaseCommand):
    help = (
        "Print a month's usage from the rollups: calls, billed calls and cost per user and "
        "method (run rpc_rollup first for the latest hours)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--month", required=True, help="The month, YYYY-MM (UTC).")
        parser.add_argument(
            "--format",
            choices=FORMATS,
            default="table",
            help="table (default), csv, or cloudevents: one CloudEvents JSON line per closed "
            "day, user and method (--by, --per, --method, --billed-only do not apply).",
        )
        parser.add_argument(
            "--source",
            default="django-rpc-audit",
            help="The CloudEvents source (default: django-rpc-audit).",
        )
        parser.add_argument(
            "--by",
            default="user,method",
            help="Break down by user, method or both (default: user,method).",
        )
        parser.add_argument(
            "--per", choices=PERIODS, default=None, help="Also one line per day (or month)."
        )
        parser.add_argument("--method", default=None, help="Only this method (exact name).")
        parser.add_argument(
            "--billed-only", action="store_true", help="Only the lines with a cost."
        )

    def handle(
        self,
        *args: Any,
        month: str,
        format: str,
        by: str,
        per: str | None,
        method: str | None,
        billed_only: bool,
        source: str = "django-rpc-audit",
        **options: Any,
    ) -> None:
        # Again: call_command() passes its keyword arguments without argparse's checks.
        if format not in FORMATS:
            raise CommandError(f"--format: one of {', '.join(FORMATS)}, not {format!r}.")
        if per not in (None, *PERIODS):
            raise CommandError(f"--per: one of {', '.join(PERIODS)}, not {per!r}.")
        dimensions = tuple(part.strip() for part in str(by).split(",") if part.strip())
        if not dimensions or any(part not in DIMENSIONS for part in dimensions):
            raise CommandError(f"--by: user, method or user,method, not {by!r}.")
        if method is not None and not method:
            raise CommandError("--method must not be empty.")
        try:
            start, end = month_range(str(month))
        except ValueError as exc:
            raise CommandError(f"--month: {exc}") from None
        if format == "cloudevents":
            if not source:
                raise CommandError("--source must not be empty.")
            for event in cloud_events(start, end, source=source):
                self.stdout.write(json.dumps(event, separators=(",", ":")))
            return
        lines = usage(
            start,
            end,
            by=dimensions,  # type: ignore[arg-type]
            period=per,  # type: ignore[arg-type]
            method=method,
            billed_only=billed_only,
        )
        if format == "csv":
            to_csv(lines, self.stdout)
            return
        self._table(lines, dimensions, per, f"{start:%Y-%m}")

    def _table(
        self, lines: list[Any], dimensions: tuple[str, ...], per: str | None, month: str
    ) -> None:
        if not lines:
            self.stdout.write(f"No usage in {month} (as of the last rpc_rollup run).")
            return
        columns: list[tuple[str, Any]] = []
        if per:
            columns.append(("Period", lambda line: line.period.isoformat()))
        if "user" in dimensions:
            columns.append(("User", lambda line: line.username or "(anonymous)"))
        if "method" in dimensions:
            columns.append(("Method", lambda line: line.method))
        numbers: list[tuple[str, Any]] = [
            ("Calls", lambda line: f"{line.calls:,}"),
            ("Failed", lambda line: f"{line.failed_calls:,}"),
            ("Billed", lambda line: f"{line.billed_calls:,}"),
            ("Cost", lambda line: f"{line.cost:,f}"),
        ]
        overall = total(lines)
        rows = [[title for title, _ in (*columns, *numbers)]]
        rows += [[str(get(line)) for _, get in (*columns, *numbers)] for line in lines]
        rows.append(["Total", *([""] * (len(columns) - 1)), *(get(overall) for _, get in numbers)])
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        texts = len(columns)
        for number, row in enumerate(rows):
            cells = [
                cell.ljust(width) if i < texts else cell.rjust(width)
                for i, (cell, width) in enumerate(zip(row, widths, strict=True))
            ]
            if number == len(rows) - 1:
                self.stdout.write("  ".join("-" * width for width in widths))
            self.stdout.write("  ".join(cells).rstrip())
            if number == 0:
                self.stdout.write("  ".join("-" * width for width in widths))
