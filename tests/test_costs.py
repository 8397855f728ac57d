"""Cost tracking: the ``COSTS`` rules, the stored ``cost`` on every write path, sampling."""

from __future__ import annotations

import logging
import threading
import uuid
from decimal import Decimal
from typing import Any

import pytest
from django.core.exceptions import ImproperlyConfigured

from django_rpc_audit import get_rpc_client
from django_rpc_audit.conf import DjangoCfgRPCConfig, get_config
from django_rpc_audit.costs import CostCall, call_cost, cost_rule, is_costed
from django_rpc_audit.exceptions import RPCRemoteError
from django_rpc_audit.models import RPCLog
from django_rpc_audit.sampling import finished_sample_rate, started_is_logged
from django_rpc_audit.writers import BufferedLogWriter, IngestWorker, StreamLogWriter
from django_rpc_audit.writers.sink import call_log_id, record_finished
from tests.test_writers_stream import event

SEEN: list[CostCall] = []


def per_recipient(call: CostCall) -> Decimal:
    """A cost function: a cent per recipient, read from the stored params."""
    SEEN.append(call)
    return Decimal("0.01") * len(call.params["to"])


def broken(call: CostCall) -> Decimal:
    raise ZeroDivisionError("the pricing service is down")


def tokens(call: CostCall) -> Decimal:
    """More places than a cost keeps: rounded once, half to even."""
    return Decimal("0.0000025") * call.response["tokens"]


def free(call: CostCall) -> None:
    return None


def a_float(call: CostCall) -> float:
    return 0.1


COSTS = {
    "reports.generate": "5.00",
    "notify.*": "tests.test_costs.per_recipient",
    "notify.broken": "tests.test_costs.broken",
    "ai.complete": "tests.test_costs.tokens",
    "ai.free": "tests.test_costs.free",
    "ai.float": "tests.test_costs.a_float",
    "reports.*": "1",
}


@pytest.fixture
def costs(rpc_settings: Any) -> DjangoCfgRPCConfig:
    SEEN.clear()
    rpc_settings(COSTS=COSTS)
    return get_config()


# -- rules ------------------------------------------------------------------------------------


def test_exact_names_win_then_the_first_matching_glob(costs: DjangoCfgRPCConfig) -> None:
    assert cost_rule(costs, "reports.generate") == Decimal("5.00")
    assert cost_rule(costs, "reports.other") == Decimal("1")
    assert cost_rule(costs, "notify.broken") == "tests.test_costs.broken"
    assert cost_rule(costs, "notify.sms") == "tests.test_costs.per_recipient"
    assert cost_rule(costs, "system.ping") is None


def test_only_billable_outcomes_cost(costs: DjangoCfgRPCConfig, rpc_settings: Any) -> None:
    def cost(status: str) -> Decimal | None:
        return call_cost(get_config(), method="reports.generate", status=status, values=dict)

    assert cost("success") == Decimal("5.00")
    assert cost("failed") is None
    assert cost("timeout") is None
    rpc_settings(BILLABLE_STATUSES=["success", "failed"])
    assert cost("failed") == Decimal("5.00")
    assert cost("rate_limited") is None


def test_a_function_result_is_rounded_to_six_places_and_none_costs_nothing(
    costs: DjangoCfgRPCConfig,
) -> None:
    def cost(method: str, response: Any) -> Decimal | None:
        return call_cost(
            costs, method=method, status="success", values=lambda: call_values(response=response)
        )

    assert cost("ai.complete", {"tokens": 3}) == Decimal("0.000008")  # 0.0000075, half to even
    assert cost("ai.complete", {"tokens": 5}) == Decimal("0.000012")  # 0.0000125
    assert cost("ai.free", {}) is None


def call_values(**values: Any) -> dict[str, Any]:
    base = {
        "params": {},
        "response": None,
        "error_code": "",
        "duration_ms": 1.0,
        "user_id": None,
        "username": "",
    }
    return base | values


