"""RPCLogQuerySet: chainable filters and stats_by_method on the real database."""

from __future__ import annotations

import random
from datetime import timedelta

import pytest
from django.db import connection
from django.db.models import Q
from django.utils import timezone

from django_rpc_audit.models import RPCLog
from django_rpc_audit.querysets import percentile_cont
from tests.factories import RPCLogFactory, UserFactory

pytestmark = pytest.mark.django_db


def test_filters_chain_from_the_manager():
    user = UserFactory()
    RPCLogFactory(user=user)
    RPCLogFactory(user=user, created_at=timezone.now() - timedelta(hours=30))
    RPCLogFactory()
    assert RPCLog.objects.filter(user=user).recent(hours=24).count() == 1
    assert RPCLog.objects.recent(hours=48).for_user(user).count() == 2


def test_status_filters():
    for status in ("success", "success", "failed", "timeout", "pending"):
        RPCLogFactory(status=status)
    assert RPCLog.objects.succeeded().count() == 2
    assert RPCLog.objects.failed().count() == 1
    assert RPCLog.objects.timed_out().count() == 1
    assert RPCLog.objects.pending().count() == 1


def test_slow_for_method_and_for_user():
    alice = UserFactory()
    RPCLogFactory(method="a", duration_ms=5, user=alice)
    RPCLogFactory(method="a", duration_ms=1500)
    RPCLogFactory(method="b", duration_ms=2500)
    assert RPCLog.objects.slow().count() == 2
    assert RPCLog.objects.slow(ms=2000).get().method == "b"
    assert RPCLog.objects.for_method("a").count() == 2
    assert RPCLog.objects.for_user(alice).get().duration_ms == 5
    assert RPCLog.objects.for_user(alice.pk).count() == 1
    assert RPCLog.objects.for_user(None).count() == 2


def test_recent_rejects_nonsense():
    with pytest.raises(ValueError, match="hours"):
        RPCLog.objects.recent(hours=0)


def test_stats_by_method_counts_and_orders():
    RPCLogFactory.create_batch(3, method="busy", status="success", duration_ms=10)
    RPCLogFactory(method="busy", status="failed", duration_ms=30)
    RPCLogFactory(method="busy", status="timeout", duration_ms=5000)
    RPCLogFactory(method="busy", status="pending", duration_ms=None)
    RPCLogFactory(method="busy", status="rate_limited", duration_ms=None)
    RPCLogFactory(method="quiet", status="success", duration_ms=2)

    stats = RPCLog.objects.stats_by_method()

    assert [row["method"] for row in stats] == ["busy", "quiet"]
    busy = stats[0]
    assert (
        busy["total_calls"],
        busy["success_count"],
        busy["failed_count"],
        busy["timeout_count"],
        busy["rate_limited_count"],
    ) == (7, 3, 1, 1, 1)
    assert busy["avg_duration_ms"] == pytest.approx((10 * 3 + 30 + 5000) / 5)
    assert busy["p95_duration_ms"] == pytest.approx(percentile_cont([10, 10, 10, 30, 5000], 0.95))
    assert set(busy) == {
        "method",
        "total_calls",
        "success_count",
        "failed_count",
        "timeout_count",
        "rate_limited_count",
        "avg_duration_ms",
        "p95_duration_ms",
    }


def test_stats_by_method_p95_is_exact_on_every_backend():
    rng = random.Random(7)
    durations = [rng.uniform(0.1, 900) for _ in range(257)]
    for duration in durations:
        RPCLogFactory(method="m", duration_ms=duration)
    (row,) = RPCLog.objects.stats_by_method()
    expected = percentile_cont(sorted(durations), 0.95)
    assert row["p95_duration_ms"] == pytest.approx(expected, rel=1e-9)


def test_stats_by_method_respects_filters():
    RPCLogFactory(method="old", created_at=timezone.now() - timedelta(days=3))
    RPCLogFactory(method="new")
    assert [row["method"] for row in RPCLog.objects.recent(hours=24).stats_by_method()] == ["new"]


def test_stats_of_a_method_with_only_pending_calls():
    RPCLogFactory(method="inflight", status="pending", duration_ms=None)
    (row,) = RPCLog.objects.stats_by_method()
    assert row["avg_duration_ms"] is None
    assert row["p95_duration_ms"] is None


