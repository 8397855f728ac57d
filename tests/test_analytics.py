"""Window analytics: the rollups (and the rows not rolled up yet) give the rows' figures."""

from __future__ import annotations

import json
import math
import random
import threading
from collections.abc import Callable
from datetime import datetime, timedelta
from decimal import Decimal
from io import StringIO
from typing import Any

import pytest
from django.core.management import call_command
from django.db import connection, connections
from django.db.models import F, Sum
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from django_rpc_audit.analytics import CallWindow
from django_rpc_audit.models import (
    RPCDailyRollup,
    RPCDailyUserRollup,
    RPCHourlyMethodRollup,
    RPCLog,
    RPCRollup,
    RPCRollupBucket,
    RPCRollupDay,
    RPCStatus,
)
from django_rpc_audit.querysets import percentile_cont
from django_rpc_audit.rollups import read
from django_rpc_audit.rollups.maintain import (
    DAY,
    day_of,
    hour_of,
    prune_rollups,
    recompute_hour,
    refresh_days,
    roll_up,
)
from django_rpc_audit.rollups.models import HISTOGRAM_FIELDS
from django_rpc_audit.rollups.read import bucket_bounds, percentile
from django_rpc_audit.usage import month_range, usage
from tests.factories import UserFactory

pytestmark = pytest.mark.django_db


DASHBOARD = "admin:django_rpc_audit_rpclog_dashboard"
HOUR = timedelta(hours=1)
METHODS = ("reports.generate", "system.ping", "notify.send", "search.query")
#: Durations (ms) around every bucket of the histogram, the slowest above 10 s.
DURATIONS = (2, 7, 18, 40, 60, 90, 200, 400, 600, 900, 1800, 4000, 6000, 9000, 15_000)
#: Hours before now, within each day, that the older calls fall in: every day of a window
#: holds calls, in a few hours of it, since rolling up costs a transaction per hour with calls
#: (calls spread over every hour of 40 days made this file take minutes).
HOURS_OF_DAY = (5, 17)
COUNTS = ("total_calls", "success_count", "failed_count", "timeout_count", "rate_limited_count")


def make_calls(
    now: datetime, *, count: int = 400, sampled: bool = True, days: int = 40, copies: int = 1
) -> None:
    """``count`` calls over the last ``days`` days (a third of them in the last three hours,
    the others at one of two times of day, :data:`HOURS_OF_DAY`): four methods, three users and
    nobody, every outcome, durations in every bucket; with ``sampled``, the fast successes of
    ``system.ping`` logged at rate 0.1, a cost on others. With ``copies``, each call is made
    that many times: the same hours, days, methods and users, more rows."""
    rng = random.Random(20261201)
    users = [UserFactory(username=f"user-{name}") for name in ("ann", "bob", "cy")]
    rows = []
    for n in range(count):
        if n % 3 == 0:
            ago = rng.uniform(0, 3)
        else:
            ago = 24 * rng.randrange(days) + rng.choice(HOURS_OF_DAY) + rng.uniform(0, 0.25)
        method = rng.choice(METHODS)
        status = rng.choices(
            [RPCStatus.SUCCESS, RPCStatus.FAILED, RPCStatus.TIMEOUT, "rate_limited", "pending"],
            weights=[80, 8, 5, 4, 3],
        )[0]
        duration = None
        if status in (RPCStatus.SUCCESS, RPCStatus.FAILED, RPCStatus.TIMEOUT):
            duration = round(rng.choice(DURATIONS) * rng.uniform(0.8, 1.2), 3)
        if status == "pending":
            ago = min(ago, 0.01)  # in flight: a few seconds old
        user = rng.choice([*users, None])
        rate = 1.0
        if sampled and method == "system.ping" and status == RPCStatus.SUCCESS:
            rate = 0.1 if duration is not None and duration < 1000 else 1.0
        cost = None
        if sampled and method == "reports.generate" and status == RPCStatus.SUCCESS:
            cost = Decimal("5.00")
        created = now - timedelta(hours=ago)
        rows.extend(
            RPCLog(
                correlation_id=f"c{n}" if copies == 1 else f"c{n}-{copy}",
                method=method,
                status=status,
                duration_ms=duration,
                user=user,
                username=user.username if user else "",
                created_at=created,
                completed_at=None if status == "pending" else created,
                sample_rate=rate,
                cost=cost,
            )
            for copy in range(copies)
        )
    RPCLog.objects.bulk_create(rows)


