"""Sampling that keeps every problem: only successful, fast calls are ever left unlogged.

The keep-or-drop draw is a hash of the call's correlation id, so the ``rpc_started`` and
``rpc_finished`` receivers (and any process) agree on it without sharing state.
"""

from __future__ import annotations

import functools
import hashlib
from typing import Any

from django_rpc_audit.conf import DjangoCfgRPCConfig
from django_rpc_audit.costs import is_costed
from django_rpc_audit.status import RPCStatus
from django_rpc_audit.utils import method_rule

_SCALE = float(2**64)


def draw(correlation_id: str) -> float:
    """A number in [0, 1) fixed by ``correlation_id``, uniform over random ids."""
    digest = hashlib.blake2b(str(correlation_id).encode("utf-8", "replace"), digest_size=8)
    return int.from_bytes(digest.digest(), "big") / _SCALE


def sample_rate_for(config: DjangoCfgRPCConfig, method: str) -> float:
    """The rate of ``method``: its ``SAMPLE_RATES`` entry or matching glob, else ``SAMPLE_RATE``."""
    return _rate(config.sample_rates, config.sample_rate, method)


@functools.lru_cache(maxsize=4096)
def _rate(rates: tuple[tuple[str, float], ...], default: float, method: str) -> float:
    found = method_rule(rates, method)
    return float(default if found is None else found[1])


def is_sampled(correlation_id: str, rate: float) -> bool:
    """True when the call ``correlation_id`` falls in the logged share ``rate``."""
    if rate >= 1:
        return True
    if rate <= 0:
        return False
    return draw(correlation_id) < rate


def started_is_logged(config: DjangoCfgRPCConfig, event: dict[str, Any]) -> bool:
    """Whether the pending row of a starting call is written: always for a method that may
    carry a cost (``COSTS``), whose finished row is never sampled out either."""
    if is_sampled(event["correlation_id"], sample_rate_for(config, event["method"])):
        return True
    return is_costed(config, event["method"])


def finished_sample_rate(config: DjangoCfgRPCConfig, event: dict[str, Any]) -> float | None:
    """The ``sample_rate`` to store with a finished call, or ``None`` to log nothing.

    Failures, timeouts, calls flagged slow (``slow``: slower than their method's normal),
    calls at least ``ALWAYS_LOG_SLOWER_THAN_MS`` slow and calls that may carry a cost (a
    ``COSTS`` rule and a billable outcome) are always logged with rate 1.0: they are all
    there, and count once each.
    """
    rate = sample_rate_for(config, event["method"])
    if rate >= 1:
        return 1.0
    if is_costed(config, event["method"], event.get("status")):
        return 1.0
    duration = event.get("duration_ms")
    slow = event.get("slow") is not None or (
        duration is not None and duration >= config.always_log_slower_than_ms
    )
    if event.get("status") != RPCStatus.SUCCESS or slow:
        return 1.0
    return rate if is_sampled(event["correlation_id"], rate) else None