@pytest.mark.parametrize(
    ("values", "fraction", "expected"),
    [
        ([], 0.95, None),
        ([4.0], 0.95, 4.0),
        ([1.0, 2.0], 0.5, 1.5),
        ([1.0, 2.0, 3.0, 4.0], 0.95, 3.85),
    ],
)
def test_percentile_cont_matches_postgres_definition(values, fraction, expected):
    assert percentile_cont(values, fraction) == pytest.approx(expected)


@pytest.mark.skipif(connection.vendor != "postgresql", reason="EXPLAIN plans are PostgreSQL's")
@pytest.mark.parametrize(
    ("queryset", "index"),
    [
        (lambda: RPCLog.objects.recent(hours=1), "rpclog_created_idx"),
        # The partial index of unsuccessful calls serves every status but success.
        (lambda: RPCLog.objects.recent(hours=1).failed(), "rpclog_unsuccess_created_idx"),
        (lambda: RPCLog.objects.recent(hours=1).timed_out(), "rpclog_unsuccess_created_idx"),
        (lambda: RPCLog.objects.recent(hours=1).unsuccessful(), "rpclog_unsuccess_created_idx"),
        (RPCLog.objects.stale, "rpclog_unsuccess_created_idx"),
        (lambda: RPCLog.objects.failed().order_by("-created_at")[:50], "rpclog_unsuccess_"),
        (lambda: RPCLog.objects.order_by("-created_at")[:100], "rpclog_created_idx"),
        (lambda: RPCLog.objects.recent(hours=1).for_method("m"), "rpclog_method_created_idx"),
        (lambda: RPCLog.objects.recent(hours=1).for_user(1), "rpclog_user_created_idx"),
        (lambda: RPCLog.objects.filter(correlation_id="x"), "rpclog_correlation_hash"),
        (lambda: RPCLog.objects.filter(trace_id="x"), "rpclog_traced_idx"),
        # The admin's search for 32 hex digits: a trace id or a correlation id, both indexed.
        (
            lambda: RPCLog.objects.filter(Q(trace_id="x") | Q(correlation_id="x")),
            "rpclog_traced_idx",
        ),
        (
            lambda: RPCLog.objects.filter(Q(trace_id="x") | Q(correlation_id="x")),
            "rpclog_correlation_hash",
        ),
    ],
)
def test_documented_queries_use_their_index(queryset, index):
    with connection.cursor() as cursor:
        # With few rows the planner rightly prefers a scan; forbid it to see which index serves.
        cursor.execute("SET LOCAL enable_seqscan = off")
        plan = queryset().explain()
    assert index in plan


def test_stats_by_user_counts_per_user_and_anonymous():
    alice, bob = UserFactory(username="alice"), UserFactory(username="bob")
    RPCLogFactory.create_batch(2, user=alice, status="success", caller_ip="10.0.0.1")
    RPCLogFactory(user=alice, status="failed", caller_ip="10.0.0.2")
    RPCLogFactory(user=bob, status="timeout")
    RPCLogFactory(user=None, status="success")

    stats = RPCLog.objects.stats_by_user()

    assert [row["username"] for row in stats] == ["alice", None, "bob"]
    assert stats[0] == {
        "user_id": alice.pk,
        "username": "alice",
        "total_calls": 3,
        "success_count": 2,
        "failed_count": 1,
        "timeout_count": 0,
        "rate_limited_count": 0,
        "caller_ip_count": 2,
    }
    assert stats[2]["timeout_count"] == 1
    assert RPCLog.objects.failed().stats_by_user()[0]["total_calls"] == 1


def test_rate_limited_filter_and_counts():
    alice = UserFactory(username="alice")
    RPCLogFactory(user=alice, status="success")
    refused = RPCLogFactory.create_batch(2, user=alice, status="rate_limited", duration_ms=None)
    RPCLogFactory(status="failed")
    assert set(RPCLog.objects.rate_limited()) == set(refused)
    assert RPCLog.objects.for_user(alice).rate_limited().count() == 2
    (row,) = [r for r in RPCLog.objects.stats_by_user() if r["username"] == "alice"]
    assert (row["total_calls"], row["success_count"], row["rate_limited_count"]) == (3, 1, 2)
