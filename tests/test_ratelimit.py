"""Rate limits: settings, matching, subjects, the GCRA script on the real Redis, the client's
behaviour when a call is refused, exemptions and policies, failing open or closed, HTTP 429.

The multi-process proof against the real django-ipc server is in
``test_ratelimit_processes.py``.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from django.core.exceptions import ImproperlyConfigured
from django.http import HttpRequest
from django.test import Client
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from django_rpc_audit import get_rpc_client
from django_rpc_audit.checks import check_rate_limit_policy
from django_rpc_audit.conf import DjangoCfgRPCConfig, get_config
from django_rpc_audit.context import rpc_context
from django_rpc_audit.exceptions import RPCError, RPCRateLimitedError
from django_rpc_audit.models import RPCLog, RPCStatus
from django_rpc_audit.ratelimit import Limit, RateLimitCall, gcra, parse_rules, rate_limit_stats
from django_rpc_audit.ratelimit.http import RPCRateLimitMiddleware, rate_limited_response
from django_rpc_audit.ratelimit.limiter import RateLimiter, ip_subject
from django_rpc_audit.transports import LocalTransport, RPCRequest
from django_rpc_audit.utils import method_rule
from scripts.ipc_server import free_port
from tests.factories import UserFactory
from tests.test_transports_redis import Responder, echo

LIMITED = "test.limited"


# -- fixtures and helpers ---------------------------------------------------------------------


@pytest.fixture
def key_prefix(redis_url: str, redis_client: redis.Redis) -> Iterator[str]:
    """A key prefix of the test's own; its keys are deleted afterwards."""
    prefix = f"rpc_audit_test:{uuid.uuid4().hex}:rl:"
    yield prefix
    for key in redis_client.scan_iter(f"{prefix}*"):
        redis_client.delete(key)


@pytest.fixture
def limits(
    rpc_settings: Callable[..., dict[str, Any]], key_prefix: str, redis_url: str
) -> Callable[..., None]:
    """``limits({"method": "2/minute"}, **other_keys)``: rate limits on the real Redis."""

    def configure(rules: Any, **keys: Any) -> None:
        rpc_settings(
            RATE_LIMITS=rules, RATE_LIMIT_KEY_PREFIX=key_prefix, REDIS_URL=redis_url, **keys
        )

    return configure


@pytest.fixture
def responder(redis_transport: str, redis_url: str) -> Iterator[Responder]:
    """A stand-in for the django-ipc server on the test's stream, answering with an echo."""
    server = Responder(redis_url, redis_transport, echo).start()
    yield server
    server.stop()


