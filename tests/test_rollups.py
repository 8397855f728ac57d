"""Rollups: made from the rows, idempotent, weighted, sealed by retention, never double counted."""

from __future__ import annotations

import threading
from collections import Counter
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from io import StringIO
from typing import Any

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection, connections
from django.db.models import Sum
from django.utils import timezone

from django_rpc_audit.models import RPCLog, RPCRollup, RPCRollupBucket, RPCStatus
from django_rpc_audit.rollups.maintain import (
    hour_of,
    hours_to_roll_up,
    prune_rollups,
    recompute_hour,
    roll_up,
)
from django_rpc_audit.rollups.models import HISTOGRAM_FIELDS
from django_rpc_audit.rollups.read import percentile
from django_rpc_audit.usage import usage
from tests.factories import RPCLogFactory, UserFactory

pytestmark = pytest.mark.django_db

HOUR = timedelta(hours=1)


def hours_ago(hours: float, minutes: float = 0) -> datetime:
    return hour_of(timezone.now()) - timedelta(hours=hours) + timedelta(minutes=minutes)


def totals(**filters: Any) -> dict[str, Any]:
    """The rollups summed over sealed and unsealed rows."""
    sums = RPCRollup.objects.filter(**filters).aggregate(
        rows=Sum("rows"), calls=Sum("calls"), cost=Sum("cost"), billed=Sum("billed_calls")
    )
    return {key: value or 0 for key, value in sums.items()}


def run(*args: str) -> str:
    out = StringIO()
    call_command(*args, stdout=out)
    return out.getvalue()


@pytest.fixture
def calls() -> dict[str, Any]:
    """Three hours of calls by two users and nobody; sampled successes, costed ones."""
    alice, bob = UserFactory(username="alice"), UserFactory(username="bob")
    start = hours_ago(5)
    for n in range(10):
        RPCLogFactory(
            method="reports.generate",
            user=alice,
            username="alice",
            cost=Decimal("5.00"),
            duration_ms=120.0,
            created_at=start + timedelta(minutes=n),
        )
    for n in range(4):  # each stands for ten calls
        RPCLogFactory(
            method="system.ping",
            user=bob,
            username="bob",
            sample_rate=0.1,
            duration_ms=3.0,
            created_at=start + HOUR + timedelta(minutes=n),
        )
    RPCLogFactory(
        method="reports.generate",
        user=bob,
        username="bob",
        status=RPCStatus.FAILED,
        duration_ms=20_000.0,
        created_at=start + 2 * HOUR,
    )
    RPCLogFactory(method="notify.sms", cost=Decimal("0.015"), created_at=start + 2 * HOUR)
    return {"alice": alice, "bob": bob, "start": start}


def test_a_run_rolls_up_every_hour_with_rows_weighted_and_costed(calls: dict[str, Any]) -> None:
    run_ = roll_up()
    start = calls["start"]
    assert (run_.hours, run_.first, run_.last) == (3, start, start + 2 * HOUR)
    assert totals() == {"rows": 16, "calls": 52.0, "cost": Decimal("50.015"), "billed": 11}
    alice = RPCRollup.objects.get(user=calls["alice"])
    assert (alice.bucket_start, alice.method, alice.status) == (
        start,
        "reports.generate",
        "success",
    )
    assert (alice.rows, alice.calls, alice.timed_calls) == (10, 10.0, 10.0)
    assert alice.duration_sum_ms == pytest.approx(1200.0)
    assert alice.le_250ms == 10.0
    assert sum(getattr(alice, name) for name in HISTOGRAM_FIELDS) == 10.0
    ping = RPCRollup.objects.get(method="system.ping")
    assert (ping.rows, ping.calls, ping.le_5ms, ping.duration_sum_ms) == (4, 40.0, 40.0, 120.0)
    failed = RPCRollup.objects.get(status="failed")
    assert (failed.gt_10000ms, failed.cost, failed.billed_calls) == (1.0, Decimal(0), 0)
    anonymous = RPCRollup.objects.get(method="notify.sms")
    assert (anonymous.user_id, anonymous.username, anonymous.cost) == (None, "", Decimal("0.015"))


