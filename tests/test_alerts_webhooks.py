"""Webhooks on failed, timed-out and slow calls: outbox, signatures, payload, retries, storm.

Every request goes to a real HTTP endpoint on loopback (``tests/webhook_receiver.py``) and
every signature is verified with the independent ``standardwebhooks`` package. Delivery runs
with ``deliver_due()`` in the test's thread, so the rows it reads are the test's own; the
background thread and other processes are tested in ``test_alerts_processes.py``.
"""

from __future__ import annotations

import base64
import os
import time
import uuid
from datetime import timedelta
from typing import Any

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.utils import timezone
from standardwebhooks import Webhook, WebhookVerificationError

from django_rpc_audit import get_rpc_client
from django_rpc_audit.alerts.delivery import deliver_due, retry_delay
from django_rpc_audit.alerts.models import (
    DeliveryKind,
    DeliveryState,
    WebhookDelivery,
    WebhookEndpointState,
)
from django_rpc_audit.conf import DjangoCfgRPCConfig, get_config
from django_rpc_audit.exceptions import RPCRemoteError
from django_rpc_audit.models import RPCLog
from django_rpc_audit.writers import BufferedLogWriter, use_writer
from tests.factories import UserFactory, staff_client

SECRET = "whsec_" + base64.b64encode(os.urandom(32)).decode()


def failing(params: dict[str, Any]) -> dict[str, Any]:
    raise RPCRemoteError("user_offline", f"User {params.get('user_id')} is offline; token=abc123")


@pytest.fixture
def endpoint_name() -> str:
    return f"ops-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def hooks(
    rpc_settings, webhook_receiver, endpoint_name, local_handler, redis_url, clean_storm_windows
):
    """One endpoint on the receiver, for every event and method; returns a configure function."""
    local_handler("send_notification", failing)
    local_handler("test.ok", lambda params: {"ok": True, "password": "hunter2"})

    def configure(**endpoint: Any) -> dict[str, Any]:
        entry = {"NAME": endpoint_name, "URL": webhook_receiver.url, "SECRET": SECRET}
        entry.update(endpoint)
        return rpc_settings(
            REDIS_URL=redis_url,
            WEBHOOKS=[entry],
            WEBHOOK_RETRY_SCHEDULE=[0.05, 0.05, 0.05],
            WEBHOOK_GROUP_WINDOW_SECONDS=30,
            ADMIN_BASE_URL="https://ops.example.com",
        )

    configure()
    return configure


def fail_call(client: Any = None, **kwargs: Any) -> None:
    with pytest.raises(RPCRemoteError):
        (client or get_rpc_client()).call("send_notification", {"user_id": "7"}, **kwargs)


def events() -> Any:
    return WebhookDelivery.objects.filter(kind=DeliveryKind.EVENT)


def deliver_until_idle(timeout: float = 10.0, *, digests: bool = False) -> list[Any]:
    """Run delivery passes until no event (``digests``: no row at all) is pending any more."""
    reports = []
    deadline = time.monotonic() + timeout
    waiting = WebhookDelivery.objects.all() if digests else events()
    while time.monotonic() < deadline:
        reports.append(deliver_due())
        if not waiting.filter(state=DeliveryState.PENDING).exists():
            break
        time.sleep(0.02)
    return reports


# -- settings -------------------------------------------------------------------------------------


