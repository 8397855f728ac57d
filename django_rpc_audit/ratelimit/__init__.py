"""Rate limits per subject (user, else caller IP) and method, exact across processes.

A call over its limit is not sent: the client raises
:class:`~django_rpc_audit.exceptions.RPCRateLimitedError`, the signals fire as for any call
and its row says ``rate_limited``. Configured with ``RATE_LIMITS`` and the ``RATE_LIMIT_*``
settings; see ``docs/rate-limits.md``.

- :mod:`~django_rpc_audit.ratelimit.rules`: :class:`Limit` (``"10/minute burst 20"``), parsing
  ``RATE_LIMITS`` and matching a method to its rule; :class:`RateLimitCall`, what
  ``RATE_LIMIT_POLICY`` decides about.
- :mod:`~django_rpc_audit.ratelimit.gcra`: the algorithm, one Lua script that checks a call
  (and adds its request to the stream when allowed) in one round trip.
- :mod:`~django_rpc_audit.ratelimit.limiter`: :class:`RateLimiter`, whose budget a call
  draws on, exemptions, the policy, the check in Redis, failing open (or closed), and the
  counters :func:`rate_limit_stats` reads.
- :mod:`~django_rpc_audit.ratelimit.http`: HTTP 429 with ``Retry-After`` for views
  (:func:`~django_rpc_audit.ratelimit.http.rate_limited_response`,
  :class:`~django_rpc_audit.ratelimit.http.RPCRateLimitMiddleware`).
"""

from __future__ import annotations

from django_rpc_audit.ratelimit.limiter import (
    RateLimiter,
    RateLimitStats,
    RateLimitTicket,
    build_rate_limiter,
    rate_limit_stats,
)
from django_rpc_audit.ratelimit.rules import Limit, RateLimitCall, parse_rules

__all__ = [
    "Limit",
    "RateLimitCall",
    "RateLimitStats",
    "RateLimitTicket",
    "RateLimiter",
    "build_rate_limiter",
    "parse_rules",
    "rate_limit_stats",
]
