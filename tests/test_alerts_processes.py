"""Alerts across real processes: storm control shared through Redis, and a crash mid-delivery.

The children (``tests/alerts_process.py``) log through the buffered writer and deliver with
their own background thread, like web workers; the webhook endpoint is a real HTTP server in
this process, and every request is verified with ``standardwebhooks``.
"""

from __future__ import annotations

import base64
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from django.db import connection

from django_rpc_audit.alerts.models import DeliveryKind, DeliveryState, WebhookDelivery
from django_rpc_audit.models import RPCLog
from tests.webhook_receiver import Answer

ROOT = Path(__file__).resolve().parent.parent
SECRET = "whsec_" + base64.b64encode(os.urandom(32)).decode()


def spawn(env: dict[str, str], scenario: str, count: int = 0) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.alerts_process", scenario, str(count)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def read_line(process: subprocess.Popen[str]) -> dict[str, Any]:
    assert process.stdout is not None
    line = process.stdout.readline()
    assert line, process.stderr.read() if process.stderr else ""
    return dict(json.loads(line))


def stop(*processes: subprocess.Popen[str]) -> None:
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        process.wait(30)


def wait_until(condition: Any, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


@pytest.fixture
def alerts_env(child_env: dict[str, str], webhook_receiver: Any, redis_url: str) -> dict[str, str]:
    return {
        **child_env,
        "REDIS_URL": redis_url,
        "ALERTS_ENDPOINT": f"ops-{uuid.uuid4().hex[:8]}",
        "ALERTS_URL": webhook_receiver.url,
        "ALERTS_SECRET": SECRET,
    }


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("clean_storm_windows")
def test_a_burst_from_four_processes_sends_one_alert_and_one_digest_per_window(
    alerts_env: dict[str, str], webhook_receiver: Any, redis_client: Any
) -> None:
    """1,000 failures of one method from 4 processes (about 10 s: four Django processes start,
    and the digest waits for the end of its window)."""
    if connection.vendor != "postgresql":
        pytest.skip("several delivering processes need SKIP LOCKED (PostgreSQL)")
    window = 3.0
    go = f"rpc_audit_test:go:{uuid.uuid4().hex}"
    env = {**alerts_env, "ALERTS_WINDOW": str(window), "ALERTS_GO_KEY": go}
    children = [spawn(env, "burst", 250) for _ in range(4)]
    try:
        for child in children:
            assert read_line(child) == {"ready": True}
        redis_client.rpush(go, *["go"] * 4)
        go_at = time.monotonic()
        for child in children:
            assert read_line(child) == {"called": 250, "flushed": True}
        events = WebhookDelivery.objects.filter(kind=DeliveryKind.EVENT)
        assert wait_until(lambda: events.filter(storm_checked=True).count() == 1_000)
        decided_at = time.monotonic()

        def all_counted() -> bool:
            bodies = [request.json for request in webhook_receiver.requests]
            return (
                sum(b["data"]["count"] if b["type"].endswith(".digest") else 1 for b in bodies)
                >= 1_000
            )

        assert wait_until(all_counted, timeout=window + 30)
        time.sleep(0.5)  # anything sent twice or extra would arrive now
    finally:
        stop(*children)
    bodies = webhook_receiver.verified(SECRET)  # every request is signed right
    immediates = [body for body in bodies if body["type"] == "rpc.failed"]
    digests = [body for body in bodies if body["type"] == "rpc.failed.digest"]
    assert len(immediates) + len(digests) == len(bodies)
    assert len(immediates) + sum(body["data"]["count"] for body in digests) == 1_000
    windows = WebhookDelivery.objects.filter(kind=DeliveryKind.DIGEST)
    # One immediate alert and at most one digest per window, each digest with its window's count.
    assert len(immediates) == windows.count()
    assert len(digests) <= windows.count()
    for digest in windows.exclude(state=DeliveryState.SKIPPED):
        grouped = events.filter(digest_id=digest.id, state=DeliveryState.GROUPED).count()
        assert digest.payload["count"] == grouped
        assert events.filter(digest_id=digest.id).exclude(state=DeliveryState.GROUPED).count() == 1
    # Every decision fell between the go and decided_at: no more windows than that span holds.
    assert windows.count() <= 1 + math.floor((decided_at - go_at) / window)
    assert len({request.webhook_id for request in webhook_receiver.requests}) == len(bodies)
    assert RPCLog.objects.filter(status="failed").count() == 1_000


@pytest.mark.django_db(transaction=True)
def test_a_process_killed_mid_delivery_leaves_its_alert_to_another(
    alerts_env: dict[str, str], webhook_receiver: Any
) -> None:
    """The web process logs a failed call, its thread starts sending the alert, and it is
    killed with SIGKILL before the endpoint answers; a ``rpc_webhooks_deliver`` process sends
    the alert again, with the same ``webhook-id``, once the dead process's lease has run out
    (about 5 s: two Django processes and a 3 s lease)."""
    hold = Answer(200, hold=threading.Event())
    webhook_receiver.answers = [hold]
    env = {**alerts_env, "ALERTS_TIMEOUT": "1"}
    web = spawn(env, "crash")
    worker = None
    try:
        assert read_line(web) == {"logged": True}
        assert len(webhook_receiver.wait_for(1)) == 1  # its thread is mid-request
        web.send_signal(signal.SIGKILL)
        web.wait(30)
        assert web.returncode == -signal.SIGKILL
        assert hold.hold is not None
        hold.hold.set()
        (event,) = [row for row in report(env)["deliveries"] if row["kind"] == "event"]
        assert (event["state"], event["attempts"]) == ("pending", 1)
        worker = spawn({**env, "ALERTS_THREAD": "0"}, "deliver")
        assert len(webhook_receiver.wait_for(2)) == 2
        # SIGTERM: the worker finishes its pass (recording the answer), then exits.
        stop(worker)
        assert worker.returncode == 0, worker.stderr.read() if worker.stderr else ""
    finally:
        stop(*(p for p in (web, worker) if p is not None))
    final = report(env)
    (event,) = [row for row in final["deliveries"] if row["kind"] == "event"]
    assert (event["state"], event["attempts"], event["last_status_code"]) == ("delivered", 2, 200)
    first, second = webhook_receiver.requests
    assert first.webhook_id == second.webhook_id == f"msg_{event['id']}"
    verified = webhook_receiver.verified(SECRET)
    assert [body["data"]["correlation_id"] for body in verified] == final["failed"] * 2


def report(env: dict[str, str]) -> dict[str, Any]:
    """The outbox and failed calls as the children's database has them."""
    result = subprocess.run(
        [sys.executable, "-m", "tests.alerts_process", "report"],
        cwd=ROOT,
        env={**env, "ALERTS_THREAD": "0"},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return dict(json.loads(result.stdout.splitlines()[-1]))