def test_endpoints_are_parsed_with_defaults() -> None:
    config = DjangoCfgRPCConfig.from_mapping(
        {"WEBHOOKS": [{"NAME": "ops", "URL": "https://hooks.example.com/x", "SECRET": SECRET}]}
    )
    (endpoint,) = config.webhooks
    assert endpoint.events == ("rpc.failed", "rpc.timeout", "rpc.slow")
    assert endpoint.methods == ("*",)
    assert endpoint.wants("rpc.failed", "anything")
    assert not endpoint.include_params
    assert not endpoint.include_user_email
    assert SECRET not in repr(endpoint)
    assert "hooks.example.com" not in repr(endpoint)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"URL": "https://h.example.com", "SECRET": SECRET}, "NAME"),
        ({"NAME": "a", "URL": "ftp://h.example.com", "SECRET": SECRET}, "URL"),
        ({"NAME": "a", "URL": "https://h.example.com", "SECRET": "plain"}, "SECRET"),
        ({"NAME": "a", "URL": "https://h.example.com", "SECRET": "whsec_c2hvcnQ="}, "24 to 64"),
        (
            {"NAME": "a", "URL": "https://h.example.com", "SECRET": SECRET, "EVENTS": ["x"]},
            "EVENTS",
        ),
        (
            {"NAME": "a", "URL": "https://h.example.com", "SECRET": SECRET, "FORMAT": "xml"},
            "FORMAT",
        ),
        ({"NAME": "a", "URL": "https://h.example.com", "SECRET": SECRET, "COLOR": 1}, "COLOR"),
    ],
)
def test_invalid_endpoints_name_the_key(entry: dict[str, Any], message: str) -> None:
    with pytest.raises(ImproperlyConfigured, match=message) as info:
        DjangoCfgRPCConfig.from_mapping({"WEBHOOKS": [entry]})
    assert "WEBHOOKS" in str(info.value)
    assert SECRET not in str(info.value)


def test_duplicate_endpoint_names_are_refused() -> None:
    entry = {"NAME": "a", "URL": "https://h.example.com", "SECRET": SECRET}
    with pytest.raises(ImproperlyConfigured, match="duplicate"):
        DjangoCfgRPCConfig.from_mapping({"WEBHOOKS": [entry, entry]})


def test_a_slack_endpoint_needs_no_secret() -> None:
    config = DjangoCfgRPCConfig.from_mapping(
        {"WEBHOOKS": [{"NAME": "chat", "URL": "https://hooks.slack.com/T/B/x", "FORMAT": "slack"}]}
    )
    assert config.webhooks[0].key == b""


def test_retry_schedule_from_the_environment(rpc_env) -> None:
    rpc_env("WEBHOOK_RETRY_SCHEDULE", "1,2.5,10")
    assert get_config().webhook_retry_schedule == (1.0, 2.5, 10.0)


# -- the outbox -------------------------------------------------------------------------------


@pytest.mark.django_db
def test_failed_call_is_delivered_signed_with_a_standard_webhooks_body(hooks, webhook_receiver):
    user = UserFactory(username="alice", email="alice@example.com")
    fail_call(user=user)
    log = RPCLog.objects.get()
    (row,) = WebhookDelivery.objects.all()
    assert row.log_id == log.pk
    assert row.state == DeliveryState.PENDING
    report = deliver_due()
    assert report.delivered == 1
    (request,) = webhook_receiver.requests
    (verified,) = webhook_receiver.verified(SECRET)  # raises unless the signature is right
    assert request.headers["webhook-id"] == f"msg_{row.id.hex}"
    assert abs(int(request.headers["webhook-timestamp"]) - time.time()) < 300
    assert request.headers["webhook-signature"].startswith("v1,")
    assert set(verified) == {"type", "timestamp", "data"}
    assert verified["type"] == "rpc.failed"
    data = verified["data"]
    assert data["method"] == "send_notification"
    assert data["status"] == "failed"
    assert data["error_code"] == "user_offline"
    assert "abc123" not in data["error_message"]  # redacted like the row
    assert data["error_message"] == log.error_message
    assert data["correlation_id"] == log.correlation_id
    assert data["duration_ms"] == pytest.approx(log.duration_ms)
    assert data["user"] == {"id": str(user.pk), "username": "alice"}  # no e-mail by default
    assert data["started_at"]
    assert data["completed_at"]
    assert data["admin_url"] == (
        f"https://ops.example.com/admin/django_rpc_audit/rpclog/{log.pk}/change/"
    )
    assert "params" not in data
    assert "response" not in data
    row.refresh_from_db()
    assert (row.state, row.attempts, row.last_status_code) == (DeliveryState.DELIVERED, 1, 200)