def expanded_durations(rows: Any) -> list[float]:
    """Every timed call's duration, once per call a row stands for (``1 / sample_rate``)."""
    values: list[float] = []
    for duration, rate in rows.exclude(duration_ms=None).values_list("duration_ms", "sample_rate"):
        values.extend([duration] * round(1 / rate))
    return sorted(values)


def assert_within_bucket(estimate: float | None, values: list[float], fraction: float) -> None:
    """The histogram's estimate lies in the bucket(s) of the calls around the exact
    percentile of ``values``, and is off by at most their span: the documented bound."""
    assert estimate is not None
    exact = percentile_cont(values, fraction)
    assert exact is not None
    position = fraction * (len(values) - 1)
    low = bucket_bounds(values[math.floor(position)])[0]
    high = min(bucket_bounds(values[math.ceil(position)])[1], values[-1])
    assert low <= estimate <= high, (fraction, estimate, low, high)
    assert low <= exact <= high
    assert abs(estimate - exact) <= high - low


def by_key(items: list[dict[str, Any]], key: str) -> dict[Any, dict[str, Any]]:
    return {item[key]: item for item in items}


def assert_same_figures(rollups: CallWindow, rows: CallWindow, *, sampled: bool) -> None:
    """Every figure both sources give alike: counts exactly, means and maxima to the float."""
    assert (rollups.source, rows.source) == ("rollups", "rows")
    assert rollups.since == rows.since
    overview, expected = rollups.overview(), rows.overview()
    for name in (*COUNTS, "pending_count", "success_rate", "error_rate"):
        assert overview[name] == pytest.approx(expected[name]), name  # type: ignore[literal-required]
    durations = expanded_durations(rows.rows())
    for name, fraction in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99)):
        assert_within_bucket(overview[f"{name}_duration_ms"], durations, fraction)  # type: ignore[literal-required]
        if not sampled:  # the rows' exact percentile is then the calls' own
            assert_within_bucket(expected[f"{name}_duration_ms"], durations, fraction)  # type: ignore[literal-required]

    methods, expected_methods = (
        by_key(rollups.calls_by_method(), "method"),
        by_key(rows.calls_by_method(), "method"),
    )
    assert methods.keys() == expected_methods.keys()
    for method, row in methods.items():
        want = expected_methods[method]
        assert {name: row[name] for name in COUNTS} == {name: want[name] for name in COUNTS}
        assert row["avg_duration_ms"] == pytest.approx(want["avg_duration_ms"])
        assert row["max_duration_ms"] == pytest.approx(want["max_duration_ms"])
    assert [r["method"] for r in rollups.calls_by_method()] == [
        r["method"] for r in rows.calls_by_method()
    ]

    stats = by_key(rollups.stats_by_method(), "method")
    for method, row in by_key(rows.stats_by_method(), "method").items():
        assert {name: stats[method][name] for name in COUNTS} == {
            name: row[name] for name in COUNTS
        }
        assert stats[method]["avg_duration_ms"] == pytest.approx(row["avg_duration_ms"])
        timed = expanded_durations(rows.rows().filter(method=method))
        assert_within_bucket(stats[method]["p95_duration_ms"], timed, 0.95)

    users = by_key(rollups.busiest_users(limit=10), "user_id")
    expected_users = by_key(rows.busiest_users(limit=10), "user_id")
    assert users == expected_users
    user_stats = by_key(rollups.stats_by_user(), "user_id")
    for user_id, row in by_key(rows.stats_by_user(), "user_id").items():
        mine = user_stats[user_id]
        assert (mine["username"], mine["caller_ip_count"]) == (row["username"], None)
        assert {name: mine[name] for name in COUNTS} == {name: row[name] for name in COUNTS}

    for bucket in ("hour", "day"):
        timeline = rollups.calls_over_time(bucket)  # type: ignore[arg-type]
        assert timeline == rows.calls_over_time(bucket)  # type: ignore[arg-type]
    assert sum(b["total_calls"] for b in rollups.calls_over_time("day")) == overview["total_calls"]


