"""Manual logging: RPCLogger and RPCLogContext."""

from __future__ import annotations

import logging
import uuid
from decimal import Decimal

import pytest

from django_rpc_audit import RPCLogContext, RPCLogger, rpc_context
from django_rpc_audit.exceptions import RPCRemoteError, RPCTimeoutError
from django_rpc_audit.models import RPCLog
from tests.factories import UserFactory

pytestmark = pytest.mark.django_db


def test_create_log_then_mark_success():
    user = UserFactory()
    log = RPCLogger.create_log(
        "cid-1", "legacy.sync", {"batch": 7}, user=user, caller_ip="10.0.0.4"
    )
    assert log is not None
    assert RPCLog.objects.get().status == "pending"
    RPCLogger.mark_success(log, {"synced": 3}, duration_ms=12.5)
    stored = RPCLog.objects.get()
    assert (stored.status, stored.response, stored.duration_ms) == ("success", {"synced": 3}, 12.5)
    assert (stored.user, stored.caller_ip, stored.correlation_id) == (user, "10.0.0.4", "cid-1")
    assert stored.completed_at is not None
    assert log.status == "success"  # the instance is kept in step


def test_mark_failed_and_mark_timeout():
    failed = RPCLogger.create_log("cid-2", "m", {})
    timed_out = RPCLogger.create_log("cid-3", "m", {})
    RPCLogger.mark_failed(failed, "user_offline", "not connected", 3.0)
    RPCLogger.mark_timeout(timed_out, 30_000)
    assert RPCLog.objects.get(correlation_id="cid-2").error_code == "user_offline"
    stored = RPCLog.objects.get(correlation_id="cid-3")
    assert (stored.status, stored.duration_ms) == ("timeout", 30_000)


def test_mark_methods_accept_none():
    RPCLogger.mark_success(None, {}, 1.0)
    RPCLogger.mark_failed(None, "x", "y", 1.0)
    RPCLogger.mark_timeout(None, 1.0)
    assert not RPCLog.objects.exists()


def test_create_log_returns_none_when_logging_is_off(rpc_settings):
    rpc_settings(ENABLE_LOGGING=False)
    assert RPCLogger.create_log("cid", "m", {}) is None
    assert not RPCLog.objects.exists()


def test_create_log_swallows_database_errors(monkeypatch, caplog):
    from django_rpc_audit.writers import sink

    def refuse(queryset, **kwargs):
        raise RuntimeError("database said no")

    monkeypatch.setattr(sink, "record_started", refuse)
    with caplog.at_level(logging.ERROR, logger="django_rpc_audit.manual"):
        assert RPCLogger.create_log("cid", "m", {}) is None
    assert "database said no" in caplog.text


def test_log_context_records_success_with_context_attribution():
    user = UserFactory()
    with (
        rpc_context(user=user, caller_ip="10.9.9.9", user_agent="worker"),
        RPCLogContext(uuid.uuid4(), "legacy.sync", {"batch": 1}) as log_ctx,
    ):
        log_ctx.set_response({"ok": True})
    stored = RPCLog.objects.get()
    assert (stored.status, stored.response) == ("success", {"ok": True})
    assert (stored.user, stored.caller_ip, stored.user_agent) == (user, "10.9.9.9", "worker")
    assert stored.duration_ms >= 0


@pytest.mark.parametrize(
    ("exc", "status", "code"),
    [
        (RPCTimeoutError("late", timeout=1), "timeout", "timeout"),
        (TimeoutError("late"), "timeout", "timeout"),
        (RPCRemoteError("user_offline", "gone"), "failed", "user_offline"),
        (KeyError("batch"), "failed", "KeyError"),
    ],
)
def test_log_context_records_the_exception_and_reraises(exc, status, code):
    with pytest.raises(type(exc)), RPCLogContext("cid", "legacy.sync", {}):
        raise exc
    stored = RPCLog.objects.get()
    assert (stored.status, stored.error_code) == (status, code)


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_log_context_works_with_async_with():
    async with RPCLogContext("cid-async", "m", {}) as log_ctx:
        log_ctx.set_response({"n": 1})
    stored = await RPCLog.objects.aget()
    assert (stored.status, stored.response) == ("success", {"n": 1})


def test_a_uuid_correlation_id_is_stored_as_the_client_writes_it():
    """Lower case with dashes, as ``RPCClient`` sends it: the admin's search finds both alike."""
    correlation_id = uuid.uuid4()
    RPCLogger.create_log(str(correlation_id).upper(), "legacy.sync", {})
    with RPCLogContext(correlation_id.hex, "legacy.sync", {}):
        pass
    assert (
        list(RPCLog.objects.values_list("correlation_id", flat=True)) == [str(correlation_id)] * 2
    )
    RPCLogger.create_log("cid-7", "legacy.sync", {})  # not a UUID: kept as given
    assert RPCLog.objects.filter(correlation_id="cid-7").exists()


def test_manually_logged_calls_store_their_cost(rpc_settings):
    rpc_settings(COSTS={"legacy.report": "2.50", "legacy.notify": "tests.test_costs.per_recipient"})
    report = RPCLogger.create_log("cid-c1", "legacy.report", {})
    notify = RPCLogger.create_log("cid-c2", "legacy.notify", {"to": ["a", "b", "c"]})
    failed = RPCLogger.create_log("cid-c3", "legacy.report", {})
    RPCLogger.mark_success(report, {"ok": True}, duration_ms=3.0)
    RPCLogger.mark_success(notify, {"sent": 3}, duration_ms=3.0)
    RPCLogger.mark_failed(failed, "E", "no", 3.0)
    costs = dict(RPCLog.objects.values_list("correlation_id", "cost"))
    assert costs == {"cid-c1": Decimal("2.5"), "cid-c2": Decimal("0.03"), "cid-c3": None}
    assert report.cost == Decimal("2.50")