def record_commands(client: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the commands ``client`` sends from now on: one per round trip."""
    sent: list[str] = []
    original = client.execute_command

    def execute(*args: Any, **options: Any) -> Any:
        sent.append(str(args[0]).upper())
        return original(*args, **options)

    monkeypatch.setattr(client, "execute_command", execute)
    return sent


def refused(call: Callable[[], Any]) -> RPCRateLimitedError:
    with pytest.raises(RPCRateLimitedError) as info:
        call()
    return info.value


def stats_delta(before: Any) -> dict[str, int]:
    after = rate_limit_stats()
    return {
        name: getattr(after, name) - getattr(before, name)
        for name in ("allowed", "limited", "errors", "failed_open", "failed_closed")
        if getattr(after, name) != getattr(before, name)
    }


# -- limits and rules -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "count", "period", "burst", "text"),
    [
        ("10/minute", 10, 60, 10, "10/minute"),
        ("10/m", 10, 60, 10, "10/minute"),
        ("5/30s", 5, 30, 5, "5/30s"),
        ("100 / 2 hours burst 20", 100, 7200, 20, "100/7200s burst 20"),
        ("1000/DAY", 1000, 86400, 1000, "1000/day"),
        ("3/sec burst 1", 3, 1, 1, "3/second burst 1"),
        ({"rate": "10/minute", "burst": 2}, 10, 60, 2, "10/minute burst 2"),
        ({"rate": "10/minute burst 3", "shared": True}, 10, 60, 3, "10/minute burst 3"),
    ],
)
def test_limit_syntax(spec: Any, count: int, period: int, burst: int, text: str) -> None:
    limit = Limit.parse(spec)
    assert (limit.count, limit.period, limit.burst, str(limit)) == (count, period, burst, text)
    assert limit.shared is (isinstance(spec, dict) and spec.get("shared", False))


@pytest.mark.parametrize(
    "spec",
    [
        "10/fortnight",
        "ten/minute",
        "0/minute",
        "1/0s",
        "10/minute burst 0",
        "10/minute, burst 2",
        "-1/s",
        "2000000/s",  # under a microsecond apart
        "1/s burst 99999999999",  # a tolerance past 30 years
        {"rate": "1/s", "bursty": 2},
        {"burst": 2},
        {"rate": "1/s", "burst": 0},
        {"rate": "1/s", "shared": "yes"},
        10,
    ],
)
def test_malformed_limits_are_refused(spec: Any) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - each has its own message
        Limit.parse(spec)


def test_emission_interval_is_rounded_up_to_the_microsecond() -> None:
    # 7 an hour: 514285714.28... µs; rounding up keeps the rate at or below the limit.
    limit = Limit.parse("7/hour burst 3")
    assert limit.interval_us == 514_285_715
    assert limit.tolerance_us == 2 * 514_285_715
    assert Limit.parse("1000000/s").interval_us == 1


def test_rules_keep_the_settings_order_and_take_unlimited() -> None:
    rules = parse_rules({"z.*": "1/s", "a.*": "2/s", "a.ping": None, "b": "unlimited"})
    assert [pattern for pattern, _ in rules] == ["z.*", "a.*", "a.ping", "b"]
    assert rules[2][1] is None
    assert rules[3][1] is None
    assert parse_rules(["send = 10/minute burst 2", "*=1/s"]) == (
        ("send", Limit(10, 60, 2)),
        ("*", Limit(1, 1)),
    )


def test_exact_names_first_then_the_first_matching_pattern_in_the_users_order() -> None:
    rules = parse_rules(
        {"*": "1/s", "reports.*": "2/s", "reports.daily": "3/s", "system.ping": None}
    )
    assert method_rule(rules, "reports.daily") == ("reports.daily", Limit(3, 1))
    # "*" comes before "reports.*" in the settings: the first match wins.
    assert method_rule(rules, "reports.weekly") == ("*", Limit(1, 1))
    assert method_rule(rules, "system.ping") == ("system.ping", None)
    reordered = parse_rules({"reports.*": "2/s", "*": "1/s"})
    assert method_rule(reordered, "reports.weekly") == ("reports.*", Limit(2, 1))
    assert method_rule(parse_rules({"reports.*": "2/s"}), "other") is None
    # Glob characters are literal for exact names, and matching is case-sensitive.
    assert method_rule(parse_rules({"a?c": "1/s"}), "A?C") is None


def test_settings_parse_limits_from_the_dict_and_the_environment(rpc_settings, rpc_env) -> None:
    rpc_settings(RATE_LIMITS={"send": "10/minute", "reports.*": {"rate": "1/s", "burst": 4}})
    assert get_config().rate_limits == (("send", Limit(10, 60)), ("reports.*", Limit(1, 1, 4)))
    rpc_env("RATE_LIMITS", "send=5/minute burst 1,*=100/hour")
    rpc_env("RATE_LIMIT_EXEMPT_USERS", "root, ops")
    rpc_env("RATE_LIMIT_FAIL_OPEN", "false")
    config = get_config()
    assert config.rate_limits == (("send", Limit(5, 60, 1)), ("*", Limit(100, 3600)))
    assert config.rate_limit_exempt_users == ("root", "ops")
    assert config.rate_limit_fail_open is False


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("RATE_LIMITS", {"send": "10 per minute"}),
        ("RATE_LIMITS", "send=1/s"),
        ("RATE_LIMITS", {"": "1/s"}),
        ("RATE_LIMIT_REDIS_URL", "http://nope"),
        ("RATE_LIMIT_FAIL_OPEN", "yes"),
        ("RATE_LIMIT_TIMEOUT", 0),
        ("RATE_LIMIT_BACKOFF_SECONDS", -1),
        ("RATE_LIMIT_KEY_PREFIX", ""),
        ("RATE_LIMIT_IPV6_PREFIX", 129),
        ("RATE_LIMIT_EXEMPT_STAFF", 1),
        ("RATE_LIMIT_EXEMPT_USERS", [""]),
        ("RATE_LIMIT_POLICY", "not_a_dotted_path"),
    ],
)
def test_invalid_settings_name_their_key(key: str, value: Any) -> None:
    with pytest.raises(ImproperlyConfigured, match=key):
        DjangoCfgRPCConfig.from_mapping({key: value})


def test_a_policy_that_cannot_be_imported_is_reported(rpc_settings) -> None:
    rpc_settings(RATE_LIMITS={"a": "1/s"}, RATE_LIMIT_POLICY="tests.test_ratelimit.missing")
    (error,) = check_rate_limit_policy()
    assert error.id == "django_rpc_audit.E003"
    assert "RATE_LIMIT_POLICY" in error.msg
    with pytest.raises(ImproperlyConfigured, match="RATE_LIMIT_POLICY"):
        get_rpc_client()
    rpc_settings(RATE_LIMIT_POLICY="tests.test_ratelimit.LIMITED")  # a string: not callable
    assert check_rate_limit_policy()[0].id == "django_rpc_audit.E003"
    rpc_settings(RATE_LIMIT_POLICY="tests.test_ratelimit.tier_policy")
    assert check_rate_limit_policy() == []


# -- subjects and keys ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("caller_ip", "subject"),
    [
        ("203.0.113.7", "ip:203.0.113.7"),
        ("2001:db8:1:2:aaaa::1", "ip:2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff:ffff:ffff:ffff", "ip:2001:db8:1:2::/64"),
        ("2001:db8:1:3::1", "ip:2001:db8:1:3::/64"),
        ("::ffff:203.0.113.7", "ip:203.0.113.7"),
        ("fe80::1%eth0", "ip:fe80::/64"),
        ("not an ip", "ip:not an ip"),
    ],
)
def test_ip_subjects(caller_ip: str, subject: str) -> None:
    assert ip_subject(caller_ip) == subject


def test_ipv6_prefix_is_configurable() -> None:
    assert ip_subject("2001:db8:1:2:aaaa::1", 128) == "ip:2001:db8:1:2:aaaa::1/128"
    assert ip_subject("2001:db8:1:2:aaaa::1", 48) == "ip:2001:db8:1::/48"


def limiter_for(**keys: Any) -> RateLimiter:
    return RateLimiter(DjangoCfgRPCConfig.from_mapping(keys), LocalTransport())


def test_keys_are_per_method_or_per_rule_and_never_collide() -> None:
    limiter = limiter_for(
        RATE_LIMITS={"a:b": "1/s", "a": "1/s", "r.*": {"rate": "1/s", "shared": True}}
    )
    first = limiter.ticket("a:b", None, "10.0.0.1")
    second = limiter.ticket("a", None, "b:ip:10.0.0.1")
    assert first is not None
    assert second is not None
    assert first.key != second.key
    assert first.key == "rpc_audit:ratelimit:5:m:a:b:ip:10.0.0.1"
    shared = {limiter.ticket(method, None, "10.0.0.1").key for method in ("r.x", "r.y")}  # type: ignore[union-attr]
    assert shared == {"rpc_audit:ratelimit:5:p:r.*:ip:10.0.0.1"}
    # Long methods and subjects are hashed: keys stay short whatever a caller passes.
    long_key = limiter.ticket("r." + "x" * 10_000, None, "y" * 10_000).key  # type: ignore[union-attr]
    assert len(long_key) < 200


def test_subject_is_the_user_else_the_ip_else_unknown() -> None:
    limiter = limiter_for(RATE_LIMITS={"*": "1/s"})
    user = UserFactory.build(pk=42)
    assert limiter.subject(user, "10.0.0.1") == "user:42"
    assert limiter.subject(None, "10.0.0.1") == "ip:10.0.0.1"
    assert limiter.subject(None, None) == "unknown"


def test_unlimited_methods_cost_no_redis_work(rpc_settings, local_handler) -> None:
    """No rule, or an unlimited one: the request goes out untouched, Redis is never asked."""
    down = f"redis://127.0.0.1:{free_port()}/0"
    rpc_settings(RATE_LIMITS={"limited.*": "1/s", "free": None}, RATE_LIMIT_REDIS_URL=down)
    local_handler("free", lambda params: {"ok": True})
    local_handler("other", lambda params: {"ok": True})
    client = get_rpc_client()
    limiter = client.rate_limiter
    assert limiter is not None
    request = RPCRequest("other", {}, str(uuid.uuid4()), "r", 1.0, "{}")
    assert limiter.limit(request, None, "10.0.0.1") is request
    before = rate_limit_stats()
    for _ in range(3):
        assert client.call("free") == {"ok": True}
        assert client.call("other") == {"ok": True}
    assert limiter._client is None  # no connection was ever made
    assert stats_delta(before) == {}


def test_no_rate_limits_means_no_limiter(rpc_settings) -> None:
    rpc_settings(RATE_LIMITS={})
    assert get_rpc_client().rate_limiter is None


# -- the GCRA script on the real Redis --------------------------------------------------------


@pytest.mark.redis
@hypothesis_settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(count=st.integers(1, 50), burst=st.integers(1, 20), extra=st.integers(1, 3))
def test_gcra_passes_exactly_the_burst_at_once_and_names_the_wait(
    redis_client: redis.Redis, key_prefix: str, count: int, burst: int, extra: int
) -> None:
    limit = Limit(count, 3600, burst)
    key = f"{key_prefix}{uuid.uuid4().hex}"
    clock = time.monotonic()
    waits = [
        gcra.run(redis_client, [key], [limit.interval_us, limit.tolerance_us])
        for _ in range(burst + extra)
    ]
    elapsed_us = (time.monotonic() - clock) * 1_000_000
    assert waits[:burst] == [0] * burst
    for wait in waits[burst:]:
        # The next call is due one emission interval after the burst began.
        assert limit.interval_us - elapsed_us <= wait <= limit.interval_us
    # The state is exact whole microseconds, and expires when it no longer holds anything back.
    tat = int(redis_client.get(key))  # type: ignore[arg-type]
    now_s, now_us = redis_client.time()
    assert 0 < tat - (now_s * 1_000_000 + now_us) <= burst * limit.interval_us
    assert 0 < redis_client.pttl(key) <= burst * limit.interval_us // 1000 + 1


@pytest.mark.redis
def test_retry_after_is_exact(redis_client: redis.Redis, key_prefix: str) -> None:
    """Waiting ``retry_after`` is enough: the next call passes."""
    limit = Limit.parse("20/second burst 1")
    key = f"{key_prefix}exact"
    arguments = [limit.interval_us, limit.tolerance_us]
    assert gcra.run(redis_client, [key], arguments) == 0
    wait = gcra.run(redis_client, [key], arguments)
    assert 0 < wait <= limit.interval_us
    time.sleep(wait / 1_000_000)
    assert gcra.run(redis_client, [key], arguments) == 0


@pytest.mark.redis
def test_a_refused_call_changes_nothing(redis_client: redis.Redis, key_prefix: str) -> None:
    limit = Limit.parse("1/hour")
    key, stream = f"{key_prefix}k", f"{key_prefix}stream"
    arguments = [limit.interval_us, limit.tolerance_us, 100, '{"n": 1}']
    assert gcra.run(redis_client, [key, stream], arguments) == 0
    state = redis_client.get(key)
    assert gcra.run(redis_client, [key, stream], arguments) > 0
    assert redis_client.get(key) == state
    assert redis_client.xlen(stream) == 1
    redis_client.delete(stream)


# -- the client: calls over their limit --------------------------------------------------------


@pytest.mark.redis
@pytest.mark.django_db
def test_a_refused_call_is_not_sent_raises_signals_and_leaves_a_row(
    limits, redis_transport, responder, redis_client, signals, monkeypatch
) -> None:
    limits({LIMITED: "2/hour", "*": None})
    redis_client.script_load(gcra.SCRIPT)  # as after any first call: EVALSHA finds it
    client = get_rpc_client()
    assert client.rate_limiter is not None
    assert client.rate_limiter.combined
    sent = record_commands(client.transport.client, monkeypatch)  # type: ignore[attr-defined]
    with rpc_context(caller_ip="198.51.100.4"):
        assert client.call(LIMITED, {"n": 1}) == {"echo": {"n": 1}}
        assert client.call(LIMITED, {"n": 2}) == {"echo": {"n": 2}}
        error = refused(lambda: client.call(LIMITED, {"n": 3, "password": "pw"}))
        assert client.call("test.free", {"n": 4}) == {"echo": {"n": 4}}
    assert isinstance(error, RPCError)
    assert error.code == "rate_limited"
    assert 1790 < error.retry_after <= 1800  # one call is due half an hour after the first
    assert "2/hour" in error.message
    # The check ran inside the request's XADD script: no round trip of its own.
    assert sent == ["EVALSHA", "BLPOP", "EVALSHA", "BLPOP", "EVALSHA", "XADD", "BLPOP"]
    assert [request["params"]["n"] for request in responder.requests] == [1, 2, 4]
    assert [event["status"] for event in signals.finished] == [
        "success",
        "success",
        "rate_limited",
        "success",
    ]
    assert len(signals.started) == 4
    row = RPCLog.objects.get(status=RPCStatus.RATE_LIMITED)
    assert row.error_code == "rate_limited"
    assert row.params == {"n": 3, "password": "***"}
    assert row.caller_ip == "198.51.100.4"
    assert row.duration_ms is None  # never ran: no latency to report
    assert list(RPCLog.objects.rate_limited()) == [row]


@pytest.mark.redis
@pytest.mark.django_db(transaction=True)
@pytest.mark.asyncio
async def test_acall_is_limited_in_the_xadd_script(
    limits, redis_transport, responder, redis_client, signals
) -> None:
    limits({LIMITED: "1/hour"})
    redis_client.script_load(gcra.SCRIPT)
    client = get_rpc_client()
    async_client = client.transport._async_client()  # type: ignore[attr-defined]
    sent: list[str] = []
    original = async_client.execute_command

    async def execute(*args: Any, **options: Any) -> Any:
        sent.append(str(args[0]).upper())
        return await original(*args, **options)

    async_client.execute_command = execute
    with rpc_context(caller_ip="198.51.100.5"):
        assert await client.acall(LIMITED, {"n": 1}) == {"echo": {"n": 1}}
        with pytest.raises(RPCRateLimitedError) as info:
            await client.acall(LIMITED, {"n": 2})
    assert info.value.retry_after > 3590
    assert sent == ["EVALSHA", "BLPOP", "EVALSHA"]
    assert [event["status"] for event in signals.finished] == ["success", "rate_limited"]
    assert await RPCLog.objects.rate_limited().acount() == 1


@pytest.mark.redis
@pytest.mark.django_db
def test_fire_and_forget_is_limited(limits, redis_transport, redis_client, signals) -> None:
    limits({LIMITED: "2/hour"})
    client = get_rpc_client()
    with rpc_context(caller_ip="198.51.100.6"):
        client.fire_and_forget(LIMITED, {"n": 1})
        client.fire_and_forget(LIMITED, {"n": 2})
        refused(lambda: client.fire_and_forget(LIMITED, {"n": 3}))
    assert redis_client.xlen(redis_transport) == 2
    assert [event["status"] for event in signals.finished] == [
        "success",
        "success",
        "rate_limited",
    ]
    assert RPCLog.objects.rate_limited().count() == 1


@pytest.mark.redis
@pytest.mark.django_db
def test_the_local_transport_checks_in_one_round_trip(
    limits, echo_handler, redis_client, monkeypatch, signals
) -> None:
    limits({"test.echo": "2/hour"})
    redis_client.script_load(gcra.SCRIPT)
    client = get_rpc_client()
    assert client.rate_limiter is not None
    assert not client.rate_limiter.combined
    sent = record_commands(client.rate_limiter.client, monkeypatch)
    with rpc_context(caller_ip="198.51.100.7"):
        client.call("test.echo", {"n": 1})
        client.fire_and_forget("test.echo", {"n": 2})
        refused(lambda: client.call("test.echo", {"n": 3}))
    assert sent == ["EVALSHA"] * 3
    assert [event["status"] for event in signals.finished] == [
        "success",
        "success",
        "rate_limited",
    ]


@pytest.mark.redis
@pytest.mark.django_db(transaction=True)
@pytest.mark.asyncio
async def test_acall_on_the_local_transport_is_limited(limits, echo_handler) -> None:
    limits({"test.echo": "1/hour"})
    client = get_rpc_client()
    with rpc_context(caller_ip="198.51.100.8"):
        await client.acall("test.echo", {"n": 1})
        with pytest.raises(RPCRateLimitedError):
            await client.acall("test.echo", {"n": 2})
    assert await RPCLog.objects.rate_limited().acount() == 1


@pytest.mark.redis
@pytest.mark.django_db
def test_a_limit_on_another_redis_checks_before_sending(
    limits, redis_transport, responder, private_redis
) -> None:
    """``RATE_LIMIT_REDIS_URL`` elsewhere: the check is a round trip of its own, then XADD."""
    limits({LIMITED: "1/hour"}, RATE_LIMIT_REDIS_URL=private_redis.url)
    client = get_rpc_client()
    assert client.rate_limiter is not None
    assert not client.rate_limiter.combined
    with rpc_context(caller_ip="198.51.100.9"):
        client.call(LIMITED, {"n": 1})
        refused(lambda: client.call(LIMITED, {"n": 2}))
    assert len(responder.requests) == 1
    private = redis.Redis.from_url(private_redis.url)
    assert len(list(private.scan_iter("*"))) == 1  # the one subject's state lives there
    private.close()


@pytest.mark.redis
@pytest.mark.django_db
def test_refused_calls_are_logged_whatever_the_sample_rate(limits, echo_handler) -> None:
    limits({"test.echo": "1/hour"}, SAMPLE_RATE=0.0)
    client = get_rpc_client()
    with rpc_context(caller_ip="198.51.100.10"):
        client.call("test.echo")
        refused(lambda: client.call("test.echo"))
    row = RPCLog.objects.get()  # the success was sampled away, the refusal was not
    assert (row.status, row.sample_rate) == (RPCStatus.RATE_LIMITED, 1.0)


# -- whose budget ----------------------------------------------------------------------------


@pytest.mark.redis
@pytest.mark.django_db
def test_one_user_exhausting_a_limit_leaves_another_alone(limits, echo_handler) -> None:
    limits({"test.echo": "2/hour"})
    alice, bob = UserFactory(), UserFactory()
    client = get_rpc_client()
    for _ in range(2):
        client.call("test.echo", user=alice, caller_ip="10.0.0.1")
    refused(lambda: client.call("test.echo", user=alice, caller_ip="10.0.0.1"))
    # Same IP, another user: another budget. And alice from another IP is still alice.
    client.call("test.echo", user=bob, caller_ip="10.0.0.1")
    client.call("test.echo", user=bob, caller_ip="10.0.0.1")
    refused(lambda: client.call("test.echo", user=alice, caller_ip="10.9.9.9"))
    assert RPCLog.objects.rate_limited().filter(user=alice).count() == 2
    assert RPCLog.objects.rate_limited().filter(user=bob).count() == 0


@pytest.mark.redis
@pytest.mark.django_db
def test_per_method_budgets_unless_the_rule_is_shared(limits, local_handler) -> None:
    for method in ("a.one", "a.two", "s.one", "s.two"):
        local_handler(method, lambda params: {})
    limits({"a.*": "1/hour", "s.*": {"rate": "1/hour", "shared": True}})
    client = get_rpc_client()
    with rpc_context(caller_ip="10.0.0.2"):
        client.call("a.one")
        client.call("a.two")  # its own budget
        client.call("s.one")
        refused(lambda: client.call("s.two"))  # one budget for every s.* method


@pytest.mark.redis
@pytest.mark.django_db
def test_anonymous_callers_are_keyed_by_the_ip_attribution_trusts(
    limits, rpc_settings, echo_handler
) -> None:
    limits({"test.echo": "1/hour"})
    http = Client()
    assert http.get("/sync/call/", REMOTE_ADDR="203.0.113.1").status_code == 200
    # A forged X-Forwarded-For from an untrusted peer buys no fresh budget.
    with pytest.raises(RPCRateLimitedError):
        http.get("/sync/call/", REMOTE_ADDR="203.0.113.1", HTTP_X_FORWARDED_FOR="192.0.2.50")
    assert http.get("/sync/call/", REMOTE_ADDR="203.0.113.2").status_code == 200
    # Behind a trusted proxy, the client it names is the subject.
    rpc_settings(TRUSTED_PROXY_IPS=["10.1.1.1"])
    for client_ip in ("192.0.2.60", "192.0.2.61"):
        response = http.get(
            "/sync/call/", REMOTE_ADDR="10.1.1.1", HTTP_X_FORWARDED_FOR=f"{client_ip}, 10.1.1.1"
        )
        assert response.status_code == 200
    with pytest.raises(RPCRateLimitedError):
        http.get("/sync/call/", REMOTE_ADDR="10.1.1.1", HTTP_X_FORWARDED_FOR="192.0.2.60, 10.1.1.1")
    assert sorted(RPCLog.objects.rate_limited().values_list("caller_ip", flat=True)) == [
        "192.0.2.60",
        "203.0.113.1",
    ]


@pytest.mark.redis
@pytest.mark.django_db
def test_ipv6_callers_share_their_64(limits, echo_handler) -> None:
    limits({"test.echo": "1/hour"})
    client = get_rpc_client()
    client.call("test.echo", caller_ip="2001:db8:5:6::1")
    refused(lambda: client.call("test.echo", caller_ip="2001:db8:5:6:ffff::2"))
    client.call("test.echo", caller_ip="2001:db8:5:7::1")


# -- exemptions and policies ------------------------------------------------------------------


PRO = Limit.parse("3/hour")


def tier_policy(call: RateLimitCall) -> RateLimitCall | None:
    """A policy as a site writes one: plans, organisations, a bypass."""
    user = call.user
    if user is not None and user.last_name == "pro":
        return call.replace(limit=PRO)
    if user is not None and user.last_name.startswith("org-"):
        return call.replace(subject=f"org:{user.last_name}")
    if call.caller_ip == "10.99.0.1":
        return None
    return call


def broken_policy(call: RateLimitCall) -> RateLimitCall | None:
    raise ZeroDivisionError("bug in the policy")


def wrong_policy(call: RateLimitCall) -> Any:
    return "100/hour"


@pytest.mark.redis
@pytest.mark.django_db
def test_staff_and_listed_users_are_exempt_when_configured(limits, echo_handler) -> None:
    staff = UserFactory(is_staff=True)
    listed = UserFactory(username="ops-bot")
    limits({"test.echo": "1/hour"})
    client = get_rpc_client()
    client.call("test.echo", user=staff)
    refused(lambda: client.call("test.echo", user=staff))
    limits(
        {"test.echo": "1/hour"},
        RATE_LIMIT_EXEMPT_STAFF=True,
        RATE_LIMIT_EXEMPT_USERS=["ops-bot"],
    )
    client = get_rpc_client()
    for _ in range(3):
        client.call("test.echo", user=staff)
        client.call("test.echo", user=listed)
    other = UserFactory()
    client.call("test.echo", user=other)
    refused(lambda: client.call("test.echo", user=other))


@pytest.mark.redis
@pytest.mark.django_db
def test_a_policy_sets_per_user_limits_subjects_and_bypasses(limits, echo_handler) -> None:
    limits({"test.echo": "1/hour"}, RATE_LIMIT_POLICY="tests.test_ratelimit.tier_policy")
    client = get_rpc_client()
    pro, free = UserFactory(last_name="pro"), UserFactory(last_name="")
    for _ in range(3):
        client.call("test.echo", user=pro)
    error = refused(lambda: client.call("test.echo", user=pro))
    assert "3/hour" in error.message
    client.call("test.echo", user=free)
    refused(lambda: client.call("test.echo", user=free))
    # Two members of one organisation share its budget.
    first, second = UserFactory(last_name="org-7"), UserFactory(last_name="org-7")
    client.call("test.echo", user=first)
    refused(lambda: client.call("test.echo", user=second))
    for _ in range(3):
        client.call("test.echo", caller_ip="10.99.0.1")


@pytest.mark.redis
@pytest.mark.django_db
@pytest.mark.parametrize("policy", ["broken_policy", "wrong_policy"])
def test_a_failing_policy_fails_open_counted_and_logged(
    limits, echo_handler, caplog, policy
) -> None:
    limits({"test.echo": "1/hour"}, RATE_LIMIT_POLICY=f"tests.test_ratelimit.{policy}")
    client = get_rpc_client()
    before = rate_limit_stats()
    with caplog.at_level(logging.ERROR, logger="django_rpc_audit.ratelimit"):
        for _ in range(3):
            client.call("test.echo", caller_ip="10.0.0.3")
    assert stats_delta(before) == {"errors": 3, "failed_open": 3}
    # Logged once per back-off period, not once per call.
    assert len([r for r in caplog.records if "RATE_LIMIT_POLICY failed" in r.message]) == 1
    limits(
        {"test.echo": "1/hour"},
        RATE_LIMIT_POLICY=f"tests.test_ratelimit.{policy}",
        RATE_LIMIT_FAIL_OPEN=False,
    )
    error = refused(lambda: get_rpc_client().call("test.echo", caller_ip="10.0.0.3"))
    assert error.code == "rate_limiter_unavailable"


# -- the limiter's Redis fails ----------------------------------------------------------------


@pytest.mark.redis
@pytest.mark.django_db
def test_limiter_redis_down_fails_open_counted_logged_and_recovers(
    limits, echo_handler, private_redis, caplog, signals
) -> None:
    limits(
        {"test.echo": "1/hour"},
        RATE_LIMIT_REDIS_URL=private_redis.url,
        RATE_LIMIT_BACKOFF_SECONDS=5,
    )
    client = get_rpc_client()
    limiter = client.rate_limiter
    assert limiter is not None
    now = [1000.0]
    limiter.clock = lambda: now[0]  # the back-off's clock, moved by hand
    with rpc_context(caller_ip="10.0.0.4"):
        client.call("test.echo")
        refused(lambda: client.call("test.echo"))
        private_redis.stop()
        before = rate_limit_stats()
        with caplog.at_level(logging.INFO, logger="django_rpc_audit.ratelimit"):
            for _ in range(5):
                assert client.call("test.echo") == {"echo": {}}
            # One failed attempt, then the calls pass without trying during the back-off.
            assert stats_delta(before) == {"errors": 1, "failed_open": 5}
            warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
            assert len(warnings) == 1
            assert private_redis.url.split("@")[-1].split("/")[0] in warnings[0].message
            assert "pass unchecked" in warnings[0].message
            # The limiter's Redis comes back (empty): after the back-off, limits apply again.
            private_redis.start()
            now[0] += 4.9
            client.call("test.echo")  # still backing off: unchecked
            now[0] += 0.2
            client.call("test.echo")
            refused(lambda: client.call("test.echo"))
        recovered = [r for r in caplog.records if r.levelno == logging.INFO]
        assert len(recovered) == 1
        assert "6 limited call(s) passed unchecked" in recovered[0].message
    statuses = [event["status"] for event in signals.finished]
    assert statuses == ["success", "rate_limited", *["success"] * 7, "rate_limited"]


@pytest.mark.redis
@pytest.mark.django_db(transaction=True)
@pytest.mark.asyncio
async def test_acall_fails_open_when_the_limiter_redis_is_down(
    limits, echo_handler, private_redis
) -> None:
    limits({"test.echo": "1/hour"}, RATE_LIMIT_REDIS_URL=private_redis.url)
    private_redis.stop()
    before = rate_limit_stats()
    client = get_rpc_client()
    with rpc_context(caller_ip="10.0.0.5"):
        assert await client.acall("test.echo") == {"echo": {}}
        assert await client.acall("test.echo") == {"echo": {}}
    assert stats_delta(before) == {"errors": 1, "failed_open": 2}


@pytest.mark.redis
@pytest.mark.django_db
def test_limiter_redis_down_fails_closed_when_configured(
    limits, echo_handler, private_redis
) -> None:
    limits(
        {"test.echo": "1/hour"},
        RATE_LIMIT_REDIS_URL=private_redis.url,
        RATE_LIMIT_FAIL_OPEN=False,
        RATE_LIMIT_BACKOFF_SECONDS=7,
    )
    private_redis.stop()
    before = rate_limit_stats()
    client = get_rpc_client()
    for _ in range(2):
        error = refused(lambda: client.call("test.echo", caller_ip="10.0.0.6"))
        assert error.code == "rate_limiter_unavailable"
        assert error.retry_after == 7
    assert stats_delta(before) == {"errors": 1, "failed_closed": 2}
    row = RPCLog.objects.rate_limited().first()
    assert row is not None
    assert row.error_code == "rate_limiter_unavailable"


@pytest.mark.redis
@pytest.mark.django_db
def test_a_script_error_in_the_combined_path_fails_open_with_a_plain_xadd(
    limits, redis_transport, responder, redis_client, key_prefix, caplog
) -> None:
    limits({LIMITED: "1/hour"})
    client = get_rpc_client()
    ticket = client.rate_limiter.ticket(LIMITED, None, "10.0.0.7")  # type: ignore[union-attr]
    assert ticket is not None
    redis_client.rpush(ticket.key, "not a time")  # WRONGTYPE for the script's GET
    before = rate_limit_stats()
    with rpc_context(caller_ip="10.0.0.7"), caplog.at_level(logging.WARNING):
        assert client.call(LIMITED, {"n": 1}) == {"echo": {"n": 1}}
        assert client.call(LIMITED, {"n": 2}) == {"echo": {"n": 2}}
    assert stats_delta(before) == {"errors": 1, "failed_open": 2}
    assert len(responder.requests) == 2
    assert "WRONGTYPE" in caplog.text


@pytest.mark.redis
@pytest.mark.django_db
def test_a_redis_that_lost_its_scripts_is_given_the_script_again(
    rpc_settings, limits, private_redis, local_handler
) -> None:
    """Scripts vanish on a restart or a ``SCRIPT FLUSH``: ``EVAL`` replaces the ``EVALSHA``."""
    local_handler("test.echo", lambda params: {})
    limits({"test.echo": "2/hour"}, RATE_LIMIT_REDIS_URL=private_redis.url)
    client = get_rpc_client()
    private = redis.Redis.from_url(private_redis.url)
    client.call("test.echo", caller_ip="10.0.0.8")
    private.script_flush()
    before = rate_limit_stats()
    client.call("test.echo", caller_ip="10.0.0.8")
    refused(lambda: client.call("test.echo", caller_ip="10.0.0.8"))
    assert stats_delta(before) == {"allowed": 1, "limited": 1}
    private.close()


# -- HTTP 429 ---------------------------------------------------------------------------------


def test_rate_limited_response_has_retry_after_in_whole_seconds() -> None:
    response = rate_limited_response(RPCRateLimitedError("over", retry_after=2.2))
    assert response.status_code == 429
    assert response["Retry-After"] == "3"
    assert rate_limited_response(RPCRateLimitedError("x", retry_after=0.01))["Retry-After"] == "1"


def test_the_middleware_answers_429_for_sync_views(rf) -> None:
    def view(request: HttpRequest) -> Any:
        raise RPCRateLimitedError("over", retry_after=41.5)

    middleware = RPCRateLimitMiddleware(view)
    assert middleware.process_exception(rf.get("/"), ValueError("other")) is None
    response = middleware.process_exception(
        rf.get("/"), RPCRateLimitedError("over", retry_after=41.5)
    )
    assert response is not None
    assert (response.status_code, response["Retry-After"]) == (429, "42")


@pytest.mark.redis
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("path", ["/sync/call/", "/async/call/"])
def test_views_answer_429_through_the_middleware(limits, settings, echo_handler, path) -> None:
    settings.MIDDLEWARE = [
        *settings.MIDDLEWARE,
        "django_rpc_audit.ratelimit.http.RPCRateLimitMiddleware",
    ]
    limits({"test.echo": "1/hour"})
    http = Client()
    assert http.get(path, REMOTE_ADDR="203.0.113.30").status_code == 200
    response = http.get(path, REMOTE_ADDR="203.0.113.30")
    assert response.status_code == 429
    assert 3590 <= int(response["Retry-After"]) <= 3600


# -- the asyncio clients are per event loop -----------------------------------------------------


@pytest.mark.redis
def test_async_checks_on_two_event_loops(limits, local_handler) -> None:
    local_handler("test.echo", lambda params: {})
    limits({"test.echo": "2/hour"}, ENABLE_LOGGING=False)
    limiter = get_rpc_client().rate_limiter
    assert limiter is not None
    request = RPCRequest("test.echo", {}, str(uuid.uuid4()), "r", 1.0, "{}")
    assert asyncio.run(limiter.alimit(request, None, "10.0.0.9")) is request
    assert asyncio.run(limiter.alimit(request, None, "10.0.0.9")) is request
    with pytest.raises(RPCRateLimitedError):
        asyncio.run(limiter.alimit(request, None, "10.0.0.9"))