def windows(now: datetime, days: int) -> tuple[CallWindow, CallWindow]:
    rollups = CallWindow(now - timedelta(days=days), now, source="rollups")
    return rollups, CallWindow(rollups.since, now, source="rows")


# -- the two sources agree ------------------------------------------------------------------


@pytest.mark.parametrize("sampled", [True, False], ids=["sampled", "unsampled"])
def test_rollups_give_the_rows_figures_for_every_long_window(sampled: bool) -> None:
    now = timezone.now()
    make_calls(now, sampled=sampled)
    assert RPCLog.objects.filter(sample_rate__lt=1).exists() is sampled
    run = roll_up(now=now)
    assert run.hours > 50
    for days in (7, 30, 90):
        rollups, rows = windows(now, days)
        cover = rollups.coverage
        assert cover is not None
        # Every hour that ended more than ROLLUP_SETTLE_SECONDS ago is read from its rollups;
        # the last two hours and the current one from the rows.
        assert cover.boundary == hour_of(now) - HOUR
        assert rows.rows().filter(created_at__lt=cover.boundary).exists()
        assert rows.rows().filter(created_at__gte=cover.boundary).exists()
        assert_same_figures(rollups, rows, sampled=sampled)


def test_without_any_rollup_the_whole_window_is_read_from_the_rows() -> None:
    now = timezone.now()
    make_calls(now, count=120)
    rollups, rows = windows(now, 30)
    assert rollups.coverage is not None
    assert rollups.coverage.boundary == rollups.coverage.start
    assert_same_figures(rollups, rows, sampled=True)


def test_the_unrolled_tail_is_counted_once() -> None:
    """Rows added after the last roll-up, to hours the rollups hold and to the current hour,
    are counted once: the hours not settled and the current one come from the rows alone."""
    now = timezone.now()
    make_calls(now, count=150)
    roll_up(now=now)
    before = CallWindow(now - timedelta(days=30), now, source="rollups").overview()
    current, unsettled = hour_of(now), hour_of(now) - HOUR
    assert RPCRollup.objects.filter(bucket_start=unsettled).exists()  # rolled up, not settled
    extra = [
        RPCLog(correlation_id=f"late{n}", method="late.call", created_at=at, duration_ms=3.0)
        for n, at in enumerate([unsettled + timedelta(minutes=5), current, current, now])
        if at <= now
    ]
    RPCLog.objects.bulk_create(extra)
    after = CallWindow(now - timedelta(days=30), now, source="rollups")
    assert after.overview()["total_calls"] == before["total_calls"] + len(extra)
    [late] = [row for row in after.calls_by_method() if row["method"] == "late.call"]
    assert late["total_calls"] == len(extra)
    # Rolled up again: the same figures, not twice the tail.
    roll_up(now=now)
    again = CallWindow(now - timedelta(days=30), now, source="rollups")
    assert again.overview() == after.overview()
    assert_same_figures(again, CallWindow(again.since, now, source="rows"), sampled=True)


def test_hours_rolled_up_but_not_settled_are_read_from_the_rows() -> None:
    """An hour remade before it settled may still change: its rows answer, not its rollups."""
    now = timezone.now()
    hour = hour_of(now) - 5 * HOUR
    RPCLog.objects.bulk_create(
        [
            RPCLog(correlation_id=f"a{n}", method="m", created_at=hour + timedelta(minutes=n))
            for n in range(3)
        ]
    )
    roll_up(now=hour + HOUR + timedelta(minutes=1))  # right after the hour: not settled
    RPCLog.objects.create(
        correlation_id="late", method="m", created_at=hour + timedelta(minutes=50)
    )
    window = CallWindow(now - timedelta(days=7), now, source="rollups")
    assert window.coverage is not None
    assert window.coverage.boundary == window.coverage.start
    assert window.overview()["total_calls"] == 4
    roll_up(now=now)  # settled now, with the late row
    window = CallWindow(now - timedelta(days=7), now, source="rollups")
    assert window.coverage is not None
    assert window.coverage.boundary == hour + HOUR
    assert window.overview()["total_calls"] == 4


