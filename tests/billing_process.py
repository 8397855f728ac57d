"""Calls with costs, and what they must cost, for the billing test (``test_billing.py``).

The prices here are the test's own arithmetic, not the package's: the test keeps a ledger of
each call it made and what it must cost, and compares the usage report with it.

Run as ``python -m tests.billing_process CALLS SEED USERNAME...`` (``WRITE_MODE = "stream"``,
``DJANGO_CFG_RPC__COSTS`` and ``__SAMPLE_RATE`` set by the test): makes ``CALLS`` calls as
those users, waits until the stream writer has shipped them, prints the ledger as one JSON
line, then sleeps until it is killed (no exit handler runs).
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from collections import defaultdict
from decimal import Decimal
from typing import Any

#: ``COSTS`` as the test configures it (also as ``DJANGO_CFG_RPC__COSTS``).
COSTS = {
    "reports.generate": "5.00",
    "notify.*": "tests.billing_process.per_recipient",
    "ai.complete": "0.0125",
}
COSTS_ENV = ",".join(f"{method}={rule}" for method, rule in COSTS.items())
METHODS = ("reports.generate", "notify.email", "ai.complete", "system.ping", "reports.broken")
#: How often each is called: mostly free pings (sampled at 10 %), some failures.
WEIGHTS = (2, 3, 3, 10, 1)


def per_recipient(call: Any) -> Decimal:
    """The ``notify.*`` cost function: a cent per recipient."""
    return Decimal("0.01") * len(call.params["to"])


def expected_cost(method: str, params: dict[str, Any], succeeded: bool) -> Decimal | None:
    """What the call must cost, by the test's own arithmetic (successes only are billed)."""
    if not succeeded:
        return None
    if method == "reports.generate":
        return Decimal("5")
    if method == "notify.email":
        return Decimal("0.01") * len(params["to"])
    if method == "ai.complete":
        return Decimal("0.0125")
    return None


def register_handlers(register: Any) -> None:
    from django_rpc_audit.exceptions import RPCRemoteError

    def broken(params: Any) -> Any:
        raise RPCRemoteError("unavailable", "the report service is down")

    register("reports.generate", lambda params: {"url": "/reports/1"})
    register("notify.email", lambda params: {"sent": len(params["to"])})
    register("ai.complete", lambda params: {"text": "ok", "tokens": 12})
    register("system.ping", lambda params: {"pong": True})
    register("reports.broken", broken)


class Ledger:
    """Billed calls and cost per (month, username, method), as the calls were made."""

    def __init__(self) -> None:
        self.lines: dict[tuple[str, str, str], list[Any]] = defaultdict(lambda: [0, Decimal(0)])
        self.calls = 0

    def add(self, month: str, username: str, method: str, cost: Decimal | None) -> None:
        self.calls += 1
        if cost is not None:
            line = self.lines[(month, username, method)]
            line[0] += 1
            line[1] += cost

    def merge(self, other: dict[str, Any]) -> None:
        for key, (count, cost) in other.items():
            line = self.lines[tuple(key.split("|"))]  # type: ignore[index]
            line[0] += count
            line[1] += Decimal(cost)

    def as_json(self) -> dict[str, Any]:
        return {"|".join(key): [count, str(cost)] for key, (count, cost) in self.lines.items()}


def make_calls(count: int, users: list[Any], rng: random.Random, ledger: Ledger) -> None:
    """``count`` calls of random methods by random users (``None``: anonymous)."""
    from django.utils import timezone

    from django_rpc_audit import get_rpc_client
    from django_rpc_audit.context import rpc_context
    from django_rpc_audit.exceptions import RPCRemoteError

    client = get_rpc_client()
    for _ in range(count):
        method = rng.choices(METHODS, WEIGHTS)[0]
        user = rng.choice(users)
        params: dict[str, Any] = {}
        if method == "notify.email":
            params = {"to": [f"r{n}@example.com" for n in range(rng.randint(1, 5))]}
        month = f"{timezone.now():%Y-%m}"
        with rpc_context(user=user):
            try:
                client.call(method, params)
                succeeded = True
            except RPCRemoteError:
                succeeded = False
        username = "" if user is None else user.get_username()
        ledger.add(month, username, method, expected_cost(method, params, succeeded))


def main(calls: int, seed: int, usernames: list[str]) -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")
    os.environ["DJANGO_CFG_RPC__WRITE_MODE"] = "stream"
    import django

    django.setup()
    from django.contrib.auth import get_user_model

    from django_rpc_audit.transports import register_local_handler
    from django_rpc_audit.writers import flush, writer_stats

    register_handlers(register_local_handler)
    users = [get_user_model().objects.get(username=name) for name in usernames]
    ledger = Ledger()
    make_calls(calls, users, random.Random(seed), ledger)
    shipped = flush(timeout=60)
    report = {"shipped": shipped, "dropped": writer_stats().dropped, "ledger": ledger.as_json()}
    print(json.dumps(report))
    sys.stdout.flush()
    time.sleep(600)  # killed by the test


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:])