@pytest.mark.django_db
def test_a_tampered_body_fails_verification(hooks, webhook_receiver):
    fail_call()
    deliver_due()
    (request,) = webhook_receiver.requests
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(request.body.replace(b"failed", b"fixed!"), request.headers)
    other = "whsec_" + base64.b64encode(os.urandom(32)).decode()
    with pytest.raises(WebhookVerificationError):
        Webhook(other).verify(request.body, request.headers)


@pytest.mark.django_db
def test_params_email_only_when_the_endpoint_opts_in_and_then_redacted(hooks, webhook_receiver):
    hooks(INCLUDE_PARAMS=True, INCLUDE_USER_EMAIL=True)
    user = UserFactory(username="bob", email="bob@example.com")
    with pytest.raises(RPCRemoteError):
        get_rpc_client().call("send_notification", {"user_id": "1", "api_key": "k-123"}, user=user)
    deliver_due()
    (verified,) = webhook_receiver.verified(SECRET)
    assert verified["data"]["params"] == {"user_id": "1", "api_key": "***"}
    assert verified["data"]["user"]["email"] == "bob@example.com"


@pytest.mark.django_db
def test_huge_input_still_makes_a_body_under_20_kb(hooks, webhook_receiver, local_handler):
    hooks(INCLUDE_PARAMS=True, INCLUDE_RESPONSE=True)

    def huge_failure(params: dict[str, Any]) -> dict[str, Any]:
        raise RPCRemoteError("boom", "x" * 1_000_000)

    local_handler("send_notification", huge_failure)
    with pytest.raises(RPCRemoteError):
        get_rpc_client().call("send_notification", {"blob": "é" * 500_000, "deep": [[[[1]]]] * 999})
    deliver_due()
    (request,) = webhook_receiver.requests
    assert len(request.body) < 20_000
    (verified,) = webhook_receiver.verified(SECRET)
    assert verified["data"]["params"]["_truncated"] is True
    assert len(verified["data"]["error_message"].encode()) <= 2_048


@pytest.mark.django_db
def test_filters_by_event_and_method_glob(hooks, rpc_settings, webhook_receiver, local_handler):
    local_handler("billing.charge", failing)
    settings = hooks(METHODS=["billing.*"], EVENTS=["rpc.timeout"])
    second = {**settings["WEBHOOKS"][0], "NAME": settings["WEBHOOKS"][0]["NAME"] + "-b"}
    second.update(METHODS=["billing.*"], EVENTS=["rpc.failed"])
    rpc_settings(WEBHOOKS=[settings["WEBHOOKS"][0], second])
    fail_call()  # send_notification: neither endpoint
    with pytest.raises(RPCRemoteError):
        get_rpc_client().call("billing.charge")
    assert list(WebhookDelivery.objects.values_list("endpoint", "event")) == [
        (second["NAME"], "rpc.failed")
    ]


@pytest.mark.django_db
def test_successful_calls_and_no_endpoints_queue_nothing(hooks, rpc_settings):
    get_rpc_client().call("test.ok")
    assert not WebhookDelivery.objects.exists()
    rpc_settings(WEBHOOKS=[])
    fail_call()
    assert RPCLog.objects.filter(status="failed").count() == 1
    assert not WebhookDelivery.objects.exists()


@pytest.mark.django_db
def test_a_rolled_back_log_row_leaves_no_alert(hooks):
    from django.db import transaction

    def view() -> None:
        with transaction.atomic():
            fail_call()
            assert WebhookDelivery.objects.count() == 1
            raise RuntimeError("the request's transaction fails")

    with pytest.raises(RuntimeError):
        view()
    assert not RPCLog.objects.exists()
    assert not WebhookDelivery.objects.exists()