def test_cleanup_leaves_the_30_day_dashboard_unchanged(admin_client_: Any) -> None:
    now = timezone.now()
    make_calls(now, days=29)
    roll_up()

    def figures() -> dict[str, Any]:
        context = admin_client_.get(reverse(DASHBOARD), {"window": "30d"}).context
        assert context["source"] == "rollups"
        return {
            "overview": context["overview"],
            "chart": json.loads(context["chart"]["data"]),
            "errors": [
                (r["method"], r["errors"], r["total_calls"]) for r in context["errors_by_method"]
            ],
            "slowest": [
                (
                    r["method"],
                    round(r["avg_duration_ms"], 6),
                    r["max_duration_ms"],
                    r["total_calls"],
                )
                for r in context["slowest_methods"]
            ],
            "users": [
                (r["username"], r["total_calls"], r["errors"]) for r in context["busiest_users"]
            ],
        }

    before = figures()
    assert before["overview"]["total_calls"] > 300
    out = StringIO()
    call_command("rpc_logs_cleanup", "--days", "0", stdout=out)
    left = RPCLog.objects.count()
    assert left < 30, out.getvalue()  # only the calls still in flight are kept
    assert RPCRollup.objects.filter(sealed=True).exists()
    assert figures() == before
    # The rows alone have lost them.
    assert CallWindow(now - timedelta(days=30), source="rows").overview()["total_calls"] == left


def test_every_window_renders_the_figures_of_its_source(admin_client_: Any) -> None:
    """Every window of the dashboard, over the same calls (made and rolled up once)."""
    from django_rpc_audit.dashboard import WINDOWS

    now = timezone.now()
    make_calls(now, count=200, days=100)
    roll_up()
    buckets = {"1h": 61, "24h": 25, "7d": 169, "30d": 31, "90d": 91}
    assert set(buckets) == set(WINDOWS)
    for window, expected_buckets in buckets.items():
        response = admin_client_.get(reverse(DASHBOARD), {"window": window})
        assert response.status_code == 200
        context = response.context
        expected_source = "rows" if window == "1h" else "rollups"
        assert context["source"] == expected_source, window
        length = WINDOWS[window].length
        since = context["since"]
        rows = CallWindow(since, context["now"], source="rows")
        assert since == (
            hour_of(context["now"] - length)
            if expected_source == "rollups"
            else context["now"] - length
        ), window
        assert context["overview"]["total_calls"] == rows.overview()["total_calls"], window
        assert context["chart"]["total_calls"] == rows.overview()["total_calls"], window
        chart = json.loads(context["chart"]["data"])
        assert len(chart["labels"]) == context["chart"]["buckets"], window
        assert expected_buckets - 1 <= context["chart"]["buckets"] <= expected_buckets + 1, window
        content = response.content.decode()
        assert f'data-window="{window}"' in content
        assert ('data-source="rollups"' in content) == (expected_source == "rollups"), window
        for key in WINDOWS:
            assert f'data-window-link="{key}"' in content, window


@pytest.mark.parametrize("window", ["30d", "90d"])
def test_long_windows_query_count_does_not_grow_with_rows(admin_client_: Any, window: str) -> None:
    now = timezone.now()

    def page_queries() -> int:
        with CaptureQueriesContext(connection) as queries:
            response = admin_client_.get(reverse(DASHBOARD), {"window": window})
        assert response.status_code == 200
        return len(queries)

    make_calls(now, count=60, days=80)
    roll_up()
    small = page_queries()
    RPCLog.objects.all().delete()
    RPCRollup.objects.all().delete()
    RPCRollupBucket.objects.all().delete()
    # Ten times the rows in the same hours and days: which hours and days hold calls decides
    # which tables a window reads, the number of rows must not.
    make_calls(now, count=60, days=80, copies=10)
    roll_up()
    assert RPCLog.objects.count() == 600
    assert page_queries() == small


