"""The dashboard's windows and the Usage page at 10,000,000 rows, and what rollups cost to keep.

PostgreSQL only. Fills ``RPCLog`` server-side (``INSERT ... SELECT generate_series``, in
chunks of a million) with ``--rows`` calls spread evenly over the last ``--days`` days: 60
methods and 2,000 users, both skewed (a few busy ones, a long tail), 10 % of calls without a
user; 92 % successes, 4.5 % failures, 2 % timeouts, 1 % refused by a rate limit, 0.5 % pending;
the two busiest methods' fast successes logged at ``sample_rate`` 0.1; two methods with a cost.

Then the rollups: the hours older than ``--timed-hours`` are rolled up by one ``INSERT ...
SELECT ... GROUP BY`` (the same sums ``rpc_rollup`` makes, checked on a sample hour against
``recompute_hour``: setting up 90 days through the ORM would take an hour), and the latest
``--timed-hours`` hours by :func:`~django_rpc_audit.rollups.maintain.roll_up` itself, timed:
the cost of keeping rollups, per log row. Then ``roll_up()`` as cron runs it (the hours not yet
settled), timed too.

Then every dashboard window and the Usage page of the last full month through the Django test
client, ``--rounds`` requests each, median; and the same windows' figures from the raw rows
(``source="rows"``) beside them, for the ratio.

    createdb -h 127.0.0.1 -U postgres rpc_audit_bench10m
    .venv/bin/python benchmarks/dashboard_rollups.py \\
        --database-url postgres://postgres@127.0.0.1:5432/rpc_audit_bench10m --rows 10000000

A table already holding ``--rows`` rows is reused (``--refill`` makes it again).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from admin_pages import measure, setup_django, urlpatterns  # noqa: E402

__all__ = ["urlpatterns"]

USERS = 2_000
CHUNK = 1_000_000

# One chunk of rows g = low..high out of rows, in time order over the last `days` days.
# Skew: a draw r in [0, 1) raised to a power picks low indexes (busy methods and users) most.
FILL_SQL = """
INSERT INTO django_rpc_audit_rpclog (
    id, correlation_id, method, params, response, status, error_code, error_message,
    duration_ms, user_id, username, caller_ip, user_agent, created_at, completed_at,
    sample_rate, cost
)
SELECT
    md5(g::text || 'rpc10m')::uuid,
    md5(g::text),
    'service' || (r.k / 4) || '.' || (ARRAY['get', 'list', 'create', 'notify'])[1 + r.k %% 4],
    jsonb_build_object('id', g),
    CASE WHEN r.status = 'success' THEN '{"ok": true}'::jsonb END,
    r.status,
    CASE r.status WHEN 'failed' THEN 'REMOTE_ERROR' WHEN 'timeout' THEN 'TIMEOUT' ELSE '' END,
    CASE WHEN r.status IN ('failed', 'timeout') THEN 'Upstream said no to call ' || g ELSE '' END,
    r.duration,
    CASE WHEN r.u IS NULL THEN NULL ELSE %(first_user)s + r.u END,
    CASE WHEN r.u IS NULL THEN '' ELSE 'bench-user' || lpad(r.u::text, 4, '0') END,
    ('10.0.' || (g %% 250) || '.' || (g %% 200 + 1))::inet,
    'Mozilla/5.0 (benchmark)',
    r.created_at,
    CASE WHEN r.status <> 'pending' THEN r.created_at + interval '50 milliseconds' END,
    -- The two busiest methods' fast successes are sampled: each logged row stands for 10.
    CASE WHEN r.k < 2 AND r.status = 'success' AND r.duration < 1000 THEN 0.1 ELSE 1.0 END,
    CASE WHEN r.status <> 'success' THEN NULL WHEN r.k = 6 THEN 5.00 WHEN r.k = 7 THEN 0.01 END
FROM generate_series(%(low)s, %(high)s) AS g,
     -- Selecting g makes the subquery correlated, so random() is drawn again for each row.
     LATERAL (
        SELECT g AS n,
               floor(60 * power(random(), 3))::int AS k,
               CASE WHEN random() < 0.1 THEN NULL
                    ELSE floor(%(users)s * power(random(), 4))::int END AS u,
               o.status,
               CASE WHEN o.status IN ('success', 'failed', 'timeout')
                    THEN round((exp(random() * 8))::numeric, 3)::float END AS duration,
               now() - (%(rows)s - g) * (interval '1 day' * %(days)s / %(rows)s) AS created_at
        FROM (SELECT CASE WHEN x < 0.92 THEN 'success' WHEN x < 0.965 THEN 'failed'
                          WHEN x < 0.985 THEN 'timeout' WHEN x < 0.995 THEN 'rate_limited'
                          ELSE 'pending' END AS status
              FROM (SELECT random() + 0 * g AS x) AS draw) AS o
     ) AS r