def test_rerunning_and_racing_runs_never_double_count(calls: dict[str, Any]) -> None:
    roll_up()
    first = sorted(RPCRollup.objects.values_list("bucket_start", "method", "status", "rows"))
    roll_up(since=calls["start"])
    roll_up()
    assert (
        sorted(RPCRollup.objects.values_list("bucket_start", "method", "status", "rows")) == first
    )
    assert totals()["rows"] == 16


def test_a_late_row_is_counted_by_the_next_run_that_remakes_its_hour(
    calls: dict[str, Any], rpc_settings: Any
) -> None:
    rpc_settings(ROLLUP_SETTLE_SECONDS=7 * 3600)  # five hours ago has not settled
    roll_up()
    RPCLogFactory(method="reports.generate", cost=Decimal("1"), created_at=calls["start"])
    roll_up()
    assert totals() == {"rows": 17, "calls": 53.0, "cost": Decimal("51.015"), "billed": 12}


def test_settled_hours_are_left_alone_until_asked(calls: dict[str, Any], rpc_settings: Any) -> None:
    rpc_settings(ROLLUP_SETTLE_SECONDS=0)
    roll_up()
    assert RPCRollupBucket.objects.filter(settled=True).count() == 3
    late = RPCLogFactory(cost=Decimal("1"), created_at=calls["start"] + timedelta(minutes=30))
    assert list(hours_to_roll_up()) == []  # nothing since the last settled hour
    roll_up()
    assert totals()["rows"] == 16
    # After an ingest backlog: rpc_rollup --since remakes the hours it names.
    out = run("rpc_rollup", "--since", f"{late.created_at:%Y-%m-%dT%H:%M}")
    assert out.startswith("Rolled up 3 hour(s) from ")
    assert totals()["rows"] == 17


def test_empty_hours_are_skipped_not_walked(rpc_settings: Any) -> None:
    RPCLogFactory(created_at=hours_ago(24 * 30))
    RPCLogFactory(created_at=hours_ago(2))
    counter = QueryCounter()
    with connection.execute_wrapper(counter):
        hours = list(hours_to_roll_up())
    assert hours == [hours_ago(24 * 30), hours_ago(2)]
    assert counter.count <= len(hours) + 4


class QueryCounter:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self, execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
        self.count += 1
        return execute(sql, params, many, context)


def test_cleanup_counts_the_rows_it_deletes_and_the_usage_report_stays(
    calls: dict[str, Any],
) -> None:
    roll_up()
    month = (calls["start"] - timedelta(days=40), calls["start"] + timedelta(days=1))
    before = usage(*month)
    assert "Deleted 16 RPC log row(s)" in run("rpc_logs_cleanup", "--days", "0")
    assert not RPCLog.objects.exists()
    assert usage(*month) == before
    assert totals(sealed=False)["rows"] == 0
    assert totals(sealed=True) == {
        "rows": 16,
        "calls": 52.0,
        "cost": Decimal("50.015"),
        "billed": 11,
    }
    # Rolling up again finds nothing to change; the sealed rows stay.
    roll_up(since=calls["start"])
    assert usage(*month) == before


def test_cleanup_without_a_rollup_run_counts_the_rows_too(calls: dict[str, Any]) -> None:
    RPCLog.objects.prune(days=0)
    assert totals() == {"rows": 16, "calls": 52.0, "cost": Decimal("50.015"), "billed": 11}
    bucket = RPCRollupBucket.objects.get(start=calls["start"])
    assert bucket.sealed_before is not None
    assert bucket.sealed_before > calls["start"]