def test_sources_and_their_choice() -> None:
    now = timezone.now()
    assert CallWindow(now - timedelta(hours=1), now).source == "rows"
    assert CallWindow(now - timedelta(hours=1, seconds=1), now).source == "rollups"
    assert CallWindow(now - timedelta(days=90), now, source="rows").source == "rows"
    assert CallWindow(now - timedelta(minutes=5), now, source="rollups").since == hour_of(
        now - timedelta(minutes=5)
    )
    with pytest.raises(ValueError, match="source"):
        CallWindow(now, source="cache")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="before"):
        CallWindow(now, now - HOUR)
    with pytest.raises(ValueError, match="hour"):
        CallWindow(now - timedelta(days=7), now, source="rollups").calls_over_time("minute")


def test_a_deleted_user_keeps_their_name_in_the_rollups() -> None:
    now = timezone.now()
    gone = UserFactory(username="gone")
    hour = hour_of(now) - 10 * HOUR
    RPCLog.objects.bulk_create(
        [
            RPCLog(correlation_id=f"g{n}", method="m", user=gone, username="gone", created_at=hour)
            for n in range(3)
        ]
    )
    roll_up(now=now)
    gone_id = gone.pk
    gone.delete()  # the rows' user becomes NULL; the rollups keep the id
    window = CallWindow(now - timedelta(days=7), now, source="rollups")
    [row] = window.busiest_users()
    assert (row["user_id"], row["username"], row["total_calls"]) == (gone_id, "gone", 3)
    [stats] = window.stats_by_user()
    assert (stats["user_id"], stats["username"]) == (gone_id, "gone")


# -- percentiles from the histogram -------------------------------------------------------------


def test_histogram_percentiles_stay_within_the_documented_bound() -> None:
    rng = random.Random(14)
    edges = (0.0, 5, 10, 25, 50, 75, 100, 250, 500, 750, 1000, 2500, 5000, 7500, 10000)
    for _ in range(300):
        values = sorted(
            round(rng.choice([rng.uniform(0, 30), rng.lognormvariate(4, 2)]), 3)
            for _ in range(rng.randint(1, 60))
        )
        histogram = [0.0] * 15
        for value in values:
            index = next((i for i, e in enumerate(edges[1:]) if value <= e), 14)
            histogram[index] += 1
        for fraction in (0.0, 0.01, 0.25, 0.5, 0.9, 0.95, 0.99, 1.0):
            assert_within_bucket(percentile(histogram, fraction, values[-1]), values, fraction)


def test_histogram_percentile_edges() -> None:
    assert percentile([0.0] * 15, 0.5, None) is None
    one = [0.0] * 15
    one[14] = 1.0  # one call slower than 10 s: the bucket ends at the longest call
    assert percentile(one, 0.99, 12_345.0) == pytest.approx(12_345.0)
    with pytest.raises(ValueError, match="fraction"):
        percentile(one, 1.5, None)


