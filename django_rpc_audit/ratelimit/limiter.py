"""The rate limiter: whose budget a call draws on, the check in Redis, and what happens when
Redis cannot answer (fail open by default, counted and logged)."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hashlib
import ipaddress
import logging
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import redis
import redis.asyncio
import redis.asyncio.retry
import redis.retry
from django.core.exceptions import ImproperlyConfigured
from django.utils.module_loading import import_string
from redis.backoff import NoBackoff

from django_rpc_audit.exceptions import RPCRateLimitedError
from django_rpc_audit.ratelimit import gcra
from django_rpc_audit.ratelimit.rules import Limit, RateLimitCall, Rule
from django_rpc_audit.redaction import redact_text
from django_rpc_audit.transports import RedisTransport
from django_rpc_audit.utils import method_rule, redact_url

if TYPE_CHECKING:
    from django_rpc_audit.conf import DjangoCfgRPCConfig
    from django_rpc_audit.transports import RPCRequest, Transport

logger = logging.getLogger(__name__)

#: Longest method name or subject put in a Redis key as it is; longer ones are hashed.
MAX_KEY_PART = 200
#: Methods whose matching rule is remembered per limiter (the cache is emptied when full).
RULE_CACHE_SIZE = 4096
_MISSING = object()

Policy = Callable[[RateLimitCall], RateLimitCall | None]


# -- counters -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RateLimitStats:
    """What the rate limiter did in this process since it started (see :func:`rate_limit_stats`)."""

    #: Limited calls checked and allowed.
    allowed: int = 0
    #: Calls refused because they were over their limit.
    limited: int = 0
    #: Limiter failures: Redis unreachable or refusing the script, or the policy raising.
    errors: int = 0
    #: Calls let through unchecked because the limiter had failed (``RATE_LIMIT_FAIL_OPEN``).
    failed_open: int = 0
    #: Calls refused because the limiter had failed and ``RATE_LIMIT_FAIL_OPEN`` is off.
    failed_closed: int = 0


class _Counters:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values = dict.fromkeys(f.name for f in dataclasses.fields(RateLimitStats))

    def add(self, name: str) -> None:
        with self._lock:
            self._values[name] = (self._values[name] or 0) + 1

    def snapshot(self) -> RateLimitStats:
        with self._lock:
            return RateLimitStats(**{name: value or 0 for name, value in self._values.items()})


_counters = _Counters()


def rate_limit_stats() -> RateLimitStats:
    """The rate limiter's counters in this process, for a metrics integration or a health check::

    stats = rate_limit_stats()
    gauge("rpc_rate_limit_failed_open").set(stats.failed_open)
    """
    return _counters.snapshot()


# -- subjects -----------------------------------------------------------------------------------


def ip_subject(caller_ip: str, ipv6_prefix: int = 64) -> str:
    """``"ip:<address>"``; an IPv6 address stands for its ``/ipv6_prefix`` network.

    One host commonly holds a whole IPv6 /64, so keying by the full address would hand it
    billions of budgets. An IPv4-mapped IPv6 address counts as its IPv4 address. Parsed once
    per address (a site sees the same few again and again); no address is that long, so a
    longer string is never cached.
    """
    if len(caller_ip) > _LONGEST_ADDRESS:
        return f"ip:{_bounded(caller_ip)}"
    return _ip_subject(caller_ip, ipv6_prefix)


#: An IPv6 address with an IPv4 tail and a zone index fits in this.
_LONGEST_ADDRESS = 100


@functools.lru_cache(maxsize=4096)
def _ip_subject(caller_ip: str, ipv6_prefix: int) -> str:
    try:
        address = ipaddress.ip_address(caller_ip.partition("%")[0])
    except ValueError:
        return f"ip:{_bounded(caller_ip)}"
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return f"ip:{address.ipv4_mapped}"
        network = ipaddress.IPv6Network((address, ipv6_prefix), strict=False)
        return f"ip:{network}"
    return f"ip:{address}"


def _bounded(text: str) -> str:
    if len(text) <= MAX_KEY_PART:
        return text
    return "sha256:" + hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


# -- the limiter --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RateLimitTicket:
    """A limited call's check, carried by its request to the Redis transport, which runs it in
    the same script as the request's ``XADD`` (see :meth:`add_request`)."""

    limiter: RateLimiter
    method: str
    key: str
    limit: Limit

    def add_request(self, client: redis.Redis, stream: str, maxlen: int, body: str) -> bool:
        """Check the limit and add the request to ``stream`` in one script.

        True once added. False when the limiter failed and fails open: the caller adds the
        request itself. Redis connection errors propagate: the request cannot be sent either.

        :raises RPCRateLimitedError: over the limit (or the limiter failed and fails closed).
        """
        limiter = self.limiter
        if limiter.backing_off():
            limiter.pass_unchecked(self)
            return False
        try:
            wait = gcra.run(client, [self.key, stream], limiter.arguments(self, maxlen, body))
        except (redis.ConnectionError, redis.TimeoutError):
            raise
        except redis.RedisError as exc:
            limiter.failed(self, exc)
            return False
        limiter.decided(self, wait)
        return True

    async def aadd_request(
        self, client: redis.asyncio.Redis, stream: str, maxlen: int, body: str
    ) -> bool:
        """The ``async`` twin of :meth:`add_request`."""
        limiter = self.limiter
        if limiter.backing_off():
            limiter.pass_unchecked(self)
            return False
        try:
            wait = await gcra.arun(
                client, [self.key, stream], limiter.arguments(self, maxlen, body)
            )
        except (redis.ConnectionError, redis.TimeoutError):
            raise
        except redis.RedisError as exc:
            limiter.failed(self, exc)
            return False
        limiter.decided(self, wait)
        return True