@pytest.mark.django_db
def test_the_buffered_writer_queues_alerts_with_its_batch(hooks, webhook_receiver):
    writer = BufferedLogWriter(background=False)
    with use_writer(writer):
        for _ in range(3):
            fail_call()
        get_rpc_client().call("test.ok")
        assert not WebhookDelivery.objects.exists()  # nothing written before the batch
        assert writer.flush()
        writer.flush()  # a retried batch adds no duplicate alert
    assert RPCLog.objects.count() == 4
    assert WebhookDelivery.objects.filter(kind=DeliveryKind.EVENT).count() == 3


@pytest.mark.django_db
def test_an_outbox_failure_never_costs_the_log_row(hooks, monkeypatch, caplog):
    def broken(*args: Any, **kwargs: Any) -> None:
        from django.db import DatabaseError

        raise DatabaseError("relation does not exist")

    # The sync writer completes rows with update()/create(); only the outbox uses bulk_create.
    monkeypatch.setattr("django.db.models.query.QuerySet.bulk_create", broken)
    fail_call()
    assert RPCLog.objects.get().status == "failed"
    assert "Could not queue" in caplog.text


# -- delivery: retries, give-up, 410, Retry-After ---------------------------------------------


@pytest.mark.django_db
def test_500_twice_then_200_sends_the_same_webhook_id_three_times(hooks, webhook_receiver):
    webhook_receiver.answers = [500, 500]
    fail_call()
    deliver_until_idle()
    requests = webhook_receiver.requests
    assert len(requests) == 3
    assert len({request.webhook_id for request in requests}) == 1
    assert len(webhook_receiver.verified(SECRET)) == 3
    row = events().get()
    assert (row.state, row.attempts, row.last_status_code) == (DeliveryState.DELIVERED, 3, 200)


@pytest.mark.django_db
def test_gives_up_after_the_schedule(hooks, webhook_receiver):
    webhook_receiver.answers = [503] * 10
    fail_call()
    deliver_until_idle()
    assert len(webhook_receiver.requests) == 4  # the first try and the schedule's three retries
    row = events().get()
    assert (row.state, row.attempts, row.last_status_code) == (DeliveryState.FAILED, 4, 503)
    assert row.next_attempt_at is None


@pytest.mark.django_db
def test_a_network_error_is_retried(hooks, rpc_settings, webhook_receiver):
    settings = hooks()
    dead = settings["WEBHOOKS"][0] | {"URL": "http://127.0.0.1:9/hooks"}  # discard port: refused
    rpc_settings(WEBHOOKS=[dead])
    fail_call()
    report = deliver_due()
    assert (report.retrying, report.status_codes) == (1, [None])
    row = events().get()
    assert row.state == DeliveryState.PENDING
    assert row.attempts == 1
    assert "refused" in row.last_error.lower() or "error" in row.last_error.lower()


@pytest.mark.django_db
def test_a_client_error_fails_at_once(hooks, webhook_receiver):
    webhook_receiver.answers = [400]
    fail_call()
    deliver_until_idle()
    assert len(webhook_receiver.requests) == 1
    assert events().get().state == DeliveryState.FAILED


@pytest.mark.django_db
def test_410_disables_the_endpoint(hooks, webhook_receiver, endpoint_name):
    webhook_receiver.answers = [410]
    fail_call()
    deliver_due()
    assert WebhookEndpointState.objects.get(name=endpoint_name).disabled_at is not None
    fail_call()
    WebhookDelivery.objects.filter(state=DeliveryState.PENDING).update(storm_checked=True)
    report = deliver_due()
    assert report.cancelled == 1
    assert len(webhook_receiver.requests) == 1