# -- one snapshot ----------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_a_cleanup_between_the_two_reads_neither_loses_nor_doubles_calls(monkeypatch: Any) -> None:
    """The rollups are read, then a cleanup commits (rows sealed into the rollups and deleted),
    then the rows are read: in one snapshot, the calls still count once."""
    if connection.vendor == "sqlite":
        pytest.skip("SQLite: one writer at a time, the cleanup would wait for the reader")
    now = timezone.now()
    make_calls(now, count=120, days=5)
    roll_up(now=now)
    # Some rows of the current hour already deleted: its sealed rollups are read first.
    RPCLog.objects.bulk_create(
        [
            RPCLog(correlation_id=f"now{n}", method="m", status="success", created_at=hour_of(now))
            for n in range(3)
        ]
        # and more in the previous hour, not settled yet: rows the cleanup below will seal
        + [
            RPCLog(
                correlation_id=f"tail{n}",
                method="m",
                status="success",
                created_at=hour_of(now) - timedelta(minutes=n),
            )
            for n in range(1, 21)
        ]
    )
    assert RPCLog.objects.filter(created_at__gte=hour_of(now)).prune(days=0) >= 3
    window = CallWindow(now - timedelta(days=7), now, source="rollups")
    expected = window.overview()["total_calls"]
    cover = window.coverage
    assert cover is not None
    tail = RPCLog.objects.filter(created_at__gte=cover.boundary).exclude(status="pending").count()
    assert tail >= 20
    real = read._key_value
    ran: list[int] = []

    def cleanup_midway(row: dict[str, Any], name: str, hour_name: str) -> Any:
        if not ran:

            def clean() -> None:
                ran.append(RPCLog.objects.filter(created_at__gte=cover.boundary).prune(days=0))
                connections.close_all()

            worker = threading.Thread(target=clean)
            worker.start()
            worker.join(timeout=60)
        return real(row, name, hour_name)

    monkeypatch.setattr(read, "_key_value", cleanup_midway)
    again = CallWindow(now - timedelta(days=7), now, source="rollups").overview()
    assert ran
    assert ran[0] >= tail
    assert again["total_calls"] == expected
    monkeypatch.setattr(read, "_key_value", real)
    assert (
        CallWindow(now - timedelta(days=7), now, source="rollups").overview()["total_calls"]
        == expected
    )


# -- the daily tables ----------------------------------------------------------------------------


def test_whole_days_come_from_the_daily_tables_while_no_hour_of_theirs_changed() -> None:
    now = timezone.now()
    make_calls(now, count=200, days=20)
    roll_up(now=now)
    since = now - timedelta(days=30)

    def figures() -> tuple[Any, ...]:
        window = CallWindow(since, now, source="rollups")
        return (
            window.overview(),
            window.stats_by_method(),
            window.busiest_users(),
            window.calls_over_time("day"),
            window.calls_over_time("hour"),
        )

    truth = figures()
    old_day = day_of(hour_of(now) - 5 * 24 * HOUR)
    assert not RPCRollupDay.objects.get(day=old_day).stale
    assert RPCDailyRollup.objects.filter(day=old_day).exists()
    # A window starting within that day: its hours from the hourly method rows.
    edge_hours = RPCHourlyMethodRollup.objects.filter(
        hour__gte=old_day + 5 * HOUR, hour__lt=old_day + DAY
    )
    assert edge_hours.exists()
    edge_truth = CallWindow(old_day + 5 * HOUR, now, source="rollups").overview()
    edge_hours.update(calls=F("calls") + 1000)
    edge_doctored = CallWindow(old_day + 5 * HOUR, now, source="rollups").overview()
    assert edge_doctored["total_calls"] == edge_truth["total_calls"] + 1000 * edge_hours.count()
    # What the window reads for that day is its daily rows: changed there, changed in it.
    RPCDailyRollup.objects.filter(day=old_day).update(calls=F("calls") + 1000)
    RPCDailyUserRollup.objects.filter(day=old_day).update(success_calls=F("success_calls") + 1000)
    hours = RPCRollupBucket.objects.filter(start__gte=old_day, start__lt=old_day + DAY)
    hours.update(success_calls=F("success_calls") + 1000)
    doctored = figures()
    assert doctored[0]["total_calls"] > truth[0]["total_calls"]
    assert doctored[2][0]["total_calls"] > truth[2][0]["total_calls"]
    assert sum(b["total_calls"] for b in doctored[3]) > sum(b["total_calls"] for b in truth[3])
    assert sum(b["total_calls"] for b in doctored[4]) > sum(b["total_calls"] for b in truth[4])
    # A late row in an hour of that day, its hour remade: the day is stale, so it is read
    # from its hours, exactly, until its daily rows are made again.
    late_hour = old_day + 3 * HOUR
    RPCLog.objects.create(correlation_id="late", method="late.call", created_at=late_hour)
    recompute_hour(late_hour, now=now)
    assert RPCRollupDay.objects.get(day=old_day).stale
    changed = figures()
    assert changed[0]["total_calls"] == truth[0]["total_calls"] + 1
    assert "late.call" in {row["method"] for row in changed[1]}
    assert sum(b["total_calls"] for b in changed[3]) == sum(b["total_calls"] for b in truth[3]) + 1
    # The next roll_up remakes the day: read from its daily rows again, the same figures.
    roll_up(now=now)
    assert not RPCRollupDay.objects.get(day=old_day).stale
    assert_close(figures(), changed)


