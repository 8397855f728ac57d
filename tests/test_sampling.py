"""Sampling: only fast successes are sampled; every problem is logged; stats scale back up."""

from __future__ import annotations

import time
import uuid

import pytest

from django_rpc_audit import get_rpc_client
from django_rpc_audit.conf import get_config
from django_rpc_audit.exceptions import RPCRemoteError, RPCTimeoutError
from django_rpc_audit.models import RPCLog
from django_rpc_audit.sampling import draw, is_sampled, sample_rate_for
from tests.factories import UserFactory

pytestmark = pytest.mark.django_db

NAMESPACE = uuid.UUID("0d6c4a52-5f55-4c1e-9a59-9e0f3b1f2a10")


def ids(count: int, tag: str = "") -> list[str]:
    """Fixed uuid-shaped correlation ids, so the sampled share is the same on every run."""
    return [str(uuid.uuid5(NAMESPACE, f"{tag}{n}")) for n in range(count)]


def test_the_draw_is_fixed_by_the_correlation_id_and_uniform():
    assert draw("abc") == draw("abc")
    draws = [draw(cid) for cid in ids(10_000)]
    assert all(0 <= value < 1 for value in draws)
    assert 0.48 < sum(value < 0.5 for value in draws) / len(draws) < 0.52
    assert 0.09 < sum(value < 0.1 for value in draws) / len(draws) < 0.11


def test_rate_bounds():
    assert all(is_sampled(cid, 1.0) for cid in ids(100))
    assert not any(is_sampled(cid, 0.0) for cid in ids(100))


def test_per_method_rates_exact_name_then_glob_then_default(rpc_settings):
    rpc_settings(SAMPLE_RATE=0.5, SAMPLE_RATES={"system.*": 0.1, "system.echo": 0.9})
    config = get_config()
    assert sample_rate_for(config, "system.echo") == 0.9
    assert sample_rate_for(config, "system.ping") == 0.1
    assert sample_rate_for(config, "send_notification") == 0.5


@pytest.fixture
def sampled_out(rpc_settings):
    """Nothing successful and fast is logged."""
    rpc_settings(SAMPLE_RATE=0.0, ALWAYS_LOG_SLOWER_THAN_MS=200)


@pytest.mark.usefixtures("sampled_out", "echo_handler")
def test_sampled_out_successes_write_nothing_but_signals_still_fire(signals):
    get_rpc_client().call("test.echo", {"a": 1})
    assert not RPCLog.objects.exists()
    assert len(signals.started) == len(signals.finished) == 1


@pytest.mark.usefixtures("sampled_out")
def test_failures_are_always_logged_whole(local_handler):
    def broken(params):
        raise RPCRemoteError("boom", "it broke")

    local_handler("test.broken", broken)
    with pytest.raises(RPCRemoteError):
        get_rpc_client().call("test.broken", {"order": 7})
    row = RPCLog.objects.get()
    # No pending row was written at the start; the finishing write makes the whole row.
    assert (row.status, row.error_code, row.params, row.sample_rate) == (
        "failed",
        "boom",
        {"order": 7},
        1.0,
    )


@pytest.mark.usefixtures("sampled_out")
def test_timeouts_and_slow_successes_are_always_logged(local_handler):
    local_handler("test.slow", lambda params: time.sleep(0.25) or {"done": True})
    get_rpc_client().call("test.slow")
    with pytest.raises(RPCTimeoutError):
        get_rpc_client().call("test.slow", timeout=0.05)
    rows = {row.status: row for row in RPCLog.objects.all()}
    assert set(rows) == {"success", "timeout"}
    assert rows["success"].duration_ms >= 200
    assert rows["success"].sample_rate == rows["timeout"].sample_rate == 1.0


def test_started_and_finished_agree_without_shared_state(local_handler, rpc_settings):
    rpc_settings(SAMPLE_RATE=0.5)
    seen_during_call: dict[str, bool] = {}

    def handler(params):
        seen_during_call[params["cid"]] = RPCLog.objects.filter(
            correlation_id=params["cid"]
        ).exists()
        return {}

    local_handler("test.peek", handler)
    for cid in ids(40):
        get_rpc_client().call("test.peek", {"cid": cid}, correlation_id=cid)
    kept = set(RPCLog.objects.values_list("correlation_id", flat=True))
    expected = {cid for cid in ids(40) if is_sampled(cid, 0.5)}
    assert kept == expected
    assert 0 < len(kept) < 40
    # A pending row existed during the call exactly for the calls that were kept.
    assert {cid for cid, seen in seen_during_call.items() if seen} == expected
    assert set(RPCLog.objects.values_list("sample_rate", flat=True)) == {0.5}


def test_stats_are_estimated_totals_under_sampling(local_handler, rpc_settings):
    rpc_settings(SAMPLE_RATE=0.25, SAMPLE_RATES={"test.rare": 1.0})
    local_handler("test.ok", lambda params: {})

    def broken(params):
        raise RPCRemoteError("boom", "no")

    local_handler("test.broken", broken)
    local_handler("test.rare", lambda params: {})
    user = UserFactory()
    client = get_rpc_client()
    for cid in ids(400, "ok"):
        client.call("test.ok", correlation_id=cid, user=user)
    for cid in ids(10, "broken"):
        with pytest.raises(RPCRemoteError):
            client.call("test.broken", correlation_id=cid, user=user)
    for cid in ids(3, "rare"):
        client.call("test.rare", correlation_id=cid, user=user)

    kept = sum(is_sampled(cid, 0.25) for cid in ids(400, "ok"))
    assert RPCLog.objects.for_method("test.ok").count() == kept < 150
    stats = {row["method"]: row for row in RPCLog.objects.stats_by_method()}
    assert stats["test.ok"]["total_calls"] == stats["test.ok"]["success_count"] == kept * 4
    assert abs(stats["test.ok"]["total_calls"] - 400) <= 60  # an estimate of the 400 calls
    assert (stats["test.broken"]["total_calls"], stats["test.broken"]["failed_count"]) == (10, 10)
    assert stats["test.rare"]["total_calls"] == 3
    [by_user] = RPCLog.objects.stats_by_user()
    assert by_user["total_calls"] == kept * 4 + 13
    assert by_user["failed_count"] == 10