@pytest.mark.django_db
def test_429_honours_retry_after(hooks, webhook_receiver):
    from tests.webhook_receiver import Answer

    webhook_receiver.answers = [Answer(429, {"Retry-After": "120"})]
    fail_call()
    before = timezone.now()
    deliver_due()
    row = events().get()
    assert row.state == DeliveryState.PENDING
    assert row.next_attempt_at >= before + timedelta(seconds=119)


def test_retry_delays_follow_the_schedule_with_jitter(settings) -> None:
    config = DjangoCfgRPCConfig(webhook_retry_schedule=(5, 300))
    delays = [retry_delay(config, 1, None) for _ in range(200)]
    assert all(4.0 <= delay <= 6.0 for delay in delays if delay is not None)
    assert len(set(delays)) > 100  # jittered, not one fixed value
    assert 240 <= (retry_delay(config, 2, None) or 0) <= 360
    assert retry_delay(config, 3, None) is None  # the schedule has run out
    assert retry_delay(config, 1, 60.0) == 60.0  # Retry-After wins when later


# -- storm control ------------------------------------------------------------------------------


@pytest.mark.django_db
def test_a_storm_sends_the_first_at_once_and_the_rest_as_one_digest(hooks, webhook_receiver):
    hooks(GROUP_WINDOW_SECONDS=0.5)
    for _ in range(20):
        fail_call()
    deliver_due()
    first = webhook_receiver.verified(SECRET)
    assert [body["type"] for body in first] == ["rpc.failed"]
    assert WebhookDelivery.objects.filter(state=DeliveryState.GROUPED).count() == 19
    time.sleep(0.5 + 0.25 + 0.05)  # the window, then its settling time
    deliver_until_idle(digests=True)
    bodies = webhook_receiver.verified(SECRET)
    assert [body["type"] for body in bodies] == ["rpc.failed", "rpc.failed.digest"]
    digest = bodies[1]["data"]
    assert digest["count"] == 19
    assert digest["method"] == "send_notification"
    assert digest["error_code"] == "user_offline"
    assert len(digest["correlation_ids"]) == 5
    assert digest["first_at"] <= digest["last_at"]
    assert "rpclog/?" in digest["admin_url"]
    assert "status__exact=failed" in digest["admin_url"]


@pytest.mark.django_db
def test_an_event_never_joins_a_digest_already_counted(hooks, webhook_receiver):
    fail_call()
    deliver_due()  # opens the window
    digest = WebhookDelivery.objects.get(kind=DeliveryKind.DIGEST)
    WebhookDelivery.objects.filter(pk=digest.pk).update(payload={"count": 0})  # counted
    fail_call()  # its window (30 s) is still open in Redis, with that digest
    deliver_due()
    # The second is sent on its own, not lost in a digest that will never count it.
    assert list(events().values_list("state", flat=True)) == [DeliveryState.DELIVERED] * 2
    assert [body["type"] for body in webhook_receiver.verified(SECRET)] == ["rpc.failed"] * 2


@pytest.mark.django_db
def test_a_lone_alert_sends_no_digest(hooks, webhook_receiver):
    hooks(GROUP_WINDOW_SECONDS=0.2)
    fail_call()
    deliver_due()
    time.sleep(0.35)
    deliver_until_idle(digests=True)
    assert len(webhook_receiver.requests) == 1
    assert WebhookDelivery.objects.get(kind=DeliveryKind.DIGEST).state == DeliveryState.SKIPPED


@pytest.mark.django_db
def test_different_error_codes_are_different_storms(hooks, webhook_receiver, local_handler):
    local_handler(
        "send_notification", lambda p: (_ for _ in ()).throw(RPCRemoteError(p["code"], "x"))
    )
    for code in ("a", "b", "a"):
        with pytest.raises(RPCRemoteError):
            get_rpc_client().call("send_notification", {"code": code})
    deliver_due()
    codes = sorted(body["data"]["error_code"] for body in webhook_receiver.verified(SECRET))
    assert codes == ["a", "b"]


# -- formats and slow calls -------------------------------------------------------------------