def test_a_row_arriving_after_its_hour_was_sealed_is_added_once(calls: dict[str, Any]) -> None:
    RPCLog.objects.prune(days=0)
    late = RPCLogFactory(
        method="reports.generate",
        user=calls["alice"],
        username="alice",
        cost=Decimal("5.00"),
        created_at=calls["start"] + timedelta(minutes=59),
    )
    roll_up(since=calls["start"])  # counted unsealed while the row exists
    assert totals(user=calls["alice"])["cost"] == Decimal("55.00")
    RPCLog.objects.prune(days=0)  # then sealed, added to the sealed row
    assert not RPCLog.objects.filter(pk=late.pk).exists()
    assert totals(user=calls["alice"])["cost"] == Decimal("55.00")
    alice = RPCRollup.objects.get(user=calls["alice"])
    assert (alice.sealed, alice.rows, alice.billed_calls) == (True, 11, 11)


def test_cleanup_cutting_through_an_hour_seals_only_the_rows_before_the_cutoff() -> None:
    start = hours_ago(1)
    old = RPCLogFactory(cost=Decimal("1"), created_at=start + timedelta(minutes=1))
    young = RPCLogFactory(cost=Decimal("2"), created_at=timezone.now())
    young_hour = hour_of(young.created_at)
    if young_hour == hour_of(old.created_at):
        pytest.skip("both rows fell in one hour")
    RPCLog.objects.filter(pk=young.pk).update(created_at=start + timedelta(minutes=59))
    cutoff_days = (timezone.now() - (start + timedelta(minutes=30))) / timedelta(days=1)
    assert RPCLog.objects.prune(days=cutoff_days) == 1
    assert list(RPCLog.objects.values_list("pk", flat=True)) == [young.pk]
    assert totals(sealed=True)["cost"] == Decimal("1")
    assert totals(sealed=False)["cost"] == Decimal("2")  # remade from the row left


def test_pending_rows_in_flight_are_neither_deleted_nor_lost() -> None:
    pending = RPCLogFactory(status=RPCStatus.PENDING, duration_ms=None, created_at=timezone.now())
    RPCLog.objects.prune(days=0)
    assert RPCLog.objects.filter(pk=pending.pk).exists()
    roll_up()
    assert totals(status="pending")["rows"] == 1


def test_rollups_have_their_own_retention(calls: dict[str, Any], rpc_settings: Any) -> None:
    roll_up()
    RPCRollup.objects.filter(method="system.ping").update(
        bucket_start=datetime(2020, 1, 1, tzinfo=UTC)
    )
    RPCRollupBucket.objects.create(start=datetime(2020, 1, 1, tzinfo=UTC))
    rpc_settings(RETENTION_DAYS=30, ROLLUP_RETENTION_DAYS=400)
    assert prune_rollups(400, dry_run=True) == 1
    out = run("rpc_logs_cleanup")
    assert "Deleted 1 rollup row(s) older than 400 day(s)" in out
    assert not RPCRollup.objects.filter(method="system.ping").exists()
    assert not RPCRollupBucket.objects.filter(start__year=2020).exists()
    assert RPCRollup.objects.count() == 3
    rpc_settings(ROLLUP_RETENTION_DAYS=0)
    RPCRollup.objects.update(bucket_start=datetime(2020, 1, 1, tzinfo=UTC))
    assert "rollup" not in run("rpc_logs_cleanup")
    assert RPCRollup.objects.count() == 3


def test_the_rollup_command_checks_its_options() -> None:
    with pytest.raises(CommandError, match="--since"):
        call_command("rpc_rollup", since="yesterday")
    with pytest.raises(CommandError, match="--runs: only with --every"):
        call_command("rpc_rollup", runs=2)
    assert run("rpc_rollup") == "Rolled up 0 hour(s): no log rows to roll up.\n"


def test_the_rollup_command_keeps_running_with_every(calls: dict[str, Any]) -> None:
    out = run("rpc_rollup", "--every", "0.01", "--runs", "2")
    assert out.count("Rolled up") == 2
    assert totals()["rows"] == 16


