"""A separate web-like process for the alert tests that need several processes.

Run as ``python -m tests.alerts_process SCENARIO [N]`` with ``DATABASE_URL`` naming a migrated
database and ``ALERTS_*`` variables describing the webhook endpoint. It uses the buffered
writer and, unless ``ALERTS_THREAD=0``, the background delivery thread. Prints JSON lines.

- ``migrate``: create the schema (SQLite file runs).
- ``burst N``: wait for the test's go (a Redis list), make N failing calls, then keep
  delivering until terminated.
- ``crash``: one failing call, logged (flushed), then wait to be killed.
- ``deliver``: ``manage.py rpc_webhooks_deliver`` until terminated.
- ``report``: the outbox rows and the failed calls' ids, as the database has them (the
  test's own connection cannot read the children's SQLite file).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from typing import Any

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")

import django  # noqa: E402

django.setup()

from django.conf import settings  # noqa: E402
from django.test.utils import override_settings  # noqa: E402

from django_rpc_audit.exceptions import RPCRemoteError  # noqa: E402
from django_rpc_audit.transports import register_local_handler  # noqa: E402

override_settings(
    DJANGO_CFG_RPC={
        **settings.DJANGO_CFG_RPC,
        "REDIS_URL": os.environ["REDIS_URL"],
        "WRITE_MODE": "buffered",
        "BUFFER_FLUSH_INTERVAL": 0.1,
        "WEBHOOKS": [
            {
                "NAME": os.environ["ALERTS_ENDPOINT"],
                "URL": os.environ["ALERTS_URL"],
                "SECRET": os.environ["ALERTS_SECRET"],
            }
        ],
        "WEBHOOK_GROUP_WINDOW_SECONDS": float(os.environ.get("ALERTS_WINDOW", "60")),
        "WEBHOOK_TIMEOUT": float(os.environ.get("ALERTS_TIMEOUT", "5")),
        "WEBHOOK_POLL_INTERVAL": 0.2,
        "WEBHOOK_RETRY_SCHEDULE": [0.2, 0.2],
        "WEBHOOK_DELIVERY_THREAD": os.environ.get("ALERTS_THREAD", "1") == "1",
    }
).enable()


def failing(params: dict[str, Any]) -> dict[str, Any]:
    raise RPCRemoteError("upstream_down", "The upstream is down")


register_local_handler("send_notification", failing)


def emit(**values: Any) -> None:
    print(json.dumps(values), flush=True)


def fail(count: int) -> None:
    from django_rpc_audit import get_rpc_client

    client = get_rpc_client()
    for n in range(count):
        with contextlib.suppress(RPCRemoteError):
            client.call("send_notification", {"n": n})


def main(scenario: str, count: int) -> None:
    from django_rpc_audit.writers import flush

    if scenario == "migrate":
        from django.core.management import call_command

        call_command("migrate", verbosity=0)
    elif scenario == "burst":
        import redis

        connection = redis.Redis.from_url(os.environ["REDIS_URL"])
        emit(ready=True)
        connection.blpop([os.environ["ALERTS_GO_KEY"]], timeout=60)
        fail(count)
        emit(called=count, flushed=flush(timeout=60))
        time.sleep(120)  # delivering, until the test terminates the process
    elif scenario == "crash":
        fail(1)
        emit(logged=flush(timeout=60))
        time.sleep(120)  # the test kills the process with SIGKILL
    elif scenario == "deliver":
        from django.core.management import call_command

        call_command("rpc_webhooks_deliver", "--max-seconds", "60")
    elif scenario == "report":
        from django_rpc_audit.models import RPCLog, WebhookDelivery

        fields = ("id", "kind", "state", "attempts", "last_status_code")
        emit(
            deliveries=[
                {**row, "id": row["id"].hex} for row in WebhookDelivery.objects.values(*fields)
            ],
            failed=list(
                RPCLog.objects.filter(status="failed").values_list("correlation_id", flat=True)
            ),
        )
    else:
        raise SystemExit(f"unknown scenario {scenario!r}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 0)
