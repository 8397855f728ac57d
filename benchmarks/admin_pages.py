"""Admin and dashboard page times on a big ``RPCLog`` table (PostgreSQL, MariaDB, MySQL).

Fills the table with one ``INSERT ... SELECT`` (1,000,000 calls over the last 30 days by
default: ~1,400 in the last hour, ~33,000 in the last day, ~233,000 in the last week; the same
shape on every database: ``generate_series`` on PostgreSQL, a recursive CTE on MySQL and
MariaDB), then requests every admin page the way a browser would, several rounds each, and
prints the median time, the query count and the slowest query of each page, plus the
``EXPLAIN ANALYZE`` (MariaDB: ``ANALYZE``) of the queries that matter.

    createdb -h 127.0.0.1 -U postgres rpc_audit_bench
    .venv/bin/python benchmarks/admin_pages.py \\
        --database-url postgres://postgres@127.0.0.1:5432/rpc_audit_bench --rows 1000000
    mariadb -h 127.0.0.1 -u root -e "CREATE DATABASE rpc_audit_bench"
    .venv/bin/python benchmarks/admin_pages.py \\
        --database-url mysql://root@127.0.0.1:3306/rpc_audit_bench --rows 1000000

A table already holding ``--rows`` rows is reused (``--refill`` makes it again).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

urlpatterns: list[Any] = []

FILL_SQL = """
INSERT INTO django_rpc_audit_rpclog (
    id, correlation_id, method, params, response, status, error_code, error_message,
    duration_ms, user_id, caller_ip, user_agent, created_at, completed_at
)
SELECT
    md5(g::text || 'rpc')::uuid,
    md5(g::text),
    'service' || (g %% 23) || '.' || (ARRAY['get', 'list', 'create', 'notify'])[1 + g %% 4],
    jsonb_build_object('id', g, 'note', 'call ' || g),
    CASE WHEN r.outcome < 0.92 THEN '{"ok": true}'::jsonb END,
    CASE WHEN r.outcome < 0.92 THEN 'success' WHEN r.outcome < 0.97 THEN 'failed'
         WHEN r.outcome < 0.99 THEN 'timeout' ELSE 'pending' END,
    CASE WHEN r.outcome >= 0.92 AND r.outcome < 0.97 THEN 'REMOTE_ERROR'
         WHEN r.outcome >= 0.97 AND r.outcome < 0.99 THEN 'TIMEOUT' ELSE '' END,
    CASE WHEN r.outcome >= 0.92 AND r.outcome < 0.99 THEN 'Upstream said no to call ' || g
         ELSE '' END,
    CASE WHEN r.outcome < 0.99 THEN round((exp(random() * 8))::numeric, 3)::float END,
    CASE WHEN random() < 0.1 THEN NULL ELSE %(first_user)s + floor(random() * %(users)s)::int END,
    ('10.0.' || (g %% 250) || '.' || (g %% 200 + 1))::inet,
    'Mozilla/5.0 (benchmark)',
    r.created_at,
    r.created_at + interval '50 milliseconds'
FROM generate_series(1, %(rows)s) AS g,
     -- Selecting g makes the subquery correlated, so random() is drawn again for each row.
     -- Rows go in in time order, as a log table fills.
     LATERAL (SELECT g AS n, random() AS outcome,
                     now() - (%(rows)s - g) * (interval '30 days' / %(rows)s) AS created_at) AS r
"""

# The same rows on MySQL and MariaDB. They have no generate_series: a recursive CTE counts.
# RAND() in a derived table may be evaluated again at each use once the optimizer merges it,
# so each row's "random" draws are hashes of its number (CRC32), which also makes the fill
# the same at every run. Times are naive UTC, as Django stores them there with USE_TZ.
FILL_SQL_MYSQL = """
INSERT INTO django_rpc_audit_rpclog (
    id, correlation_id, method, params, response, status, error_code, error_message,
    duration_ms, user_id, caller_ip, user_agent, created_at, completed_at
)
WITH RECURSIVE series (g) AS (SELECT 1 UNION ALL SELECT g + 1 FROM series WHERE g < %(rows)s)
SELECT
    -- An MD5 as the id, its version and variant set as MariaDB's uuid type requires.
    CONCAT(SUBSTR(r.id, 1, 12), '4', SUBSTR(r.id, 14, 3), '8', SUBSTR(r.id, 18)),
    MD5(g),
    CONCAT('service', g %% 23, '.', ELT(1 + g %% 4, 'get', 'list', 'create', 'notify')),
    JSON_OBJECT('id', g, 'note', CONCAT('call ', g)),
    CASE WHEN r.outcome < 0.92 THEN '{"ok": true}' END,
    CASE WHEN r.outcome < 0.92 THEN 'success' WHEN r.outcome < 0.97 THEN 'failed'
         WHEN r.outcome < 0.99 THEN 'timeout' ELSE 'pending' END,
    CASE WHEN r.outcome >= 0.92 AND r.outcome < 0.97 THEN 'REMOTE_ERROR'
         WHEN r.outcome >= 0.97 AND r.outcome < 0.99 THEN 'TIMEOUT' ELSE '' END,
    CASE WHEN r.outcome >= 0.92 AND r.outcome < 0.99 THEN CONCAT('Upstream said no to call ', g)
         ELSE '' END,
    CASE WHEN r.outcome < 0.99 THEN ROUND(EXP(r.duration * 8), 3) END,
    CASE WHEN r.anonymous < 0.1 THEN NULL ELSE %(first_user)s + FLOOR(r.user * %(users)s) END,
    CONCAT('10.0.', g %% 250, '.', g %% 200 + 1),
    'Mozilla/5.0 (benchmark)',
    r.created_at,
    r.created_at + INTERVAL 50000 MICROSECOND