@pytest.mark.django_db(transaction=True)
def test_concurrent_runs_and_cleanups_on_one_hour_count_each_row_once() -> None:
    if connection.vendor == "sqlite":
        pytest.skip("SQLite has one writer at a time")
    start = hours_ago(3)
    RPCLogFactory.create_batch(300, cost=Decimal("0.01"), created_at=start + timedelta(minutes=10))
    errors: list[BaseException] = []

    def work(action: Any) -> None:
        try:
            for _ in range(5):
                action()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            connections.close_all()

    threads = [
        threading.Thread(target=work, args=(lambda: recompute_hour(start),)) for _ in range(3)
    ]
    threads.append(threading.Thread(target=work, args=(lambda: RPCLog.objects.prune(days=0),)))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors
    assert not RPCLog.objects.exists()
    assert totals() == {"rows": 300, "calls": 300.0, "cost": Decimal("3.00"), "billed": 300}
    keys = Counter(RPCRollup.objects.values_list("bucket_start", "method", "status", "sealed"))
    assert max(keys.values()) == 1


def test_cleanup_never_deletes_the_rollups_of_rows_it_keeps(rpc_settings: Any) -> None:
    rpc_settings(RETENTION_DAYS=30, ROLLUP_RETENTION_DAYS=10)
    RPCLogFactory(created_at=timezone.now() - timedelta(days=20))
    roll_up()
    assert "rollup" not in run("rpc_logs_cleanup")  # rows of 20 days are kept: their rollups too
    assert totals()["rows"] == 1
    assert "Deleted 1 rollup row(s)" in run("rpc_logs_cleanup", "--days", "5")


def test_a_percentile_read_from_the_histogram_is_within_its_bucket() -> None:
    durations = [float(ms) for ms in range(1, 1001)]  # 1..1000 ms, one each
    edges = (5, 10, 25, 50, 75, 100, 250, 500, 750, 1000, 2500, 5000, 7500, 10000)
    counts = [0.0] * (len(edges) + 1)
    for value in durations:
        counts[next(i for i, edge in enumerate(edges) if value <= edge)] += 1
    # Ranked as percentile_cont ranks them: here exactly its values (uniform buckets).
    assert percentile(counts, 0.5, 1000.0) == pytest.approx(500.5)
    assert percentile(counts, 0.95, 1000.0) == pytest.approx(950.05)
    assert percentile(counts, 0.99, 1000.0) == pytest.approx(990.01)
    assert percentile([0.0] * 15, 0.5, None) is None
    # The open bucket ends at the slowest call: rank 2 of 3 is two thirds of the way there.
    assert percentile([0.0] * 14 + [3.0], 0.5, 13_000.0) == pytest.approx(12_000.0)
    with pytest.raises(ValueError, match="need 15 counts"):
        percentile([1.0], 0.5, None)
    with pytest.raises(ValueError, match="fraction"):
        percentile(counts, 1.5, None)


def test_the_rollup_histogram_gives_the_percentiles_of_the_calls() -> None:
    start = hours_ago(2)
    for ms in range(1, 201):  # 1..200 ms, sampled at 0.5: 400 calls
        RPCLogFactory(duration_ms=float(ms), sample_rate=0.5, created_at=start)
    roll_up()
    row = RPCRollup.objects.get()
    counts = [getattr(row, name) for name in HISTOGRAM_FIELDS]
    assert sum(counts) == row.calls == 400.0
    # The true p50 is 100.5 ms, p95 190.5 ms: the estimate stays in their buckets.
    # (Ranked as percentile_cont ranks them, both are in the bucket above 100 ms, capped at
    # the slowest call.)
    assert 100 < percentile(counts, 0.5, row.duration_max_ms) <= 250
    assert 100 < percentile(counts, 0.95, row.duration_max_ms) <= 200


def test_a_deleted_users_usage_stays_under_their_id_and_name(calls: dict[str, Any]) -> None:
    alice = calls["alice"]
    roll_up()
    RPCLog.objects.prune(days=0)  # sealed: the rows are gone
    alice_pk = alice.pk
    alice.delete()
    lines = usage(calls["start"], calls["start"] + 3 * HOUR, by=("user",))
    (line,) = [line for line in lines if line.username == "alice"]
    assert (line.user_id, line.billed_calls, line.cost) == (alice_pk, 10, Decimal("50.00"))