"""


def fill(rows: int, days: int, refill: bool) -> None:
    from django.contrib.auth import get_user_model
    from django.core.management import call_command
    from django.db import connection

    from django_rpc_audit.models import RPCLog, RPCRollup, RPCRollupBucket

    if connection.vendor != "postgresql":
        sys.exit("This benchmark fills PostgreSQL: give a postgres:// URL.")
    call_command("migrate", verbosity=0)
    user_model = get_user_model()
    if not user_model.objects.filter(username="bench-admin").exists():
        user_model.objects.create_superuser("bench-admin", "admin@example.com", "x")
    if not refill and RPCLog.objects.count() == rows:
        print(f"Reusing the {rows:,} rows already in the table.")
        return
    with connection.cursor() as cursor:
        for model in (RPCLog, RPCRollup, RPCRollupBucket):
            cursor.execute(f"TRUNCATE {model._meta.db_table}")
    user_model.objects.filter(username__startswith="bench-user").delete()
    user_model.objects.bulk_create(
        user_model(username=f"bench-user{i:04d}", email=f"user{i}@example.com")
        for i in range(USERS)
    )
    first = user_model.objects.filter(username__startswith="bench-user").order_by("pk")[0].pk
    started = time.perf_counter()
    with connection.cursor() as cursor:
        for low in range(1, rows + 1, CHUNK):
            high = min(low + CHUNK - 1, rows)
            values = {
                "rows": rows,
                "days": days,
                "low": low,
                "high": high,
                "users": USERS,
                "first_user": first,
            }
            cursor.execute(FILL_SQL, values)
            print(f"  {high:,} rows, {time.perf_counter() - started:.0f} s", flush=True)
        cursor.execute("VACUUM ANALYZE django_rpc_audit_rpclog")
    print(f"Filled {rows:,} rows in {time.perf_counter() - started:.0f} s.")


def rollup_sql() -> str:
    """Every hour's unsealed rollups in one statement: the sums ``recompute_hour`` makes."""
    from django_rpc_audit.rollups.models import DURATION_EDGES_MS, HISTOGRAM_FIELDS

    weight = "(1.0 / NULLIF(sample_rate, 0))"
    buckets = []
    low = None
    for edge in DURATION_EDGES_MS:
        within = f"duration_ms <= {float(edge)!r}"
        if low is not None:
            within = f"duration_ms > {float(low)!r} AND {within}"
        buckets.append(f"COALESCE(SUM(CASE WHEN {within} THEN {weight} ELSE 0 END), 0)")
        low = edge
    buckets.append(f"COALESCE(SUM(CASE WHEN duration_ms > {float(low)!r} THEN {weight} END), 0)")
    hour = "date_trunc('hour', created_at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'"
    return f"""
        INSERT INTO django_rpc_audit_rpcrollup (
            bucket_start, method, user_id, username, status, sealed, rows, calls, billed_calls,
            cost, timed_calls, duration_sum_ms, duration_max_ms, {", ".join(HISTOGRAM_FIELDS)}
        )
        SELECT {hour}, method, user_id, username, status, false, COUNT(*), SUM({weight}),
               COUNT(cost), COALESCE(SUM(cost), 0),
               COALESCE(SUM(CASE WHEN duration_ms IS NOT NULL THEN {weight} ELSE 0 END), 0),
               COALESCE(SUM(duration_ms * {weight}), 0), MAX(duration_ms), {", ".join(buckets)}
        FROM django_rpc_audit_rpclog
        WHERE created_at < %(before)s
        GROUP BY 1, method, user_id, username, status
    """


def roll_up_history(before: dt.datetime) -> None:
    """The rollups of every hour before ``before`` by one statement, the hours marked settled;
    then one of them remade by ``recompute_hour`` must give the same sums."""
    from django.db import connection
    from django.db.models import Sum

    from django_rpc_audit.models import RPCLog, RPCRollup, RPCRollupBucket
    from django_rpc_audit.rollups.maintain import SUM_FIELDS, hour_of, recompute_hour

    started = time.perf_counter()
    with connection.cursor() as cursor:
        cursor.execute(rollup_sql(), {"before": before})
        cursor.execute(
            "INSERT INTO django_rpc_audit_rpcrollupbucket (start, computed_at, settled) "
            "SELECT DISTINCT bucket_start, now(), true FROM django_rpc_audit_rpcrollup"
        )
        cursor.execute("VACUUM ANALYZE django_rpc_audit_rpcrollup")
        cursor.execute("VACUUM ANALYZE django_rpc_audit_rpcrollupbucket")
    seconds = time.perf_counter() - started
    rows = RPCLog.objects.filter(created_at__lt=before).count()
    print(
        f"Rolled up {rows:,} rows of the hours before {before:%Y-%m-%d %H:%M} by SQL in "
        f"{seconds:.0f} s: {RPCRollup.objects.count():,} rollup rows, "
        f"{RPCRollupBucket.objects.count():,} hours."
    )
    sample = hour_of(before - dt.timedelta(days=3))
    names = [name for name in SUM_FIELDS if name != "rows"]

    def sums() -> dict[str, Any]:
        found = RPCRollup.objects.filter(bucket_start=sample).aggregate(
            rows=Sum("rows"), **{name: Sum(name) for name in names}
        )
        return {name: round(float(value), 6) for name, value in found.items()}

    by_sql = sums()
    recompute_hour(sample)
    if sums() != by_sql:
        sys.exit(f"The SQL rollups of {sample} differ from recompute_hour's: {by_sql}, {sums()}")
    print(f"Checked: recompute_hour({sample:%Y-%m-%d %H:00}) gives the SQL's sums.")