@pytest.mark.parametrize("method", ["notify.broken", "ai.float"])
def test_a_failing_function_is_logged_and_costs_nothing(
    costs: DjangoCfgRPCConfig, method: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="django_rpc_audit.costs"):
        assert call_cost(costs, method=method, status="success", values=call_values) is None
    assert method in caplog.text
    assert "kept without a cost" in caplog.text


@pytest.mark.parametrize(
    ("costs", "message"),
    [
        ({"a": 0.1}, "a price is a string, an int or a Decimal"),
        ({"a": "1.0000001"}, "more than 6 decimal places"),
        ({"a": "-1"}, "finite number >= 0"),
        ({"a": "NaN"}, "finite number >= 0"),
        ({"a": "1e20"}, "too large"),
        ({"a": "not a price"}, "is not a number"),
        ({"": "1"}, "must be a dict of method names"),
    ],
)
def test_bad_costs_are_refused_naming_the_key(costs: Any, message: str) -> None:
    with pytest.raises(ImproperlyConfigured, match="COSTS") as caught:
        DjangoCfgRPCConfig.from_mapping({"COSTS": costs})
    assert message in str(caught.value)


def test_one_dotted_path_prices_every_method_also_from_the_environment() -> None:
    config = DjangoCfgRPCConfig.from_mapping({"COSTS": "tests.test_costs.per_recipient"})
    assert config.costs == (("*", "tests.test_costs.per_recipient"),)
    env = DjangoCfgRPCConfig().with_environ(
        {"DJANGO_CFG_RPC__COSTS": "tests.test_costs.per_recipient"}
    )
    assert env.costs == config.costs
    env = DjangoCfgRPCConfig().with_environ({"DJANGO_CFG_RPC__COSTS": "a=0.50,b.*=x.y"})
    assert env.costs == (("a", Decimal("0.50")), ("b.*", "x.y"))


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"BILLABLE_STATUSES": ["pending"]}, "BILLABLE_STATUSES"),
        ({"BILLABLE_STATUSES": []}, "BILLABLE_STATUSES"),
        ({"ROLLUP_RETENTION_DAYS": -1}, "ROLLUP_RETENTION_DAYS"),
        ({"ROLLUP_SETTLE_SECONDS": float("inf")}, "ROLLUP_SETTLE_SECONDS"),
    ],
)
def test_bad_billing_and_rollup_settings_are_refused(values: dict[str, Any], message: str) -> None:
    with pytest.raises(ImproperlyConfigured, match=message):
        DjangoCfgRPCConfig.from_mapping(values)


# -- sampling ---------------------------------------------------------------------------------


def test_calls_that_may_cost_are_never_sampled_out(rpc_settings: Any) -> None:
    rpc_settings(SAMPLE_RATE=0.0, COSTS={"reports.*": "2.50"})
    config = get_config()
    for _n in range(200):
        call = {"correlation_id": str(uuid.uuid4()), "method": "reports.generate"}
        assert started_is_logged(config, call)
        assert finished_sample_rate(config, {**call, "status": "success"}) == 1.0
        free_call = {"correlation_id": call["correlation_id"], "method": "system.ping"}
        assert finished_sample_rate(config, {**free_call, "status": "success"}) is None
    assert is_costed(config, "reports.generate", "success")
    assert not is_costed(config, "reports.generate", "failed")


@pytest.mark.django_db
def test_real_calls_store_their_cost_and_the_function_sees_redacted_params(
    costs: DjangoCfgRPCConfig, rpc_settings: Any, local_handler: Any
) -> None:
    rpc_settings(SAMPLE_RATE=0.0)  # only what must be kept is kept
    local_handler("reports.generate", lambda params: {"url": "/r/1"})
    local_handler("notify.email", lambda params: {"sent": len(params["to"])})
    local_handler("system.ping", lambda params: {"pong": True})

    def refuse(params: Any) -> None:
        raise RPCRemoteError("E", "no")

    local_handler("reports.refused", refuse)
    client = get_rpc_client()
    client.call("reports.generate", {})
    client.call("notify.email", {"to": ["a@x", "b@x", "c@x"], "password": "hunter2"})
    client.call("system.ping", {})
    with pytest.raises(RPCRemoteError):
        client.call("reports.refused", {})
    costs_by_method = dict(RPCLog.objects.values_list("method", "cost"))
    assert costs_by_method == {
        "reports.generate": Decimal("5.000000"),
        "notify.email": Decimal("0.030000"),
        "reports.refused": None,  # failed: not billable, logged as every failure
    }
    assert RPCLog.objects.get(method="notify.email").sample_rate == 1.0
    (seen,) = SEEN
    assert seen.params["password"] != "hunter2"
    assert seen.method == "notify.email"
    assert seen.status == "success"


