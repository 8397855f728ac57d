"""``manage.py rpc_rollup``: remake the hourly rollups of recent hours from the log rows, then
the daily rollups of the days whose hours changed."""

from __future__ import annotations

import datetime as dt
import time
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils.dateparse import parse_date, parse_datetime

from django_rpc_audit.management.arguments import checked, positive_integer, positive_seconds
from django_rpc_audit.rollups.maintain import roll_up


def moment(raw: object) -> dt.datetime:
    """An ISO date or date and time (UTC unless it says otherwise) (``argparse`` ``type``)."""
    import argparse

    text = str(raw).strip()
    try:
        value = parse_datetime(text)
        if value is None:
            day = parse_date(text)
            value = None if day is None else dt.datetime.combine(day, dt.time())
    except ValueError:
        value = None
    if value is None:
        raise argparse.ArgumentTypeError(f"{raw!r} is not a date (2026-11-01) or a date and time")
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


def _moment(raw: object) -> dt.datetime:
    import argparse

    try:
        return moment(raw)
    except argparse.ArgumentTypeError as exc:
        raise CommandError(f"--since: {exc}.") from None


class Command(BaseCommand):
    help = (
        "Remake the hourly rollups (calls, costs, durations per method, user and status) of "
        "every hour not yet settled, or of every hour since --since. Idempotent: run it from "
        "cron every few minutes, or with --every."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--since",
            type=moment,
            default=None,
            help="Remake every hour from this date or time on (UTC unless given), e.g. after "
            "an ingest backlog longer than ROLLUP_SETTLE_SECONDS.",
        )
        parser.add_argument(
            "--every",
            type=positive_seconds,
            default=None,
            help="Keep running: roll up again every this many seconds.",
        )
        parser.add_argument(
            "--runs",
            type=positive_integer,
            default=None,
            help="With --every: stop after this many runs (default: run until stopped).",
        )

    def handle(
        self, *args: Any, since: object, every: object, runs: object, **options: Any
    ) -> None:
        # Again: call_command() passes its keyword arguments without argparse's conversion.
        start = since if since is None or isinstance(since, dt.datetime) else _moment(since)
        if start is not None and start.tzinfo is None:
            start = start.replace(tzinfo=dt.UTC)
        pause = None if every is None else checked(positive_seconds, every, "--every")
        limit = None if runs is None else checked(positive_integer, runs, "--runs")
        if limit is not None and pause is None:
            raise CommandError("--runs: only with --every.")
        done = 0
        while True:
            run = roll_up(since=start)
            if run.hours:
                self.stdout.write(
                    f"Rolled up {run.hours} hour(s) from {run.first:%Y-%m-%d %H:00} to "
                    f"{run.last:%Y-%m-%d %H:00}: {run.rollup_rows} rollup row(s)."
                )
            else:
                self.stdout.write("Rolled up 0 hour(s): no log rows to roll up.")
            done += 1
            start = None  # later runs: only what is not settled yet
            if pause is None or (limit is not None and done >= limit):
                return
            time.sleep(pause)