def time_roll_up(since: dt.datetime) -> None:
    from django.db import connection

    from django_rpc_audit.models import RPCLog
    from django_rpc_audit.rollups.maintain import roll_up

    rows = RPCLog.objects.filter(created_at__gte=since).count()
    started = time.perf_counter()
    run = roll_up(since=since)
    seconds = time.perf_counter() - started
    print(
        f"roll_up(since=-{(dt.datetime.now(dt.UTC) - since).total_seconds() / 3600:.0f} h): "
        f"{run.hours} hours, {rows:,} rows, {run.rollup_rows:,} rollup rows in {seconds:.1f} s: "
        f"{seconds / rows * 1e6:.1f} µs per log row, {seconds / run.hours * 1000:.0f} ms per hour"
    )
    started = time.perf_counter()
    run = roll_up()
    seconds = time.perf_counter() - started
    print(
        f"roll_up() as cron runs it: {run.hours} hours remade, {run.rollup_rows:,} rollup rows "
        f"in {seconds * 1000:.0f} ms"
    )
    with connection.cursor() as cursor:
        cursor.execute("VACUUM ANALYZE django_rpc_audit_rpcrollup")


def time_context(window: Any, rounds: int) -> float:
    """Median milliseconds to compute the dashboard's figures for ``window`` (no page)."""
    from django_rpc_audit.dashboard import dashboard_context

    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        dashboard_context(window)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def time_daily_upkeep() -> None:
    """The daily rows of every day made (as the first ``rpc_rollup`` after the upgrade does),
    then what one hour costs to keep: its rollups remade, then its day remade."""
    from django.utils import timezone

    from django_rpc_audit.models import RPCDailyRollup, RPCDailyUserRollup, RPCRollupDay
    from django_rpc_audit.rollups.maintain import (
        day_of,
        days_to_refresh,
        hour_of,
        recompute_hour,
        refresh_day,
        refresh_days,
    )

    days = days_to_refresh()
    if days:
        started = time.perf_counter()
        refresh_days(days)
        seconds = time.perf_counter() - started
        print(
            f"Made the daily rows of {len(days)} days in {seconds:.1f} s "
            f"({seconds / len(days) * 1000:.0f} ms a day): {RPCDailyRollup.objects.count():,} "
            f"per day and method, {RPCDailyUserRollup.objects.count():,} per day and user"
        )
    hour = hour_of(timezone.now() - dt.timedelta(days=40))
    timings: dict[str, list[float]] = {"hour": [], "day": []}
    for _ in range(3):
        started = time.perf_counter()
        recompute_hour(hour)
        timings["hour"].append(time.perf_counter() - started)
        started = time.perf_counter()
        refresh_day(day_of(hour))
        timings["day"].append(time.perf_counter() - started)
    assert not RPCRollupDay.objects.filter(stale=True).exists()
    hour_ms, day_ms = (statistics.median(timings[name]) * 1000 for name in ("hour", "day"))
    print(
        f"One hour 40 days ago remade: recompute_hour {hour_ms:.0f} ms, then its day's daily "
        f"rows {day_ms:.0f} ms (median of 3)"
    )


def time_misses() -> None:
    """The 90-day figures in a fresh process, again, with a whole day stale (an hour of it
    remade: read from its hours until ``rpc_rollup`` remakes it), and after."""
    from django.utils import timezone

    from django_rpc_audit.dashboard import WINDOWS, dashboard_context
    from django_rpc_audit.rollups.maintain import hour_of, recompute_hour, refresh_days

    window = WINDOWS["90d"]

    def timed(label: str) -> None:
        started = time.perf_counter()
        dashboard_context(window)
        print(f"  {label:<58} {(time.perf_counter() - started) * 1000:>7.0f} ms")

    print("\nThe 90-day figures (no cache: each request reads the database)")
    timed("first request of the process")
    timed("again")
    recompute_hour(hour_of(timezone.now() - dt.timedelta(days=40)))
    timed("a day 40 days ago stale (an hour of it remade)")
    refresh_days()
    timed("its day remade (rpc_rollup)")