@pytest.mark.django_db
def test_slack_format_posts_text(hooks, webhook_receiver):
    hooks(FORMAT="slack")
    fail_call()
    deliver_due()
    (request,) = webhook_receiver.requests
    assert set(request.json) == {"text"}
    assert "send_notification" in request.json["text"]
    assert "user_offline" in request.json["text"]
    Webhook(SECRET).verify(request.body, request.headers)


@pytest.mark.django_db
def test_a_slow_call_sends_rpc_slow(hooks, rpc_settings, webhook_receiver, controlled_clock):
    rpc_settings(SLOW_CALL_THRESHOLDS_MS={"test.took": 20})
    client = get_rpc_client()
    client.call("test.took", {"ms": 1})
    client.call("test.took", {"ms": 50})
    assert list(RPCLog.objects.order_by("created_at").values_list("is_slow", flat=True)) == [
        False,
        True,
    ]
    deliver_due()
    (verified,) = webhook_receiver.verified(SECRET)
    assert verified["type"] == "rpc.slow"
    assert verified["data"]["threshold_ms"] == 20.0
    assert verified["data"]["threshold_rule"] == "explicit"
    assert verified["data"]["duration_ms"] == pytest.approx(50)


# -- admin --------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_the_admin_lists_deliveries_and_sends_again_with_permission(
    hooks, webhook_receiver, admin_client_
):
    webhook_receiver.answers = [400]
    fail_call()
    deliver_due()
    row = events().get()
    assert row.state == DeliveryState.FAILED
    url = "/admin/django_rpc_audit/webhookdelivery/"
    page = admin_client_.get(url)
    assert page.status_code == 200
    assert b"Failed" in page.content
    assert b"send_notification" in page.content
    assert admin_client_.get(f"{url}{row.pk}/change/").status_code == 200

    form = {"action": "send_again", "_selected_action": [str(row.pk)]}
    staff_client("view_webhookdelivery").post(url, form)
    row.refresh_from_db()
    assert row.state == DeliveryState.FAILED  # no resend permission: nothing happens

    response = admin_client_.post(url, form, follow=True)
    assert b"queued again" in response.content
    row.refresh_from_db()
    assert (row.state, row.attempts) == (DeliveryState.PENDING, 0)
    deliver_due()
    assert [request.webhook_id for request in webhook_receiver.requests] == [row.webhook_id] * 2
    row.refresh_from_db()
    assert row.state == DeliveryState.DELIVERED


@pytest.mark.django_db
def test_rpc_webhooks_deliver_once(hooks, webhook_receiver):
    from io import StringIO

    from django.core.management import call_command

    fail_call()
    out = StringIO()
    call_command("rpc_webhooks_deliver", "--once", stdout=out)
    assert "Delivered 1" in out.getvalue()
    assert len(webhook_receiver.verified(SECRET)) == 1


@pytest.mark.django_db
def test_rpc_webhooks_deliver_refuses_without_endpoints():
    from django.core.management import CommandError, call_command

    with pytest.raises(CommandError, match="WEBHOOKS"):
        call_command("rpc_webhooks_deliver", "--once")


@pytest.mark.django_db
def test_cleanup_prunes_old_deliveries_but_keeps_pending_ones(hooks, webhook_receiver):
    from io import StringIO

    from django.core.management import call_command

    for _ in range(3):
        fail_call()
    deliver_due()  # one delivered, two grouped; their digest stays pending
    old = timezone.now() - timedelta(days=40)
    WebhookDelivery.objects.update(created_at=old)
    out = StringIO()
    call_command("rpc_logs_cleanup", "--days", "30", stdout=out)
    assert "Deleted 3 webhook delivery row(s) older than 30 day(s)." in out.getvalue()
    assert list(WebhookDelivery.objects.values_list("kind", "state")) == [
        (DeliveryKind.DIGEST, DeliveryState.PENDING)
    ]