def assert_close(got: Any, want: Any) -> None:
    """Equal, but floats only to rounding: sums added up in another order."""
    if isinstance(want, float):
        assert got == pytest.approx(want)
    elif isinstance(want, dict):
        assert got.keys() == want.keys()
        for key in want:
            assert_close(got[key], want[key])
    elif isinstance(want, list | tuple):
        assert len(got) == len(want)
        for one, other in zip(got, want, strict=True):
            assert_close(one, other)
    else:
        assert got == want


def from_days_and_from_hours(read: Callable[[], Any]) -> tuple[Any, Any]:
    """``read()`` with the daily rows, then with every day stale (read from the hours)."""
    assert not RPCRollupDay.objects.filter(stale=True).exists()
    from_days = read()
    RPCRollupDay.objects.update(stale=True)
    from_hours = read()
    refresh_days()
    return from_days, from_hours


def month_usage(now: datetime) -> list[Any]:
    start, end = month_range(now.date())
    previous = month_range(start.date() - timedelta(days=1))
    return [
        usage(*month, by=by, period=period)
        for month in (previous, (start, end))
        for by, period in ((("user",), None), (("method",), "day"), (("user", "method"), None))
    ]


def window_figures(now: datetime, days: int = 30) -> tuple[Any, ...]:
    window = CallWindow(now - timedelta(days=days), now, source="rollups")
    return (
        window.overview(),
        window.stats_by_method(),
        window.calls_by_method(),
        window.busiest_users(),
        window.calls_over_time("day"),
        window.calls_over_time("hour"),
    )


def test_daily_rows_are_the_sums_of_the_hours_and_of_the_rows() -> None:
    now = timezone.now()
    make_calls(now, count=300, days=20)
    roll_up(now=now)
    assert RPCDailyRollup.objects.exists()
    for daily in RPCDailyRollup.objects.all():
        hours = RPCRollup.objects.filter(
            bucket_start__gte=daily.day,
            bucket_start__lt=daily.day + DAY,
            method=daily.method,
            status=daily.status,
        )
        rows = list(
            RPCLog.objects.filter(
                created_at__gte=daily.day,
                created_at__lt=daily.day + DAY,
                method=daily.method,
                status=daily.status,
            )
        )
        assert daily.rows == len(rows) == sum(hour.rows for hour in hours)
        assert daily.calls == pytest.approx(sum(1 / row.sample_rate for row in rows))
        assert daily.calls == pytest.approx(sum(hour.calls for hour in hours))
        assert daily.billed_calls == sum(row.cost is not None for row in rows)
        assert daily.cost == sum((row.cost or Decimal(0) for row in rows), Decimal(0))
        timed = [row for row in rows if row.duration_ms is not None]
        assert daily.timed_calls == pytest.approx(sum(1 / row.sample_rate for row in timed))
        assert daily.duration_max_ms == max((row.duration_ms for row in timed), default=None)
        histogram = [getattr(daily, name) for name in HISTOGRAM_FIELDS]
        assert sum(histogram) == pytest.approx(daily.timed_calls)
    for daily_user in RPCDailyUserRollup.objects.all():
        rows = list(
            RPCLog.objects.filter(
                created_at__gte=daily_user.day,
                created_at__lt=daily_user.day + DAY,
                user_id=daily_user.user_id,
            )
        )
        assert daily_user.rows == len(rows)
        assert daily_user.calls == pytest.approx(sum(1 / row.sample_rate for row in rows))
        assert daily_user.success_calls == pytest.approx(
            sum(1 / row.sample_rate for row in rows if row.status == RPCStatus.SUCCESS)
        )
        assert daily_user.pending_calls == pytest.approx(
            sum(1 / row.sample_rate for row in rows if row.status == RPCStatus.PENDING)
        )
        assert daily_user.cost == sum((row.cost or Decimal(0) for row in rows), Decimal(0))
    # Every figure read from the days is the one read from the hours.
    from_days, from_hours = from_days_and_from_hours(lambda: month_usage(now))
    assert from_days == from_hours
    assert any(lines for lines in from_days)
    from_days, from_hours = from_days_and_from_hours(lambda: window_figures(now))
    assert_close(from_days, from_hours)