def main() -> None:  # noqa: PLR0915 (one run, step by step)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--database-url", required=True, help="a PostgreSQL URL")
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--days", type=int, default=91, help="days the rows are spread over")
    parser.add_argument("--rounds", type=int, default=5, help="requests per page")
    parser.add_argument(
        "--rows-rounds", type=int, default=1, help="rounds of the figures from the raw rows"
    )
    parser.add_argument("--timed-hours", type=int, default=48, help="hours roll_up() remakes")
    parser.add_argument("--refill", action="store_true", help="make the rows again")
    parser.add_argument(
        "--misses", action="store_true", help="only time the 90-day figures as blocks change"
    )
    args = parser.parse_args()
    setup_django(args.database_url)
    print(f"Load average at start: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    fill(args.rows, args.days, args.refill)
    if args.misses:
        time_daily_upkeep()
        time_misses()
        return

    from django.contrib.auth import get_user_model
    from django.db import connection
    from django.test import Client
    from django.urls import reverse
    from django.utils import timezone

    from django_rpc_audit.dashboard import WINDOWS
    from django_rpc_audit.models import RPCLog, RPCRollup
    from django_rpc_audit.rollups.maintain import hour_of

    if args.refill or not RPCRollup.objects.exists():
        timed_from = hour_of(timezone.now() - dt.timedelta(hours=args.timed_hours))
        roll_up_history(timed_from)
        time_daily_upkeep()
        time_roll_up(timed_from)
    time_daily_upkeep()
    with connection.cursor() as cursor:
        sizes = []
        for model in (RPCLog, RPCRollup):
            cursor.execute("SELECT pg_total_relation_size(%s)", [model._meta.db_table])
            sizes.append(cursor.fetchone()[0] / 2**20)
    print(
        f"{RPCLog.objects.count():,} log rows ({sizes[0]:,.0f} MiB with indexes), "
        f"{RPCRollup.objects.count():,} rollup rows ({sizes[1]:,.0f} MiB)"
    )

    client = Client()
    client.force_login(get_user_model().objects.get(username="bench-admin"))
    dashboard = reverse("admin:django_rpc_audit_rpclog_dashboard")
    usage = reverse("admin:django_rpc_audit_rpclog_usage")
    first = timezone.now().replace(day=1)
    last_month = f"{first - dt.timedelta(days=1):%Y-%m}"
    busiest = (
        RPCRollup.objects.exclude(user=None).values_list("user_id", flat=True).first() or "none"
    )
    pages = [
        (f"dashboard, {window.label}", f"{dashboard}?window={key}")
        for key, window in WINDOWS.items()
    ]
    pages += [
        (f"usage, {last_month}", f"{usage}?month={last_month}"),
        (f"usage, {last_month}, one user", f"{usage}?month={last_month}&user={busiest}"),
        (f"usage, {first:%Y-%m}", f"{usage}?month={first:%Y-%m}"),
    ]
    client.get(pages[0][1])  # the connection and the templates
    print(
        f"\nPages: the first request of each (no cache is kept: every request reads the "
        f"database), then the median of {args.rounds} requests (Django test client)\n"
    )
    print(
        f"{'page':<36} {'cold':>8} {'median':>9} {'queries':>8} {'in SQL':>9} {'slowest query':>14}"
    )
    for label, url in pages:
        started = time.perf_counter()
        client.get(url)
        cold = (time.perf_counter() - started) * 1000
        result = measure(client, url, args.rounds)
        print(
            f"{label:<36} {cold:>6.0f}ms {result['median_ms']:>7.0f}ms {result['queries']:>8} "
            f"{result['db_ms']:>7.0f}ms {result['slowest_ms']:>12.0f}ms"
        )
    print(
        f"\nThe dashboard's figures (dashboard_context), as configured and from the "
        f"raw rows (median of {args.rounds} and of {args.rows_rounds} rounds)\n"
    )
    print(f"{'window':<16} {'source':>8} {'as set':>9} {'raw rows':>10} {'ratio':>8}")
    for window in WINDOWS.values():
        configured = time_context(window, args.rounds)
        raw = time_context(dataclasses.replace(window, source="rows"), args.rows_rounds)
        print(
            f"{window.key:<16} {window.source:>8} {configured:>7.0f}ms {raw:>8.0f}ms "
            f"{raw / configured:>7.1f}x"
        )
    print(f"\nLoad average at end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