# -- every write path stores it ---------------------------------------------------------------


def billed_events() -> list[dict[str, Any]]:
    return [
        event(1, method="reports.generate"),
        event(2, method="notify.sms", params={"n": 2, "to": ["a", "b"]}),
        event(3, method="system.ping"),
        event(4, method="reports.generate", status="failed", response=None, error_code="E"),
        event(5, method="notify.broken", params={"n": 5, "to": []}),
    ]


EXPECTED = {
    1: Decimal("5.000000"),
    2: Decimal("0.020000"),
    3: None,
    4: None,
    5: None,
}


def stored_costs() -> dict[int, Decimal | None]:
    return {row.params["n"]: row.cost for row in RPCLog.objects.all()}


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("costs")
def test_the_buffered_writer_stores_costs_in_its_batch_path() -> None:
    # COPY on PostgreSQL, multi-row upserts on MySQL / MariaDB, bulk_create on SQLite.
    writer = BufferedLogWriter(background=False)
    for e in billed_events():
        writer.finished(e)
    assert writer.flush()
    assert stored_costs() == EXPECTED


@pytest.mark.django_db
@pytest.mark.usefixtures("costs")
def test_the_sync_writer_stores_costs_on_insert_and_on_update() -> None:
    events = billed_events()
    # The first is completed over its pending row (UPDATE), the others inserted whole.
    RPCLog.objects.create(
        id=call_log_id(events[0]["correlation_id"], events[0]["started_at"]),
        correlation_id=events[0]["correlation_id"],
        method="reports.generate",
        params={"n": 1},
        created_at=events[0]["started_at"],
    )
    for e in events:
        record_finished(RPCLog.objects.all(), **e)
    assert stored_costs() == EXPECTED


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("costs")
def test_the_stream_carries_the_cost_to_the_ingest_worker(redis_url: str) -> None:
    stream = f"rpc_audit_test:{uuid.uuid4().hex}:log"
    writer = StreamLogWriter(redis_url=redis_url, stream=stream, maxlen=1000, background=False)
    for e in billed_events():
        writer.finished(e)
    assert writer.flush()
    worker = IngestWorker(redis_url=redis_url, stream=stream, group="g", block_ms=50)
    try:
        done = threading.Event()

        def stop_when_done(stats: Any) -> None:
            if stats.acked >= 5:
                done.set()
                worker.stop()

        worker.stats_interval = 0.05
        thread = threading.Thread(target=worker.run, kwargs={"on_stats": stop_when_done})
        thread.start()
        thread.join(60)
        assert done.is_set()
    finally:
        worker._client.delete(stream, f"{stream}:dead")
    assert stored_costs() == EXPECTED


def test_a_full_buffer_keeps_a_costed_success_like_a_failure(rpc_settings: Any) -> None:
    rpc_settings(COSTS={"reports.*": "1"})
    writer = BufferedLogWriter(background=False, buffer_size=2)
    writer.finished(event(1, method="system.ping"))
    writer.finished(event(2, method="system.ping"))
    writer.finished(event(3, method="reports.generate"))  # evicts a free success
    writer.finished(event(4, method="reports.generate"))  # evicts the other
    writer.finished(event(5, method="system.ping"))  # no room: dropped
    kept = sorted(e["params"]["n"] for _, e in writer._buffer.values())
    assert kept == [3, 4]
    assert writer.stats().dropped == 3