def test_rolling_up_again_and_late_rows_never_count_twice() -> None:
    now = timezone.now()
    make_calls(now, count=200, days=10)
    roll_up(now=now)
    first, figures = month_usage(now), window_figures(now)
    roll_up(since=now - timedelta(days=12), now=now)  # every hour remade
    refresh_days(list(RPCRollupDay.objects.values_list("day", flat=True)))  # every day too
    assert month_usage(now) == first
    assert_close(window_figures(now), figures)
    late_hour = hour_of(now) - 4 * 24 * HOUR
    RPCLog.objects.create(
        correlation_id="late", method="late.call", created_at=late_hour, cost=Decimal("2.5")
    )
    for _ in range(2):
        roll_up(since=late_hour, until=late_hour + HOUR, now=now)
        again = window_figures(now)
        assert again[0]["total_calls"] == figures[0]["total_calls"] + 1
        lines = usage(late_hour.replace(hour=0), late_hour.replace(hour=0) + DAY, by=("method",))
        assert [(line.billed_calls, line.cost) for line in lines if line.method == "late.call"] == [
            (1, Decimal("2.500000"))
        ]


def test_a_cleanup_of_every_row_leaves_the_30_day_figures_and_the_months_unchanged() -> None:
    now = timezone.now()
    make_calls(now, count=300, days=25)
    roll_up(now=now)
    months, figures = month_usage(now), window_figures(now)
    call_command("rpc_logs_cleanup", "--days", "0", stdout=StringIO())
    # Every row went but the calls still in flight.
    assert set(RPCLog.objects.values_list("status", flat=True)) <= {RPCStatus.PENDING}
    assert RPCRollup.objects.filter(sealed=True).count() > 100
    assert not RPCRollupDay.objects.filter(stale=True).exists()  # remade by the cleanup
    assert month_usage(now) == months
    assert_close(window_figures(now), figures)


def test_pruning_rollups_remakes_the_days_it_cuts() -> None:
    now = timezone.now()
    make_calls(now, count=300, days=20)
    roll_up(now=now)
    before = RPCDailyRollup.objects.aggregate(calls=Sum("calls"))["calls"]
    assert prune_rollups(10) > 0
    cutoff = RPCRollup.objects.order_by("bucket_start").values_list("bucket_start", flat=True)[0]
    assert not RPCRollupDay.objects.filter(stale=True).exists()
    assert not RPCDailyRollup.objects.filter(day__lt=day_of(cutoff)).exists()
    assert not RPCDailyUserRollup.objects.filter(day__lt=day_of(cutoff)).exists()
    after = RPCDailyRollup.objects.aggregate(calls=Sum("calls"))["calls"]
    assert after < before
    assert after == pytest.approx(RPCRollup.objects.aggregate(calls=Sum("calls"))["calls"])
    from_days, from_hours = from_days_and_from_hours(lambda: month_usage(now))
    assert from_days == from_hours
    from_days, from_hours = from_days_and_from_hours(lambda: window_figures(now))
    assert_close(from_days, from_hours)