FROM (
    SELECT g,
           MD5(CONCAT(g, 'rpc')) AS id,
           CRC32(CONCAT('o', g)) / 4294967296 AS outcome,
           CRC32(CONCAT('d', g)) / 4294967296 AS duration,
           CRC32(CONCAT('a', g)) / 4294967296 AS anonymous,
           CRC32(CONCAT('u', g)) / 4294967296 AS user,
           UTC_TIMESTAMP(6) - INTERVAL ((%(rows)s - g) * 2592000000000 DIV %(rows)s) MICROSECOND
               AS created_at
    FROM series
) AS r
"""


def setup_django(database_url: str) -> None:
    import django
    import environ
    from django.conf import settings

    settings.configure(
        DEBUG=False,
        SECRET_KEY="benchmark",
        ALLOWED_HOSTS=["*"],
        ROOT_URLCONF=__name__,
        DATABASES={"default": environ.Env.db_url_config(database_url)},
        INSTALLED_APPS=[
            "unfold",
            "django.contrib.admin",
            "django.contrib.auth",
            "django.contrib.contenttypes",
            "django.contrib.sessions",
            "django.contrib.messages",
            "django.contrib.staticfiles",
            "django_rpc_audit",
        ],
        MIDDLEWARE=[
            "django.contrib.sessions.middleware.SessionMiddleware",
            "django.middleware.common.CommonMiddleware",
            "django.contrib.auth.middleware.AuthenticationMiddleware",
            "django.contrib.messages.middleware.MessageMiddleware",
        ],
        TEMPLATES=[
            {
                "BACKEND": "django.template.backends.django.DjangoTemplates",
                "APP_DIRS": True,
                "OPTIONS": {
                    "context_processors": [
                        "django.template.context_processors.request",
                        "django.contrib.auth.context_processors.auth",
                        "django.contrib.messages.context_processors.messages",
                    ]
                },
            }
        ],
        STATIC_URL="/static/",
        USE_TZ=True,
        TIME_ZONE="UTC",
        PASSWORD_HASHERS=["django.contrib.auth.hashers.MD5PasswordHasher"],
        DJANGO_CFG_RPC={"TRANSPORT": "local"},
    )
    django.setup()
    from django.contrib import admin
    from django.urls import path

    urlpatterns.append(path("admin/", admin.site.urls))


def fill(rows: int, refill: bool) -> None:
    from django.contrib.auth import get_user_model
    from django.core.management import call_command
    from django.db import connection

    from django_rpc_audit.models import RPCLog

    if connection.vendor not in ("postgresql", "mysql"):
        sys.exit("This benchmark fills PostgreSQL, MySQL or MariaDB: give one's URL.")
    call_command("migrate", verbosity=0)
    user_model = get_user_model()
    if not user_model.objects.filter(username="bench-admin").exists():
        user_model.objects.create_superuser("bench-admin", "admin@example.com", "x")
    if RPCLog.objects.count() == rows and not refill:
        print(f"Reusing the {rows:,} rows already in the table.")
        return
    RPCLog.objects.all()._raw_delete(RPCLog.objects.db)  # type: ignore[attr-defined]
    user_model.objects.filter(username__startswith="bench-user").delete()
    user_model.objects.bulk_create(
        user_model(username=f"bench-user{i:03d}", email=f"user{i}@example.com") for i in range(200)
    )
    first = user_model.objects.filter(username__startswith="bench-user").order_by("pk")[0].pk
    started = time.perf_counter()
    values = {"rows": rows, "users": 200, "first_user": first}
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute(FILL_SQL, values)
            cursor.execute("VACUUM ANALYZE django_rpc_audit_rpclog")
        else:
            # The CTE recurses once per row: lift MySQL's (1,000) and MariaDB's limits.
            variable = "max_recursive_iterations" if _is_mariadb() else "cte_max_recursion_depth"
            cursor.execute(f"SET SESSION {variable} = %s", [rows + 1])
            cursor.execute(FILL_SQL_MYSQL, values)
            cursor.execute("ANALYZE TABLE django_rpc_audit_rpclog")
            cursor.fetchall()
    print(f"Filled {rows:,} rows in {time.perf_counter() - started:.1f} s.")


def _is_mariadb() -> bool:
    from django.db import connection

    return connection.vendor == "mysql" and bool(connection.mysql_is_mariadb)  # type: ignore[attr-defined]


def measure(client: Any, url: str, rounds: int) -> dict[str, Any]:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    times: list[float] = []
    queries: list[dict[str, str]] = []
    for _ in range(rounds):
        with CaptureQueriesContext(connection) as captured:
            started = time.perf_counter()
            response = client.get(url)
            times.append(time.perf_counter() - started)
        if response.status_code != 200:
            raise SystemExit(f"{url} answered {response.status_code}")
        queries = list(captured.captured_queries)
    slowest = max(queries, key=lambda q: float(q["time"]))
    return {
        "median_ms": statistics.median(times) * 1000,
        "queries": len(queries),
        "slowest_ms": float(slowest["time"]) * 1000,
        "slowest_sql": slowest["sql"],
        "db_ms": sum(float(q["time"]) for q in queries) * 1000,
    }


def explain(sql: str) -> str:
    from django.db import connection

    if connection.vendor == "postgresql":
        prefix = "EXPLAIN (ANALYZE, BUFFERS OFF, TIMING OFF, SUMMARY ON)"
    else:
        prefix = "ANALYZE" if _is_mariadb() else "EXPLAIN ANALYZE"
    with connection.cursor() as cursor:
        cursor.execute(f"{prefix} {sql}")
        if connection.vendor == "postgresql" or not _is_mariadb():
            return "\n".join(f"    {row[0]}" for row in cursor.fetchall())
        # MariaDB's ANALYZE: EXPLAIN's table with the rows and time it measured.
        names = [column[0] for column in cursor.description]
        return "\n".join(
            "    " + ", ".join(f"{n}={v}" for n, v in zip(names, row, strict=True) if v is not None)
            for row in cursor.fetchall()
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--database-url", required=True, help="a PostgreSQL, MySQL or MariaDB URL")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=5, help="requests per page")
    parser.add_argument("--refill", action="store_true", help="make the rows again")
    parser.add_argument("--explain", action="store_true", help="print the slow queries' plans")
    args = parser.parse_args()
    setup_django(args.database_url)
    fill(args.rows, args.refill)

    from django.contrib.auth import get_user_model
    from django.test import Client
    from django.urls import reverse

    from django_rpc_audit.models import RPCLog

    client = Client()
    client.force_login(get_user_model().objects.get(username="bench-admin"))
    changelist = reverse("admin:django_rpc_audit_rpclog_changelist")
    dashboard = reverse("admin:django_rpc_audit_rpclog_dashboard")
    sample = RPCLog.objects.filter(status="failed").order_by("-created_at").first()
    assert sample is not None
    user_id = RPCLog.objects.exclude(user=None).values_list("user_id", flat=True).first()
    pages = [
        ("changelist", changelist),
        ("changelist, page 3", f"{changelist}?p=3"),
        ("changelist, status=failed", f"{changelist}?status__exact=failed"),
        ("changelist, one method", f"{changelist}?method={sample.method}"),
        ("changelist, one user", f"{changelist}?user={user_id}"),
        ("changelist, correlation id search", f"{changelist}?q={sample.correlation_id}"),
        ("changelist, text search", f"{changelist}?q=service7.list"),
        ("detail view", reverse("admin:django_rpc_audit_rpclog_change", args=[sample.pk])),
        ("dashboard, last hour", f"{dashboard}?window=1h"),
        ("dashboard, last 24 hours", f"{dashboard}?window=24h"),
        ("dashboard, last 7 days", f"{dashboard}?window=7d"),
    ]
    for _, url in pages:  # warm the caches and the connection once
        client.get(url)
    print(f"\n{RPCLog.objects.count():,} rows; median of {args.rounds} requests per page\n")
    print(f"{'page':<36} {'median':>9} {'queries':>8} {'in SQL':>9} {'slowest query':>14}")
    results = []
    for label, url in pages:
        result = measure(client, url, args.rounds)
        results.append((label, result))
        print(
            f"{label:<36} {result['median_ms']:>7.0f}ms {result['queries']:>8} "
            f"{result['db_ms']:>7.0f}ms {result['slowest_ms']:>12.0f}ms"
        )
    if args.explain:
        for label, result in results:
            if result["slowest_ms"] >= 20:
                print(f"\n{label}: slowest query ({result['slowest_ms']:.0f} ms)")
                print(f"    {result['slowest_sql'][:300]}")
                print(explain(result["slowest_sql"]))


if __name__ == "__main__":
    main()
