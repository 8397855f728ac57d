"""Exact percentiles over window functions: PostgreSQL's ``percentile_cont`` on any database."""

from __future__ import annotations

from typing import Any

import pytest
from django.db import connection
from django.db.models import F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from django_rpc_audit.models import RPCLog
from django_rpc_audit.percentiles import group_key, window_percentiles
from django_rpc_audit.querysets import PercentileCont, percentile_cont
from tests.factories import RPCLogFactory

pytestmark = pytest.mark.django_db

_durations = st.lists(
    st.one_of(
        st.floats(min_value=0, max_value=1e7, allow_nan=False),
        st.sampled_from([0.0, 1.5, 2.0, 1000.0]),  # ties
        st.none(),  # pending calls: left out
    ),
    max_size=40,
)
_fractions = st.lists(
    st.one_of(st.floats(min_value=0, max_value=1), st.sampled_from([0, 0.29, 0.5, 0.95, 1])),
    min_size=1,
    max_size=4,
)


def store(durations_by_method: dict[str, list[float | None]]) -> None:
    RPCLog.objects.bulk_create(
        RPCLogFactory.build(method=method, duration_ms=duration)
        for method, durations in durations_by_method.items()
        for duration in durations
    )


def stored_durations(method: str | None = None) -> list[float]:
    """The durations as the database gives them back, sorted."""
    rows = RPCLog.objects.filter(duration_ms__isnull=False)
    if method is not None:
        rows = rows.filter(method=method)
    return sorted(rows.values_list("duration_ms", flat=True))


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(durations=_durations, fractions=_fractions)
def test_equal_to_percentile_cont_over_every_row(durations: list[Any], fractions: list[float]):
    store({"m": durations})
    try:
        expected = [percentile_cont(stored_durations(), f) for f in fractions]
        result = window_percentiles(RPCLog.objects.all(), "duration_ms", fractions)
        if any(d is not None for d in durations):
            assert result == {None: expected}
        else:
            assert result == {}
        if connection.vendor == "postgresql":  # and to the database's own aggregate
            aggregates = {str(n): PercentileCont("duration_ms", f) for n, f in enumerate(fractions)}
            row = RPCLog.objects.aggregate(**aggregates)
            assert [row[str(n)] for n in range(len(fractions))] == expected
    finally:
        RPCLog.objects.all().delete()


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(groups=st.dictionaries(st.sampled_from(["a", "b", "c.d"]), _durations, max_size=3))
def test_one_result_per_group_from_one_query(groups: dict[str, list[Any]]):
    store(groups)
    try:
        result = window_percentiles(
            RPCLog.objects.all(), "duration_ms", [0.5, 0.95], group_by=F("method")
        )
        expected = {
            method: [percentile_cont(stored_durations(method), f) for f in (0.5, 0.95)]
            for method, durations in groups.items()
            if any(d is not None for d in durations)
        }
        assert result == expected
    finally:
        RPCLog.objects.all().delete()


def test_the_queryset_filters_apply():
    store({"kept": [1.0, 2.0, 3.0], "other": [100.0]})
    result = window_percentiles(RPCLog.objects.filter(method="kept"), "duration_ms", [1])
    assert result == {None: [3.0]}


def test_fractions_out_of_range_are_refused():
    with pytest.raises(ValueError, match="between 0 and 1"):
        window_percentiles(RPCLog.objects.all(), "duration_ms", [1.5])


def test_stats_by_method_pairs_each_group_with_its_own_percentile():
    """The p95 of each row is that of exactly the calls its counts count, however the
    database groups names: MySQL's default collation makes "Ping" and "ping" one method."""
    store({"Ping": [1.0, 2.0, 3.0], "ping": [100.0, 200.0], "other": [5.0]})
    stats = RPCLog.objects.stats_by_method()
    for item in stats:
        same_group = RPCLog.objects.filter(method=item["method"])  # compared as GROUP BY does
        assert item["total_calls"] == same_group.count()
        durations = sorted(same_group.values_list("duration_ms", flat=True))
        assert item["p95_duration_ms"] == percentile_cont(durations, 0.95)
    merged = connection.vendor == "mysql"
    assert len(stats) == (2 if merged else 3)
    # The dashboard's per-method table groups the same way.
    calls = RPCLog.objects.calls_by_method()
    assert [(c["method"].lower(), c["total_calls"]) for c in calls] == [
        (item["method"].lower(), item["total_calls"]) for item in stats
    ]


def test_the_group_key_is_the_collation_key_on_mysql():
    key = group_key("method", "default")
    assert (type(key).__name__ == "WeightString") is (connection.vendor == "mysql")