class RateLimiter:
    """Applies ``RATE_LIMITS`` to calls, in Redis, the same way in every process.

    Built by :class:`~django_rpc_audit.client.RPCClient` when ``RATE_LIMITS`` is set. A limited
    call's check runs inside the request's own ``XADD`` script when the transport is Redis on
    the limiter's server (no extra round trip), else as one script call of its own before the
    request is sent. Methods no rule limits cost one dictionary look-up.
    """

    def __init__(self, config: DjangoCfgRPCConfig, transport: Transport) -> None:
        self.rules: tuple[Rule, ...] = config.rate_limits
        self.redis_url = config.rate_limit_redis_url or config.redis_url
        #: True when the check runs in the request's ``XADD`` script.
        self.combined = (
            isinstance(transport, RedisTransport) and transport.redis_url == self.redis_url
        )
        self.fail_open = config.rate_limit_fail_open
        self.timeout = config.rate_limit_timeout
        self.backoff = config.rate_limit_backoff_seconds
        self.key_prefix = config.rate_limit_key_prefix
        self.ipv6_prefix = config.rate_limit_ipv6_prefix
        self.exempt_staff = config.rate_limit_exempt_staff
        self.exempt_users = frozenset(config.rate_limit_exempt_users)
        self.policy = load_policy(config.rate_limit_policy)
        self._rules_by_method: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._client: redis.Redis | None = None
        self._async_clients: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, redis.asyncio.Redis
        ] = weakref.WeakKeyDictionary()
        #: The monotonic clock the back-off is measured on.
        self.clock: Callable[[], float] = time.monotonic
        # While the limiter's Redis is failing: calls pass (or are refused) unchecked until
        # this time on self.clock, so an outage costs each call nothing, not a timeout.
        self._down_until = 0.0
        self._unchecked = 0
        self._last_policy_log = 0.0

    def __repr__(self) -> str:
        mode = "combined with XADD" if self.combined else "own round trip"
        return f"<RateLimiter {len(self.rules)} rule(s) {redact_url(self.redis_url)} ({mode})>"

    # -- the caller's path ------------------------------------------------------------------------

    def limit(self, request: RPCRequest, user: Any, caller_ip: str | None) -> RPCRequest:
        """Check ``request`` against its limit, or attach the check for the transport's script.

        Returns the request to send. Unlimited methods get it back untouched.

        :raises RPCRateLimitedError: over the limit.
        """
        request, ticket = self._to_check(request, user, caller_ip)
        if ticket is not None:
            try:
                wait = gcra.run(self.client, [ticket.key], self.arguments(ticket))
            except redis.RedisError as exc:
                self.failed(ticket, exc)
            else:
                self.decided(ticket, wait)
        return request

    async def alimit(self, request: RPCRequest, user: Any, caller_ip: str | None) -> RPCRequest:
        """The ``async`` twin of :meth:`limit`; never blocks the event loop."""
        request, ticket = self._to_check(request, user, caller_ip)
        if ticket is not None:
            try:
                async with asyncio.timeout(self.timeout):
                    client = self._async_client()
                    wait = await gcra.arun(client, [ticket.key], self.arguments(ticket))
            except (redis.RedisError, TimeoutError) as exc:
                self.failed(ticket, exc)
            else:
                self.decided(ticket, wait)
        return request

    def _to_check(
        self, request: RPCRequest, user: Any, caller_ip: str | None
    ) -> tuple[RPCRequest, RateLimitTicket | None]:
        """The request to send, and the ticket :meth:`limit` must still check (or ``None``)."""
        ticket = self.ticket(request.method, user, caller_ip)
        if ticket is None:
            return request, None
        if self.combined:
            return dataclasses.replace(request, rate_limit=ticket), None
        if self.backing_off():
            self.pass_unchecked(ticket)
            return request, None
        return request, ticket

    def ticket(self, method: str, user: Any, caller_ip: str | None) -> RateLimitTicket | None:
        """The check a call of ``method`` needs, or ``None`` when it is not limited.

        Pure computation: the matching rule (cached per method), exemptions, the subject and
        ``RATE_LIMIT_POLICY``. A policy that raises counts as a limiter failure.
        """
        rule = self._rules_by_method.get(method, _MISSING)
        if rule is _MISSING:
            rule = method_rule(self.rules, method)
            if len(self._rules_by_method) >= RULE_CACHE_SIZE:
                self._rules_by_method.clear()
            self._rules_by_method[method] = rule
        if rule is None or rule[1] is None:
            return None
        if user is not None and self._exempt(user):
            return None
        pattern, limit = rule
        subject = self.subject(user, caller_ip)
        if self.policy is not None:
            decided = self._apply_policy(RateLimitCall(method, user, caller_ip, limit, subject))
            if decided is None:
                return None
            limit, subject = decided.limit, decided.subject
        scope = _bounded(f"p:{pattern}" if limit.shared else f"m:{method}")
        # The scope's length first: no method name can make two keys collide.
        key = f"{self.key_prefix}{len(scope)}:{scope}:{_bounded(subject)}"
        return RateLimitTicket(self, method, key, limit)

    def subject(self, user: Any, caller_ip: str | None) -> str:
        """Whose budget a call draws on: ``"user:<pk>"``, else ``"ip:<address>"``, else
        ``"unknown"`` (no user and no IP: calls outside any request share one budget)."""
        pk = getattr(user, "pk", None) if user is not None else None
        if pk is not None:
            return f"user:{pk}"
        if caller_ip:
            return ip_subject(caller_ip, self.ipv6_prefix)
        return "unknown"

    def _exempt(self, user: Any) -> bool:
        if self.exempt_staff and getattr(user, "is_staff", False) is True:
            return True
        if self.exempt_users:
            get_username = getattr(user, "get_username", None)
            return callable(get_username) and get_username() in self.exempt_users
        return False

    def _apply_policy(self, call: RateLimitCall) -> RateLimitCall | None:
        assert self.policy is not None
        try:
            decided = self.policy(call)
            if decided is not None and not isinstance(decided, RateLimitCall):
                raise TypeError(
                    f"RATE_LIMIT_POLICY returned {type(decided).__name__}; it must return the "
                    "RateLimitCall it was given (or a replace()d copy), or None"
                )
        except Exception as exc:
            _counters.add("errors")
            now = self.clock()
            if now - self._last_policy_log >= self.backoff:
                self._last_policy_log = now
                logger.exception(
                    "RATE_LIMIT_POLICY failed for %r; the call %s.",
                    call.method,
                    "passes unchecked" if self.fail_open else "is refused",
                )
            self.pass_unchecked(
                RateLimitTicket(self, call.method, "", call.limit), reason=type(exc).__name__
            )
            return None
        return decided

    # -- Redis ------------------------------------------------------------------------------------

    def arguments(
        self, ticket: RateLimitTicket, maxlen: int | None = None, body: str | None = None
    ) -> list[str | int]:
        """The script's ``ARGV``: emission interval and burst tolerance (µs), then, for the
        combined script, the stream's ``MAXLEN`` and the request."""
        arguments: list[str | int] = [ticket.limit.interval_us, ticket.limit.tolerance_us]
        if body is not None:
            arguments += [maxlen or 1, body]
        return arguments

    @property
    def client(self) -> redis.Redis:
        """The limiter's own Redis client (when the check is not combined with ``XADD``)."""
        if self._client is None:
            with self._lock:
                if self._client is None:
                    self._client = redis.Redis.from_url(
                        self.redis_url,
                        socket_connect_timeout=self.timeout,
                        socket_timeout=self.timeout,
                        # One attempt: a retry would make every limited call wait out an outage.
                        retry=redis.retry.Retry(NoBackoff(), 0),
                    )
        return self._client

    def _async_client(self) -> redis.asyncio.Redis:
        loop = asyncio.get_running_loop()
        client = self._async_clients.get(loop)
        if client is None:
            # No socket_timeout: alimit() bounds the wait with asyncio.timeout (redis-py's own
            # would wrap each command in wait_for, which can swallow a cancellation on 3.11).
            client = redis.asyncio.Redis.from_url(
                self.redis_url,
                socket_connect_timeout=self.timeout,
                retry=redis.asyncio.retry.Retry(NoBackoff(), 0),
            )
            self._async_clients[loop] = client
        return client

    def close(self) -> None:
        """Close the limiter's own connections."""
        if self._client is not None:
            self._client.close()
            self._client = None
        self._async_clients.clear()

    # -- outcomes ---------------------------------------------------------------------------------

    def decided(self, ticket: RateLimitTicket, wait_us: int) -> None:
        """Count the script's answer; raise when the call is over its limit."""
        if self._down_until:
            self._recovered()
        if wait_us <= 0:
            _counters.add("allowed")
            return
        _counters.add("limited")
        retry_after = wait_us / 1_000_000
        raise RPCRateLimitedError(
            f"Rate limit {ticket.limit} of {ticket.method!r} reached; a call can succeed "
            f"in {retry_after:.3f} s.",
            retry_after=retry_after,
        )

    def backing_off(self) -> bool:
        """True while a recent failure of the limiter's Redis has checks skipped."""
        down_until = self._down_until
        return bool(down_until) and self.clock() < down_until

    def failed(self, ticket: RateLimitTicket, exc: BaseException) -> None:
        """Redis could not run the check: back off, count, log, then fail open or closed."""
        _counters.add("errors")
        with self._lock:
            starting = not self.backing_off()
            self._down_until = self.clock() + self.backoff
        if starting:
            # One warning per back-off period at most, however many calls pass meanwhile.
            logger.warning(
                "Rate limiter: Redis at %s failed (%s); for %g s limited calls %s "
                "(RATE_LIMIT_FAIL_OPEN=%s).",
                redact_url(self.redis_url),
                redact_text(f"{type(exc).__name__}: {exc}")[:300],
                self.backoff,
                "pass unchecked" if self.fail_open else "are refused",
                self.fail_open,
            )
        self.pass_unchecked(ticket)

    def pass_unchecked(self, ticket: RateLimitTicket, reason: str = "") -> None:
        """A call the limiter could not check: let it through, or refuse it (fail closed)."""
        if self.fail_open:
            _counters.add("failed_open")
            if self._down_until:
                with self._lock:
                    self._unchecked += 1
            return
        _counters.add("failed_closed")
        raise RPCRateLimitedError(
            f"The rate limiter is unavailable{f' ({reason})' if reason else ''} and "
            f"RATE_LIMIT_FAIL_OPEN is off: {ticket.method!r} was not sent.",
            retry_after=self.backoff,
            code="rate_limiter_unavailable",
        )

    def _recovered(self) -> None:
        with self._lock:
            if not self._down_until:
                return
            self._down_until = 0.0
            unchecked, self._unchecked = self._unchecked, 0
        logger.info(
            "Rate limiter: Redis at %s answers again; %d limited call(s) passed unchecked "
            "meanwhile.",
            redact_url(self.redis_url),
            unchecked,
        )


def load_policy(path: str) -> Policy | None:
    """The ``RATE_LIMIT_POLICY`` callable, or ``None`` when the setting is empty.

    :raises ImproperlyConfigured: the dotted path cannot be imported or is not callable.
    """
    if not path:
        return None
    try:
        policy = import_string(path)
    except ImportError as exc:
        raise ImproperlyConfigured(
            f"DJANGO_CFG_RPC['RATE_LIMIT_POLICY'] cannot be imported: {exc}"
        ) from exc
    if not callable(policy):
        raise ImproperlyConfigured(
            f"DJANGO_CFG_RPC['RATE_LIMIT_POLICY'] ({path!r}) is not callable."
        )
    return policy  # type: ignore[no-any-return]


def build_rate_limiter(config: DjangoCfgRPCConfig, transport: Transport) -> RateLimiter | None:
    """The limiter of a client of ``config`` and ``transport``; ``None`` without limits."""
    if not config.rate_limits:
        return None
    return RateLimiter(config, transport)
