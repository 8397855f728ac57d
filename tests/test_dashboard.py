"""The analytics dashboard and the QuerySet methods behind it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from django.contrib.auth.models import Permission
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from django_rpc_audit.models import RPCLog
from tests.conftest import unavailable
from tests.factories import RPCLogFactory, UserFactory, bulk_logs, staff_client

pytestmark = pytest.mark.django_db

DASHBOARD = "admin:django_rpc_audit_rpclog_dashboard"


# -- QuerySet ---------------------------------------------------------------------------------


def test_overview_counts_rates_and_percentiles():
    for duration in range(1, 101):  # 1..100 ms
        RPCLogFactory(status="success", duration_ms=float(duration))
    RPCLogFactory(status="failed", duration_ms=None)
    RPCLogFactory(status="timeout", duration_ms=None)
    RPCLogFactory(status="pending", duration_ms=None)
    overview = RPCLog.objects.overview()
    assert overview["total_calls"] == 103
    assert overview["success_count"] == 100
    assert overview["failed_count"] == 1
    assert overview["timeout_count"] == 1
    assert overview["pending_count"] == 1
    assert overview["success_rate"] == pytest.approx(100 * 100 / 102)
    assert overview["error_rate"] == pytest.approx(100 * 2 / 102)
    # percentile_cont over 1..100: the same on PostgreSQL (in SQL) and elsewhere (Python).
    assert overview["p50_duration_ms"] == pytest.approx(50.5)
    assert overview["p95_duration_ms"] == pytest.approx(95.05)
    assert overview["p99_duration_ms"] == pytest.approx(99.01)


def test_overview_counts_rate_limited_calls_apart():
    RPCLogFactory.create_batch(2, status="success", duration_ms=10.0)
    RPCLogFactory(status="failed", duration_ms=30.0)
    RPCLogFactory.create_batch(3, status="rate_limited", duration_ms=None)
    RPCLogFactory(status="pending", duration_ms=None)
    overview = RPCLog.objects.overview()
    assert (overview["total_calls"], overview["rate_limited_count"]) == (7, 3)
    assert overview["pending_count"] == 1  # refused calls are finished, not in flight
    # The rates are of the calls that were sent: a refused call is neither success nor error.
    assert overview["success_rate"] == pytest.approx(100 * 2 / 3)
    assert overview["error_rate"] == pytest.approx(100 * 1 / 3)
    assert overview["p50_duration_ms"] == pytest.approx(10.0)


def test_dashboard_shows_rate_limited_calls(admin_client_):
    import json

    RPCLogFactory.create_batch(2, status="rate_limited", duration_ms=None)
    RPCLogFactory(status="success")
    response = admin_client_.get(reverse(DASHBOARD))
    kpi = next(k for k in response.context["kpis"] if k["key"] == "rate_limited")
    assert kpi["value"] == "2"
    assert "status__exact=rate_limited" in kpi["url"]
    assert 'data-kpi="rate_limited"' in response.content.decode()
    chart = json.loads(response.context["chart"]["data"])
    by_label = {dataset["label"]: sum(dataset["data"]) for dataset in chart["datasets"]}
    assert by_label == {"Succeeded or in flight": 1, "Failed or timed out": 0, "Rate limited": 2}


def test_dashboard_figures_are_estimated_totals_under_sampling():
    user = UserFactory()
    now = timezone.now()
    # 30 successes logged at rate 0.1 stand for 300 calls; failures are always kept (rate 1).
    RPCLogFactory.create_batch(30, status="success", sample_rate=0.1, user=user, method="m.ok")
    RPCLogFactory.create_batch(6, status="failed", user=user, method="m.ok")
    overview = RPCLog.objects.overview()
    assert (overview["total_calls"], overview["success_count"]) == (306, 300)
    assert overview["failed_count"] == 6
    assert overview["error_rate"] == pytest.approx(100 * 6 / 306)
    [by_method] = RPCLog.objects.calls_by_method()
    assert (by_method["total_calls"], by_method["failed_count"]) == (306, 6)
    [by_user] = RPCLog.objects.busiest_users()
    assert by_user["total_calls"] == 306
    timeline = RPCLog.objects.calls_over_time(since=now - timedelta(minutes=5))
    assert sum(bucket["total_calls"] for bucket in timeline) == 306
    assert sum(bucket["success_count"] for bucket in timeline) == 300


def test_overview_of_nothing():
    overview = RPCLog.objects.overview()
    assert overview["total_calls"] == 0
    assert overview["success_rate"] is None
    assert overview["error_rate"] is None
    assert overview["p50_duration_ms"] is None


def test_calls_over_time_fills_every_bucket():
    now = timezone.now().replace(second=30, microsecond=0)
    RPCLogFactory(created_at=now - timedelta(minutes=5), status="success")
    RPCLogFactory(created_at=now - timedelta(minutes=5), status="failed")
    RPCLogFactory(created_at=now - timedelta(minutes=1), status="timeout")
    RPCLogFactory(created_at=now - timedelta(minutes=30), status="success")  # before `since`
    timeline = RPCLog.objects.calls_over_time(since=now - timedelta(minutes=10), until=now)
    assert len(timeline) == 11
    assert [b["start"] for b in timeline] == [
        (now - timedelta(minutes=10 - i)).replace(second=0) for i in range(11)
    ]
    counts = [b["total_calls"] for b in timeline]
    assert counts == [0, 0, 0, 0, 0, 2, 0, 0, 0, 1, 0]
    assert timeline[5]["failed_count"] == 1
    assert timeline[5]["success_count"] == 1
    assert timeline[9]["timeout_count"] == 1
    hourly = RPCLog.objects.calls_over_time(
        since=now - timedelta(hours=2), until=now, bucket="hour"
    )
    assert len(hourly) == 3
    assert sum(b["total_calls"] for b in hourly) == 4
    daily = RPCLog.objects.calls_over_time(since=now - timedelta(days=2), until=now, bucket="day")
    assert len(daily) == 3
    assert daily[-1]["start"] == timezone.localtime(now).replace(hour=0, minute=0, second=0)
    assert sum(b["total_calls"] for b in daily) == 4
    with pytest.raises(ValueError, match="bucket"):
        RPCLog.objects.calls_over_time(since=now, bucket="week")  # type: ignore[arg-type]


def test_calls_over_time_buckets_follow_a_half_hour_time_zone(settings):
    """Hours start at :00 local time, i.e. :30 UTC in India: the buckets are the database's
    ``Trunc`` in the current time zone (on MariaDB, its time zone tables: see .ci/run)."""
    if connection.vendor == "mysql":
        from django_rpc_audit.databases import time_zone_problems

        if time_zone_problems("default", connection, "Asia/Kolkata"):
            unavailable("MariaDB's time zone tables are not loaded (see .ci/run)")
    settings.TIME_ZONE = "Asia/Kolkata"
    at = datetime(2026, 3, 1, 10, 0, tzinfo=UTC)  # 15:30 in India
    RPCLogFactory(created_at=at + timedelta(minutes=20))  # 15:50 local
    RPCLogFactory(created_at=at + timedelta(minutes=40), status="failed")  # 16:10 local
    hourly = RPCLog.objects.calls_over_time(
        since=at, until=at + timedelta(minutes=59), bucket="hour"
    )
    local = timezone.get_current_timezone()
    assert [b["start"].astimezone(local).strftime("%H:%M") for b in hourly] == ["15:00", "16:00"]
    assert [(b["total_calls"], b["failed_count"]) for b in hourly] == [(1, 0), (1, 1)]
    by_minute = RPCLog.objects.calls_over_time(since=at, until=at + timedelta(minutes=59))
    assert sum(b["total_calls"] for b in by_minute) == 2
    assert by_minute[20]["start"].astimezone(local).strftime("%H:%M") == "15:50"
    assert by_minute[20]["total_calls"] == 1


def test_busiest_users():
    alice, bob = UserFactory(username="alice"), UserFactory(username="bob")
    for _ in range(3):
        RPCLogFactory(user=alice)
    RPCLogFactory(user=alice, status="failed")
    RPCLogFactory(user=bob)
    RPCLogFactory(user=None)
    RPCLogFactory(user=None)
    rows = RPCLog.objects.busiest_users(limit=2)
    assert [(r["username"], r["total_calls"], r["failed_count"]) for r in rows] == [
        ("alice", 4, 1),
        (None, 2, 0),
    ]
    assert rows[0]["user_id"] == alice.pk


def test_unsuccessful_and_recent_methods():
    now = timezone.now()
    RPCLogFactory(method="old", status="failed", created_at=now - timedelta(days=1))
    RPCLogFactory(method="b", status="timeout", created_at=now - timedelta(seconds=2))
    RPCLogFactory(method="a", status="success", created_at=now - timedelta(seconds=1))
    assert {log.method for log in RPCLog.objects.unsuccessful()} == {"old", "b"}
    assert RPCLog.objects.recent_methods(rows=2) == ["a", "b"]
    assert RPCLog.objects.recent_methods() == ["a", "b", "old"]


# -- the page ---------------------------------------------------------------------------------


def test_dashboard_needs_a_login():
    response = Client().get(reverse(DASHBOARD))
    assert response.status_code == 302
    assert response["Location"].startswith(reverse("admin:login"))


def test_dashboard_needs_the_view_permission():
    assert staff_client().get(reverse(DASHBOARD)).status_code == 403
    assert staff_client("change_user").get(reverse(DASHBOARD)).status_code == 403
    assert staff_client("view_rpclog").get(reverse(DASHBOARD)).status_code == 200


def test_non_staff_with_the_permission_get_the_login_page():
    user = UserFactory(username="outsider", is_staff=False)
    user.user_permissions.add(Permission.objects.get(codename="view_rpclog"))
    client = Client()
    client.force_login(user)
    response = client.get(reverse(DASHBOARD))
    assert response.status_code == 302
    assert response["Location"].startswith(reverse("admin:login"))


def test_dashboard_shows_the_figures_of_the_window(admin_client_):
    alice = UserFactory(username="alice")
    now = timezone.now()
    for i in range(8):
        RPCLogFactory(
            method="fast.method",
            duration_ms=10.0,
            user=alice,
            created_at=now - timedelta(minutes=i),
        )
    RPCLogFactory(
        method="slow.method",
        status="failed",
        error_code="REMOTE_ERROR",
        error_message="it <broke>",
        duration_ms=900.0,
        created_at=now - timedelta(minutes=2),
    )
    RPCLogFactory(method="slow.method", status="timeout", duration_ms=None)
    RPCLogFactory(method="yesterday.method", created_at=now - timedelta(hours=5))
    response = admin_client_.get(reverse(DASHBOARD), {"window": "1h"})
    assert response.status_code == 200
    context = response.context
    assert context["overview"]["total_calls"] == 10
    assert context["overview"]["failed_count"] == 1
    assert context["overview"]["error_rate"] == pytest.approx(20.0)
    assert [row["method"] for row in context["errors_by_method"]] == ["slow.method"]
    assert context["errors_by_method"][0]["errors"] == 2
    assert [row["method"] for row in context["slowest_methods"]] == ["slow.method", "fast.method"]
    assert context["busiest_users"][0]["username"] == "alice"
    assert [item["log"].method for item in context["recent_failures"]] == ["slow.method"] * 2
    assert context["chart"]["total_calls"] == 10
    assert context["chart"]["buckets"] in (60, 61)
    content = response.content.decode()
    assert "it &lt;broke&gt;" in content
    assert "<broke>" not in content
    assert "20.0%" in content
    assert 'id="rpc-calls-chart"' in content
    assert "django_rpc_audit/dashboard.js" in content

    day = admin_client_.get(reverse(DASHBOARD), {"window": "24h"}).context
    assert day["overview"]["total_calls"] == 11
    assert day["chart"]["buckets"] in (24, 25)


def test_every_figure_links_to_the_matching_changelist_rows(admin_client_):
    now = timezone.now()
    alice = UserFactory(username="alice")
    RPCLogFactory(method="m.ok", user=alice)
    # The newer call is the faster: by default the changelist would list it first.
    RPCLogFactory(
        method="m.bad", status="failed", duration_ms=50.0, created_at=now - timedelta(seconds=2)
    )
    RPCLogFactory(method="m.bad", status="timeout", user=alice, duration_ms=5.0)
    RPCLogFactory(method="m.bad", status="failed", created_at=now - timedelta(days=3))
    context = admin_client_.get(reverse(DASHBOARD)).context

    def rows(url: str) -> set[tuple[str, str]]:
        response = admin_client_.get(url)
        assert response.status_code == 200, url
        return {(log.method, log.status) for log in response.context["cl"].result_list}

    kpis = {kpi["key"]: kpi["url"] for kpi in context["kpis"]}
    assert len(rows(kpis["total"])) == 3
    assert rows(kpis["success_rate"]) == {("m.ok", "success")}
    assert rows(kpis["error_rate"]) == {("m.bad", "failed"), ("m.bad", "timeout")}
    assert rows(context["errors_by_method"][0]["url"]) == {
        ("m.bad", "failed"),
        ("m.bad", "timeout"),
    }
    alice_row = next(r for r in context["busiest_users"] if r["username"] == "alice")
    assert rows(alice_row["url"]) == {("m.ok", "success"), ("m.bad", "timeout")}
    nobody = next(r for r in context["busiest_users"] if r["user_id"] is None)
    assert rows(nobody["url"]) == {("m.bad", "failed")}
    assert rows(context["failures_url"]) == {("m.bad", "failed"), ("m.bad", "timeout")}
    slowest = admin_client_.get(context["slowest_methods"][0]["url"])
    durations = [log.duration_ms for log in slowest.context["cl"].result_list]
    print(context["slowest_methods"][0]["url"], slowest.context["cl"].queryset.query)
    assert durations == [50.0, 5.0]  # that method's calls, slowest first
    failure = context["recent_failures"][0]
    assert admin_client_.get(failure["url"]).status_code == 200


def test_unknown_window_falls_back_to_the_last_hour(admin_client_):
    response = admin_client_.get(reverse(DASHBOARD), {"window": "forever"})
    assert response.status_code == 200
    assert response.context["window"].key == "1h"


def test_refresh_interval_comes_from_the_settings(admin_client_, rpc_settings):
    assert 'data-refresh-seconds="5"' in admin_client_.get(reverse(DASHBOARD)).content.decode()
    # The longer windows refresh less often: 30 s for a day, a minute for a week.
    for window, seconds in (("24h", 30), ("7d", 60)):
        content = admin_client_.get(reverse(DASHBOARD), {"window": window}).content.decode()
        assert f'data-refresh-seconds="{seconds}"' in content
    rpc_settings(ADMIN_DASHBOARD_REFRESH_SECONDS=0)
    assert 'data-refresh-seconds="0"' in admin_client_.get(reverse(DASHBOARD)).content.decode()


def test_changelist_links_to_the_dashboard(admin_client_):
    content = admin_client_.get(reverse("admin:django_rpc_audit_rpclog_changelist")).content
    assert reverse(DASHBOARD).encode() in content


@pytest.mark.parametrize("window", ["1h", "24h", "7d"])
def test_dashboard_query_count_does_not_grow_with_rows(admin_client_, window):
    users = [UserFactory(username=f"bulk{i}") for i in range(12)]

    def page_queries() -> int:
        with CaptureQueriesContext(connection) as queries:
            response = admin_client_.get(reverse(DASHBOARD), {"window": window})
        assert response.status_code == 200
        return len(queries)

    bulk_logs(40, users, methods=9)
    small = page_queries()
    bulk_logs(960, users, methods=9)
    assert page_queries() == small


def test_calls_by_method():
    RPCLogFactory(method="a", duration_ms=10.0)
    RPCLogFactory(method="a", duration_ms=30.0, status="failed")
    RPCLogFactory(method="a", duration_ms=None, status="pending")
    RPCLogFactory(method="b", duration_ms=5.0, status="timeout")
    rows = RPCLog.objects.calls_by_method()
    assert rows == [
        {
            "method": "a",
            "total_calls": 3,
            "success_count": 1,
            "failed_count": 1,
            "timeout_count": 0,
            "rate_limited_count": 0,
            "avg_duration_ms": pytest.approx(20.0),
            "max_duration_ms": pytest.approx(30.0),
        },
        {
            "method": "b",
            "total_calls": 1,
            "success_count": 0,
            "failed_count": 0,
            "timeout_count": 1,
            "rate_limited_count": 0,
            "avg_duration_ms": pytest.approx(5.0),
            "max_duration_ms": pytest.approx(5.0),
        },
    ]


def test_sidebar_permission_callback(rf):
    from django.contrib.auth.models import AnonymousUser

    from django_rpc_audit.dashboard import can_view_rpc_logs

    request = rf.get("/")
    request.user = AnonymousUser()
    assert not can_view_rpc_logs(request)
    viewer = UserFactory(username="viewer", is_staff=True)
    viewer.user_permissions.add(Permission.objects.get(codename="view_rpclog"))
    request.user = viewer
    assert can_view_rpc_logs(request)
    request.user = UserFactory(username="plain-staff", is_staff=True)
    assert not can_view_rpc_logs(request)
