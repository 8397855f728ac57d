"""Settings: the ``DJANGO_CFG_RPC`` dict, parsed once into a frozen :class:`DjangoCfgRPCConfig`."""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any, Literal
from urllib.parse import urlsplit

import environ
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.signals import setting_changed
from django.dispatch import receiver
from redis.connection import parse_url

from django_rpc_audit.alerts.endpoints import WebhookEndpoint, parse_endpoints
from django_rpc_audit.forwarded import trusted_networks
from django_rpc_audit.ratelimit.rules import Rule, parse_rules
from django_rpc_audit.redaction import FieldRule, MethodRule, key_words
from django_rpc_audit.utils import redact_url

SETTING_NAME = "DJANGO_CFG_RPC"
ENV_PREFIX = f"{SETTING_NAME}__"

Transport = Literal["redis", "local"]
TRANSPORTS: tuple[Transport, ...] = ("redis", "local")

WriteMode = Literal["buffered", "sync", "stream"]
WRITE_MODES: tuple[WriteMode, ...] = ("buffered", "sync", "stream")

# django-environ reads any unknown word as False ("ture" would silently turn logging off);
# we accept its true words plus their usual opposites and reject everything else.
_FALSE_STRINGS = ("false", "off", "no", "n", "0", "")

#: Smallest size cap: room for the truncation marker and a short preview.
MIN_CAP_BYTES = 128

#: Longest wait, in seconds, a duration setting may ask for: a week. A thread cannot wait much
#: longer (``threading.TIMEOUT_MAX``, under 300 years), a window cannot reach before year 1, and
#: an infinite or absurd value would otherwise end in an ``OverflowError`` far from its cause.
MAX_WAIT_SECONDS = 7 * 24 * 3600.0


@dataclass(frozen=True, slots=True, kw_only=True)
class DjangoCfgRPCConfig:
    """The typed, validated configuration the package reads.

    Build it from the ``DJANGO_CFG_RPC`` dict (upper-case keys) or assign an instance to the
    setting directly::

        DJANGO_CFG_RPC = DjangoCfgRPCConfig(redis_url="redis://localhost:6379/2")

    Either way, environment variables ``DJANGO_CFG_RPC__<KEY>`` win over what the settings say.
    """

    # -- calls and transport
    #: Master switch. When false, :func:`~django_rpc_audit.get_rpc_client` raises
    #: :class:`~django_rpc_audit.exceptions.RPCDisabledError`.
    enabled: bool = True
    #: Redis server the django-ipc peer listens on: a ``redis://``, ``rediss://`` or ``unix://``
    #: URL (``unix:///run/redis.sock?db=2``). A password in it never appears in errors.
    redis_url: str = "redis://localhost:6379/2"
    #: Write an ``RPCLog`` row for every call. Off: calls and signals go on, no rows are written.
    enable_logging: bool = True
    #: ``"redis"`` (the django-ipc wire protocol) or ``"local"`` (in-process handlers).
    transport: Transport = "redis"
    #: Seconds a call waits for its reply before it is a timeout (sent to the server rounded up
    #: to whole seconds). At most a week, as every duration setting.
    rpc_timeout: float = 30.0
    #: Redis Stream the requests are added to.
    request_stream: str = "stream:requests"
    #: Prefix of the per-call reply list; the correlation id follows it.
    response_key_prefix: str = "list:response:"
    #: Approximate ``MAXLEN`` of the request stream.
    stream_maxlen: int = 10_000
    #: Addresses or CIDR networks of the reverse proxies whose ``X-Forwarded-For`` is believed:
    #: only when the peer (``REMOTE_ADDR``) is one of them, and the client is the right-most
    #: address that is not. Empty, and with no ``IPWARE_*`` setting either, the caller IP is
    #: ``REMOTE_ADDR`` only.
    trusted_proxy_ips: tuple[str, ...] = field(default=())

    # -- data hygiene
    #: Key words redacted on top of the built-in secret words (``password``, ``token``, ...).
    redact_keys: tuple[str, ...] = field(default=())
    #: Per-method rules, by exact name or glob: ``{"auth.*": {"params": "drop",
    #: "response": ["user_id"]}}`` drops the params and keeps only ``user_id`` of the response.
    #: Settings only: an environment variable cannot express these rules.
    redact_methods: tuple[tuple[str, MethodRule], ...] = field(default=())
    #: Largest params stored, in bytes of compact UTF-8 JSON; bigger ones are stored as a
    #: truncation marker (valid JSON with the original size and a preview). At least 128.
    max_params_bytes: int = 65_536
    #: Largest response stored, in bytes of compact UTF-8 JSON, truncated like the params.
    max_response_bytes: int = 65_536
    #: Longest error message stored, in UTF-8 bytes; a longer one keeps its start and end.
    max_error_message_bytes: int = 16_384
    #: Longest user agent kept, in UTF-8 bytes; a longer one keeps its start and end.
    max_user_agent_bytes: int = 1_024
    #: Share of *successful* calls that are logged (0..1); failures are always logged.
    sample_rate: float = 1.0
    #: Per-method sample rates, by exact name or glob: ``{"system.ping": 0.01}``.
    sample_rates: tuple[tuple[str, float], ...] = field(default=())
    #: Successful calls at least this slow (ms) are always logged, sampled or not.
    always_log_slower_than_ms: float = 1_000.0
    #: Days ``rpc_logs_cleanup`` keeps when ``--days`` is not given.
    retention_days: int = 90
    #: Seconds past ``RPC_TIMEOUT`` after which ``rpc_logs_reap`` calls a pending row lost.
    reap_margin_seconds: float = 60.0
    # -- admin and dashboard
    #: Calls at least this slow (milliseconds) show their duration in the admin's warning colour.
    admin_duration_warn_ms: float = 500.0
    #: Calls at least this slow (milliseconds) show their duration in the admin's danger colour.
    #: Must be above ``ADMIN_DURATION_WARN_MS``.
    admin_duration_slow_ms: float = 2000.0
    #: Seconds between the analytics dashboard's automatic refreshes for the last hour (longer
    #: windows refresh less often); 0 turns them off.
    admin_dashboard_refresh_seconds: int = 5
    # -- buffered writer
    #: ``"buffered"``: the receivers only enqueue, a background thread writes batches on its own
    #: database connection. ``"sync"``: each event is written at once on the caller's thread and
    #: connection (inside the caller's transaction). ``"stream"``: buffered the same way, but the
    #: thread adds the rows to the Redis Stream ``LOG_STREAM``, and ``rpc_logs_ingest`` workers
    #: write them to the database.
    write_mode: WriteMode = "buffered"
    #: Most calls the buffered writer holds in memory. When full, successful calls are dropped
    #: first (counted and logged); failures and timeouts are kept.
    buffer_size: int = 100_000
    #: Most bytes the buffered writer holds in memory, estimated from the calls' stored texts
    #: (params and response JSON, counted twice, error message, user agent, 1 KB a call). When
    #: it would go over, successful calls are dropped first (counted and logged).
    buffer_max_bytes: int = 64 * 2**20
    #: Rows per batch of the buffered writer: one ``COPY`` (or ``INSERT``) and one commit.
    buffer_batch_size: int = 1_000
    #: Seconds between the buffered writer's flushes (sooner once a batch is full).
    buffer_flush_interval: float = 0.5
    #: Longest wait, in seconds, between retries while the database is unreachable (the backoff
    #: starts at 0.1 s and doubles).
    buffer_max_retry_delay: float = 10.0
    #: Seconds the process waits at exit for the buffered writer to write what it holds.
    buffer_shutdown_timeout: float = 10.0
    # -- alerts: webhooks and slow calls (see django_rpc_audit.alerts)
    #: Webhook endpoints, each a dict: ``NAME``, ``URL``, ``SECRET`` (``whsec_...``),
    #: ``EVENTS``, ``METHODS`` (globs), ``FORMAT``, ``INCLUDE_*``, ``GROUP_WINDOW_SECONDS``.
    webhooks: tuple[WebhookEndpoint, ...] = field(default=())
    #: Storm control: after an alert is sent, the same (endpoint, event, method, error code)
    #: within this many seconds is counted and sent as one digest at the end of the window.
    webhook_group_window_seconds: float = 60.0
    #: Seconds a webhook request may take before it counts as failed (and is retried).
    webhook_timeout: float = 15.0
    #: Seconds before each retry of a failed delivery (jittered); after the last, it gives up.
    webhook_retry_schedule: tuple[float, ...] = (5, 300, 1_800, 7_200, 18_000, 36_000, 36_000)
    #: Deliver from a background thread in every process that logs calls (besides the
    #: ``rpc_webhooks_deliver`` command); off: only the command delivers.
    webhook_delivery_thread: bool = True
    #: Seconds between the delivery thread's looks at the outbox for due or orphaned alerts.
    webhook_poll_interval: float = 2.0
    #: Scheme and host of the admin (``https://ops.example.com``): alerts link to the call's
    #: admin page. Empty: no link.
    admin_base_url: str = ""
    #: Flag calls slower than their method's recent normal (``is_slow``, ``rpc_slow``).
    slow_call_detection: bool = True
    #: No call faster than this (milliseconds) is ever slow.
    slow_call_floor_ms: float = 50.0
    #: Successful calls of a method seen before its baseline is trusted.
    slow_call_min_samples: int = 30
    #: Latest successful calls per method the baseline is computed from.
    slow_call_window: int = 200
    #: Modified z-score above which a call is slow: ``median + SCORE * 1.4826 * MAD``.
    slow_call_score: float = 3.5
    #: ... and a slow call takes at least this many times its method's median.
    slow_call_min_ratio: float = 3.0
    #: Explicit thresholds (milliseconds) by method name or glob; they replace the baseline.
    slow_call_thresholds_ms: tuple[tuple[str, float], ...] = field(default=())
    # -- log stream (WRITE_MODE "stream") and its ingest workers
    #: Redis Stream the stream writer adds rows to and ``rpc_logs_ingest`` reads.
    log_stream: str = "rpc_audit:log"
    #: Approximate ``MAXLEN`` of the log stream: the backlog it holds while the workers cannot
    #: write (an entry takes about 250 bytes of Redis memory plus its params and response).
    #: Older entries are trimmed, ingested or not: keep it above the longest backlog to survive.
    log_stream_maxlen: int = 1_000_000
    #: Redis server of the log stream; empty: ``REDIS_URL``.
    log_stream_redis_url: str = ""
    #: Consumer group the ingest workers share.
    ingest_group: str = "rpc_audit_ingest"
    #: Most entries an ingest worker writes per transaction.
    ingest_batch_size: int = 2_000
    #: Seconds an entry may stay unacknowledged with a consumer before another worker claims it
    #: (``XAUTOCLAIM``): longer than the slowest batch, or live workers' entries get claimed.
    ingest_claim_idle_seconds: float = 60.0
    #: Deliveries after which an entry still unacknowledged moves to ``<LOG_STREAM>:dead``.
    ingest_max_deliveries: int = 5

    # -- rate limits (docs/rate-limits.md)
    #: Limits by exact method name or glob, exact names first, then the first matching pattern
    #: in the order given: ``{"send_notification": "10/minute", "reports.*": {"rate":
    #: "100/hour", "burst": 10}, "system.ping": None, "*": "1000/minute"}``.
    rate_limits: tuple[Rule, ...] = field(default=())
    #: Redis the limiter keeps its state in; empty: ``REDIS_URL`` (then a limited call's check
    #: runs in the same script as its request's ``XADD``).
    rate_limit_redis_url: str = ""
    #: When the limiter's Redis fails: True lets limited calls through unchecked (counted and
    #: logged), False refuses them with ``RPCRateLimitedError``.
    rate_limit_fail_open: bool = True
    #: Seconds the limiter waits for its own Redis (connect and answer) before failing.
    rate_limit_timeout: float = 0.25
    #: Seconds after a limiter failure during which limited calls skip the check.
    rate_limit_backoff_seconds: float = 1.0
    #: Prefix of the limiter's Redis keys.
    rate_limit_key_prefix: str = "rpc_audit:ratelimit:"
    #: Anonymous IPv6 callers share the budget of their ``/N`` network (one host usually
    #: holds a whole /64).
    rate_limit_ipv6_prefix: int = 64
    #: Staff users (``is_staff``) are not limited.
    rate_limit_exempt_staff: bool = False
    #: Usernames that are not limited.
    rate_limit_exempt_users: tuple[str, ...] = field(default=())
    #: Dotted path to ``policy(call: RateLimitCall) -> RateLimitCall | None``: another limit
    #: or subject per call (plans, organisations), or ``None`` to exempt it.
    rate_limit_policy: str = ""

    # -- metrics and traces (integrations/)
    #: Trace every call as an OpenTelemetry CLIENT span of the global tracer provider (needs
    #: ``django-rpc-audit[otel]`` and an SDK), send its W3C trace context with the request and
    #: store its trace and span ids on the row.
    otel_traces: bool = False
    #: Record the histogram ``rpc.client.call.duration`` (seconds) through the OpenTelemetry
    #: metrics API.
    otel_metrics: bool = False
    #: Attribute that carries a failed call's error code on spans and metrics:
    #: ``rpc.response.status_code`` (semantic conventions 1.39 to 1.44; ``rpc.status_code``
    #: after them). Empty: not set.
    otel_status_code_attribute: str = "rpc.response.status_code"
    #: Count and time calls and the log pipeline in prometheus-client's registry (needs
    #: ``django-rpc-audit[prometheus]``).
    prometheus_metrics: bool = False
    #: Distinct method names a process uses as metric labels; any further one is ``_OTHER``.
    metrics_max_methods: int = 100
    #: The admin links a row to its trace with this URL; ``{trace_id}`` (and ``{span_id}``) are
    #: replaced by the row's ids. Empty: no link.
    trace_url_template: str = ""

    # -- usage and costs (docs/usage-and-costs.md)
    #: What a call costs, by exact method name or glob (exact names first, then the first
    #: matching pattern in the order given): a price (``"5.00"``, a ``Decimal``, an int), or the
    #: dotted path of a function computing it from the call
    #: (:class:`~django_rpc_audit.costs.CostCall`), e.g. ``{"reports.generate": "5.00",
    #: "ai.*": "myapp.billing.tokens"}``. A dotted path alone applies to every method. Prices
    #: are in one unit of your choice (a currency, credits), stored with 6 decimal places.
    #: Calls that carry a cost are never sampled out.
    costs: tuple[tuple[str, Decimal | str], ...] = field(default=())
    #: Outcomes that are billed: a call ending otherwise stores no cost. Any of ``success``,
    #: ``failed``, ``timeout``, ``rate_limited``.
    billable_statuses: tuple[str, ...] = ("success",)
    #: Days of rollups (hourly counts, costs and durations, see ``rpc_rollup``) that
    #: ``rpc_logs_cleanup`` keeps; 0 keeps them for ever. Usage reports and bills read them;
    #: rollups of rows still kept (``RETENTION_DAYS`` or ``--days``) are never deleted.
    rollup_retention_days: int = 400
    #: Seconds after an hour ends during which ``rpc_rollup`` still recomputes it on every run:
    #: longer than the latest a row may arrive (calls still running, an ingest backlog).
    rollup_settle_seconds: float = 3_600.0

    @property
    def log_stream_url(self) -> str:
        """The Redis URL of the log stream: ``LOG_STREAM_REDIS_URL``, else ``REDIS_URL``."""
        return self.log_stream_redis_url or self.redis_url

    def __repr__(self) -> str:
        # The dataclass repr would print the Redis URLs with their passwords.
        shown = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name, value in shown.items():
            if name.endswith("redis_url") and value:
                shown[name] = redact_url(value)
        fields = ", ".join(f"{name}={value!r}" for name, value in shown.items())
        return f"DjangoCfgRPCConfig({fields})"

    def __post_init__(self) -> None:
        if isinstance(self.trusted_proxy_ips, list | set | frozenset):
            # Settings naturally give lists; a tuple keeps the frozen config hashable.
            object.__setattr__(self, "trusted_proxy_ips", tuple(self.trusted_proxy_ips))
        _normalise_data_hygiene(self)
        _normalise_alerts(self)
        _normalise_rate_limits(self)
        _normalise_costs(self)
        _validate(self)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> DjangoCfgRPCConfig:
        """Build a config from a ``DJANGO_CFG_RPC``-style dict with upper-case keys."""
        known = {f.name.upper(): f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ImproperlyConfigured(
                f"{SETTING_NAME} has unknown key(s) {', '.join(unknown)}; "
                f"known keys are {', '.join(sorted(known))}."
            )
        kwargs = {known[key]: value for key, value in values.items()}
        return cls(**kwargs)

    def with_environ(self, environment: Mapping[str, str] | None = None) -> DjangoCfgRPCConfig:
        """Return a copy with every ``DJANGO_CFG_RPC__<KEY>`` environment variable applied."""
        environment = os.environ if environment is None else environment
        env = environ.Env()
        changes: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            var = f"{ENV_PREFIX}{f.name.upper()}"
            if var not in environment:
                continue
            changes[f.name] = _parse_env(env, var, environment[var], f.default)
        return dataclasses.replace(self, **changes) if changes else self


def _parse_env(env: environ.Env, var: str, raw: str, default: Any) -> Any:
    try:
        if isinstance(default, bool):
            if raw.strip().lower() not in (*environ.Env.BOOLEAN_TRUE_STRINGS, *_FALSE_STRINGS):
                raise ValueError(f"{raw!r} is not a boolean")
            return env.parse_value(raw, bool)
        if isinstance(default, tuple):
            return tuple(item.strip() for item in env.parse_value(raw, list))
        return env.parse_value(raw, type(default))
    except ValueError as exc:
        raise ImproperlyConfigured(f"Environment variable {var} is invalid: {exc}") from exc


def _fail(key: str, message: str) -> ImproperlyConfigured:
    return ImproperlyConfigured(f"{SETTING_NAME}[{key!r}] {message}")


def _validate(config: DjangoCfgRPCConfig) -> None:
    for name in ("enabled", "enable_logging"):
        if not isinstance(getattr(config, name), bool):
            raise _fail(name.upper(), f"must be True or False, not {getattr(config, name)!r}.")
    if config.transport not in TRANSPORTS:
        raise _fail(
            "TRANSPORT", f"must be one of {', '.join(TRANSPORTS)}, not {config.transport!r}."
        )
    timeout = config.rpc_timeout
    if not _is_number(timeout) or not 0 < timeout <= MAX_WAIT_SECONDS:
        raise _fail(
            "RPC_TIMEOUT",
            f"must be a positive number of seconds up to {MAX_WAIT_SECONDS:g}, not {timeout!r}.",
        )
    maxlen = config.stream_maxlen
    if isinstance(maxlen, bool) or not isinstance(maxlen, int) or maxlen < 1:
        raise _fail("STREAM_MAXLEN", f"must be a positive integer, not {maxlen!r}.")
    for name in ("request_stream", "response_key_prefix"):
        value = getattr(config, name)
        if not isinstance(value, str) or not value:
            raise _fail(name.upper(), f"must be a non-empty string, not {value!r}.")
    if not isinstance(config.trusted_proxy_ips, tuple) or not all(
        isinstance(ip, str) and ip for ip in config.trusted_proxy_ips
    ):
        raise _fail("TRUSTED_PROXY_IPS", "must be a list of IP addresses or CIDR networks.")
    try:
        trusted_networks(config.trusted_proxy_ips)
    except ValueError as exc:
        raise _fail("TRUSTED_PROXY_IPS", f"entry {exc}.") from None
    validate_redis_url(config.redis_url)
    _validate_data_hygiene(config)
    _validate_admin(config)
    _validate_buffered_writer(config)
    _validate_alerts(config)
    _validate_rate_limits(config)
    _validate_integrations(config)
    _validate_costs(config)


def _pairs(value: object) -> object:
    """A settings dict (or ``key=value`` strings from the environment) as pairs, in the order
    written: glob rules are tried in that order (the first match wins)."""
    if isinstance(value, Mapping):
        return tuple(value.items())
    if isinstance(value, list | tuple) and all(isinstance(item, str) for item in value):
        pairs = []
        for item in value:
            key, sep, raw = item.partition("=")
            if not sep:
                return value  # _validate_data_hygiene names the key
            pairs.append((key.strip(), raw.strip()))
        return tuple(pairs)
    return value


def _method_rule(key: str, method: object, rule: object) -> MethodRule:
    if isinstance(rule, MethodRule):
        return rule
    if not isinstance(rule, Mapping) or set(rule) - {"params", "response"}:
        raise _fail(
            key,
            f"rule for {method!r} must be a dict with 'params' and/or 'response', not {rule!r}.",
        )
    parts: dict[str, FieldRule | None] = {}
    for part in ("params", "response"):
        spec = rule.get(part)
        if spec is None or spec == "drop":
            parts[part] = spec
        elif isinstance(spec, list | tuple | set | frozenset) and all(
            isinstance(name, str) for name in spec
        ):
            parts[part] = tuple(sorted(spec))
        else:
            raise _fail(
                key,
                f"rule for {method!r}: {part!r} must be 'drop' or a list of keys to keep, "
                f"not {spec!r}.",
            )
    return MethodRule(params=parts["params"], response=parts["response"])


def _normalise_data_hygiene(config: DjangoCfgRPCConfig) -> None:
    """Turn the lists and dicts settings give into the tuples a frozen config holds."""
    if isinstance(config.redact_keys, list | set | frozenset):
        object.__setattr__(config, "redact_keys", tuple(config.redact_keys))
    rules = _pairs(config.redact_methods)
    if isinstance(rules, tuple) and all(
        isinstance(pair, tuple) and len(pair) == 2 for pair in rules
    ):
        rules = tuple(
            (method, _method_rule("REDACT_METHODS", method, rule)) for method, rule in rules
        )
    object.__setattr__(config, "redact_methods", rules)
    rates = _pairs(config.sample_rates)
    if isinstance(rates, tuple) and all(
        isinstance(pair, tuple) and len(pair) == 2 for pair in rates
    ):
        converted = []
        for method, rate in rates:
            try:
                converted.append((method, float(rate) if isinstance(rate, str) else rate))
            except ValueError:
                raise _fail(
                    "SAMPLE_RATES", f"rate for {method!r} is not a number: {rate!r}."
                ) from None
        rates = tuple(converted)
    object.__setattr__(config, "sample_rates", rates)


def _is_number(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float)


def _is_rate(value: object) -> bool:
    return _is_number(value) and 0 <= value <= 1  # type: ignore[operator]


def _validate_data_hygiene(config: DjangoCfgRPCConfig) -> None:
    if not isinstance(config.redact_keys, tuple) or not all(
        # A key of separators only ("__") would normalise to nothing and match nothing.
        isinstance(key, str) and key_words(key)
        for key in config.redact_keys
    ):
        raise _fail("REDACT_KEYS", f"must be a list of key names, not {config.redact_keys!r}.")
    if not isinstance(config.redact_methods, tuple) or not all(
        isinstance(pair, tuple) and isinstance(pair[0], str) and pair[0]
        for pair in config.redact_methods
    ):
        raise _fail(
            "REDACT_METHODS",
            "must be a dict of method names (or glob patterns) to rules, "
            f"not {config.redact_methods!r}.",
        )
    for name in (
        "max_params_bytes",
        "max_response_bytes",
        "max_error_message_bytes",
        "max_user_agent_bytes",
    ):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < MIN_CAP_BYTES:
            raise _fail(
                name.upper(),
                f"must be a whole number of bytes of at least {MIN_CAP_BYTES}, not {value!r}.",
            )
    if not _is_rate(config.sample_rate):
        raise _fail("SAMPLE_RATE", f"must be a number from 0 to 1, not {config.sample_rate!r}.")
    if not isinstance(config.sample_rates, tuple) or not all(
        isinstance(pair, tuple) and isinstance(pair[0], str) and pair[0] and _is_rate(pair[1])
        for pair in config.sample_rates
    ):
        raise _fail(
            "SAMPLE_RATES",
            "must be a dict of method names (or glob patterns) to numbers from 0 to 1, "
            f"not {config.sample_rates!r}.",
        )
    slow = config.always_log_slower_than_ms
    if not _is_number(slow) or slow < 0:
        raise _fail(
            "ALWAYS_LOG_SLOWER_THAN_MS", f"must be a number of milliseconds >= 0, not {slow!r}."
        )
    days = config.retention_days
    if isinstance(days, bool) or not isinstance(days, int) or days < 1:
        raise _fail("RETENTION_DAYS", f"must be a whole number of days >= 1, not {days!r}.")
    margin = config.reap_margin_seconds
    if not _is_number(margin) or not 0 <= margin <= MAX_WAIT_SECONDS:
        raise _fail(
            "REAP_MARGIN_SECONDS",
            f"must be a number of seconds from 0 to {MAX_WAIT_SECONDS:g}, not {margin!r}.",
        )


def _validate_admin(config: DjangoCfgRPCConfig) -> None:
    for name in ("admin_duration_warn_ms", "admin_duration_slow_ms"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
            raise _fail(name.upper(), f"must be a positive number of milliseconds, not {value!r}.")
    if config.admin_duration_warn_ms >= config.admin_duration_slow_ms:
        raise _fail(
            "ADMIN_DURATION_WARN_MS",
            f"({config.admin_duration_warn_ms!r}) must be below ADMIN_DURATION_SLOW_MS "
            f"({config.admin_duration_slow_ms!r}).",
        )
    refresh = config.admin_dashboard_refresh_seconds
    if isinstance(refresh, bool) or not isinstance(refresh, int) or refresh < 0:
        raise _fail(
            "ADMIN_DASHBOARD_REFRESH_SECONDS",
            f"must be a whole number of seconds, 0 or more, not {refresh!r}.",
        )


def _validate_buffered_writer(config: DjangoCfgRPCConfig) -> None:
    if config.write_mode not in WRITE_MODES:
        raise _fail(
            "WRITE_MODE", f"must be one of {', '.join(WRITE_MODES)}, not {config.write_mode!r}."
        )
    for name in ("buffer_size", "buffer_batch_size"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise _fail(name.upper(), f"must be a positive integer, not {value!r}.")
    one_call = 2 * (config.max_params_bytes + config.max_response_bytes) + (
        config.max_error_message_bytes + config.max_user_agent_bytes + 1_024
    )
    max_bytes = config.buffer_max_bytes
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < one_call:
        raise _fail(
            "BUFFER_MAX_BYTES",
            f"must be a whole number of bytes that holds at least one call of the largest size "
            f"the MAX_*_BYTES caps allow ({one_call}), not {max_bytes!r}.",
        )
    for name in ("buffer_flush_interval", "buffer_max_retry_delay", "buffer_shutdown_timeout"):
        value = getattr(config, name)
        if not _is_number(value) or not 0 < value <= MAX_WAIT_SECONDS:
            raise _fail(
                name.upper(),
                f"must be a positive number of seconds up to {MAX_WAIT_SECONDS:g}, not {value!r}.",
            )
    _validate_log_stream(config)


def _validate_log_stream(config: DjangoCfgRPCConfig) -> None:
    for name in ("log_stream", "ingest_group"):
        value = getattr(config, name)
        if not isinstance(value, str) or not value:
            raise _fail(name.upper(), f"must be a non-empty string, not {value!r}.")
    for name in ("log_stream_maxlen", "ingest_batch_size", "ingest_max_deliveries"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise _fail(name.upper(), f"must be a positive integer, not {value!r}.")
    idle = config.ingest_claim_idle_seconds
    if not _is_number(idle) or not 0 < idle <= MAX_WAIT_SECONDS:
        raise _fail(
            "INGEST_CLAIM_IDLE_SECONDS",
            f"must be a positive number of seconds up to {MAX_WAIT_SECONDS:g}, not {idle!r}.",
        )
    if not isinstance(config.log_stream_redis_url, str):
        raise _fail("LOG_STREAM_REDIS_URL", "must be a Redis URL or empty.")
    if config.log_stream_redis_url:
        validate_redis_url(config.log_stream_redis_url, key="LOG_STREAM_REDIS_URL")


def _normalise_alerts(config: DjangoCfgRPCConfig) -> None:
    """Parse the endpoints; lists and dicts (or environment strings) become tuples."""
    try:
        endpoints = parse_endpoints(config.webhooks)
    except ValueError as exc:
        raise _fail("WEBHOOKS", f"{exc}.") from None
    object.__setattr__(config, "webhooks", endpoints)
    schedule = config.webhook_retry_schedule
    if isinstance(schedule, list | tuple):
        try:
            schedule = tuple(float(step) if isinstance(step, str) else step for step in schedule)
        except ValueError:
            raise _fail(
                "WEBHOOK_RETRY_SCHEDULE", f"must be numbers of seconds, not {schedule!r}."
            ) from None
        object.__setattr__(config, "webhook_retry_schedule", schedule)
    thresholds = _pairs(config.slow_call_thresholds_ms)
    if isinstance(thresholds, tuple) and all(
        isinstance(pair, tuple) and len(pair) == 2 for pair in thresholds
    ):
        try:
            thresholds = tuple(
                (method, float(ms) if isinstance(ms, str) else ms) for method, ms in thresholds
            )
        except ValueError:
            raise _fail(
                "SLOW_CALL_THRESHOLDS_MS", f"must map methods to milliseconds: {thresholds!r}."
            ) from None
    object.__setattr__(config, "slow_call_thresholds_ms", thresholds)


def _validate_alerts(config: DjangoCfgRPCConfig) -> None:
    positive = (
        "webhook_group_window_seconds",
        "webhook_timeout",
        "webhook_poll_interval",
        "slow_call_score",
    )
    for name in positive:
        value = getattr(config, name)
        if not _is_number(value) or not value > 0:
            raise _fail(name.upper(), f"must be a positive number, not {value!r}.")
    schedule = config.webhook_retry_schedule
    if not isinstance(schedule, tuple) or not all(
        _is_number(step) and step >= 0 for step in schedule
    ):
        raise _fail(
            "WEBHOOK_RETRY_SCHEDULE",
            f"must be a list of seconds (>= 0) before each retry, not {schedule!r}.",
        )
    for name in ("webhook_delivery_thread", "slow_call_detection"):
        if not isinstance(getattr(config, name), bool):
            raise _fail(name.upper(), f"must be True or False, not {getattr(config, name)!r}.")
    base = config.admin_base_url
    parts = urlsplit(base) if isinstance(base, str) else None
    if parts is None or (base and (parts.scheme not in ("http", "https") or not parts.hostname)):
        raise _fail("ADMIN_BASE_URL", f"must be empty or an http(s):// URL, not {base!r}.")
    floor = config.slow_call_floor_ms
    if not _is_number(floor) or floor < 0:
        raise _fail("SLOW_CALL_FLOOR_MS", f"must be a number of milliseconds >= 0, not {floor!r}.")
    ratio = config.slow_call_min_ratio
    if not _is_number(ratio) or ratio < 1:
        raise _fail("SLOW_CALL_MIN_RATIO", f"must be a number >= 1, not {ratio!r}.")
    for name, low, high in (("slow_call_min_samples", 3, 100_000), ("slow_call_window", 3, 10_000)):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise _fail(
                name.upper(), f"must be a whole number from {low} to {high}, not {value!r}."
            )
    if config.slow_call_min_samples > config.slow_call_window:
        raise _fail(
            "SLOW_CALL_MIN_SAMPLES",
            f"({config.slow_call_min_samples}) must not exceed SLOW_CALL_WINDOW "
            f"({config.slow_call_window}): the baseline would never be trusted.",
        )
    if not isinstance(config.slow_call_thresholds_ms, tuple) or not all(
        isinstance(pair, tuple)
        and isinstance(pair[0], str)
        and pair[0]
        and _is_number(pair[1])
        and pair[1] > 0
        for pair in config.slow_call_thresholds_ms
    ):
        raise _fail(
            "SLOW_CALL_THRESHOLDS_MS",
            "must be a dict of method names (or glob patterns) to positive milliseconds, "
            f"not {config.slow_call_thresholds_ms!r}.",
        )


def _normalise_rate_limits(config: DjangoCfgRPCConfig) -> None:
    """``RATE_LIMITS`` as parsed rules, in the order given; lists of names as tuples."""
    try:
        rules = parse_rules(config.rate_limits)
    except ValueError as exc:
        raise _fail("RATE_LIMITS", f"is invalid: {exc}.") from None
    object.__setattr__(config, "rate_limits", rules)
    if isinstance(config.rate_limit_exempt_users, list | set | frozenset):
        object.__setattr__(config, "rate_limit_exempt_users", tuple(config.rate_limit_exempt_users))


def _validate_rate_limits(config: DjangoCfgRPCConfig) -> None:
    if config.rate_limit_redis_url:
        validate_redis_url(config.rate_limit_redis_url, key="RATE_LIMIT_REDIS_URL")
    for name in ("rate_limit_fail_open", "rate_limit_exempt_staff"):
        if not isinstance(getattr(config, name), bool):
            raise _fail(name.upper(), f"must be True or False, not {getattr(config, name)!r}.")
    for name in ("rate_limit_timeout", "rate_limit_backoff_seconds"):
        value = getattr(config, name)
        if not _is_number(value) or not 0 < value <= MAX_WAIT_SECONDS:
            raise _fail(
                name.upper(),
                f"must be a positive number of seconds up to {MAX_WAIT_SECONDS:g}, not {value!r}.",
            )
    prefix = config.rate_limit_key_prefix
    if not isinstance(prefix, str) or not prefix:
        raise _fail("RATE_LIMIT_KEY_PREFIX", f"must be a non-empty string, not {prefix!r}.")
    bits = config.rate_limit_ipv6_prefix
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 128:
        raise _fail(
            "RATE_LIMIT_IPV6_PREFIX", f"must be a whole number from 1 to 128, not {bits!r}."
        )
    if not isinstance(config.rate_limit_exempt_users, tuple) or not all(
        isinstance(name, str) and name for name in config.rate_limit_exempt_users
    ):
        raise _fail(
            "RATE_LIMIT_EXEMPT_USERS",
            f"must be a list of usernames, not {config.rate_limit_exempt_users!r}.",
        )
    policy = config.rate_limit_policy
    if not isinstance(policy, str) or (policy and "." not in policy):
        raise _fail(
            "RATE_LIMIT_POLICY",
            f"must be the dotted path of a callable ('myapp.limits.policy'), not {policy!r}.",
        )


#: A span attribute key: dotted lower-case words (``rpc.response.status_code``).
_ATTRIBUTE_KEY = re.compile(r"^[a-z][a-z0-9_]*(?:\.[a-z][a-z0-9_]*)*$")


def _validate_integrations(config: DjangoCfgRPCConfig) -> None:
    for name in ("otel_traces", "otel_metrics", "prometheus_metrics"):
        if not isinstance(getattr(config, name), bool):
            raise _fail(name.upper(), f"must be True or False, not {getattr(config, name)!r}.")
    key = config.otel_status_code_attribute
    if not isinstance(key, str) or (key and not _ATTRIBUTE_KEY.match(key)):
        raise _fail(
            "OTEL_STATUS_CODE_ATTRIBUTE",
            f"must be an attribute key such as 'rpc.response.status_code', or '', not {key!r}.",
        )
    limit = config.metrics_max_methods
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise _fail("METRICS_MAX_METHODS", f"must be a positive integer, not {limit!r}.")
    template = config.trace_url_template
    if not isinstance(template, str):
        raise _fail("TRACE_URL_TEMPLATE", f"must be a URL string, not {template!r}.")
    if template:
        scheme = urlsplit(template).scheme
        if scheme not in ("http", "https") or "{trace_id}" not in template:
            raise _fail(
                "TRACE_URL_TEMPLATE",
                f"must be an http(s) URL containing '{{trace_id}}', not {template!r}.",
            )


#: Decimal places of a stored cost (``RPCLog.cost``); a price must not need more.
COST_DECIMAL_PLACES = 6
#: Digits of a stored cost, decimal places included.
COST_MAX_DIGITS = 20
#: The outcomes a call can be billed for (a pending call has no outcome yet).
BILLABLE_STATUSES = ("success", "failed", "timeout", "rate_limited")
#: A dotted path to a function: ``package.module.function``.
_DOTTED_PATH = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)+$")


def parse_price(value: object) -> Decimal:
    """A price from the settings as a ``Decimal``: a string, an int or a ``Decimal``, finite,
    0 or more, with at most ``COST_DECIMAL_PLACES`` places and fitting ``RPCLog.cost``.

    :raises ValueError: any other value (a float is refused: ``0.1`` is not exactly a tenth).
    """
    if isinstance(value, bool) or not isinstance(value, str | int | Decimal):
        raise ValueError(f"a price is a string, an int or a Decimal, not {value!r}")
    try:
        price = Decimal(value.strip() if isinstance(value, str) else value)
    except InvalidOperation:
        raise ValueError(f"{value!r} is not a number") from None
    if not price.is_finite() or price < 0:
        raise ValueError(f"{value!r} is not a finite number >= 0")
    exponent = price.as_tuple().exponent
    if isinstance(exponent, int) and -exponent > COST_DECIMAL_PLACES:
        raise ValueError(f"{value!r} has more than {COST_DECIMAL_PLACES} decimal places")
    if price >= Decimal(10) ** (COST_MAX_DIGITS - COST_DECIMAL_PLACES):
        raise ValueError(f"{value!r} is too large")
    return price


def _normalise_costs(config: DjangoCfgRPCConfig) -> None:
    """``COSTS`` as ``(method or glob, price or dotted path)`` pairs; a path alone is ``*``'s."""
    costs: object = config.costs
    if isinstance(costs, list | tuple) and len(costs) == 1 and isinstance(costs[0], str):
        costs = costs[0] if "=" not in costs[0] else costs  # one path from the environment
    if isinstance(costs, str):
        costs = (("*", costs),) if costs else ()
    rules = _pairs(costs)
    if isinstance(rules, tuple) and all(isinstance(p, tuple) and len(p) == 2 for p in rules):
        converted: list[tuple[str, Decimal | str]] = []
        for method, rule in rules:
            if isinstance(rule, str) and _DOTTED_PATH.match(rule.strip()):
                converted.append((method, rule.strip()))
                continue
            try:
                converted.append((method, parse_price(rule)))
            except ValueError as exc:
                raise _fail(
                    "COSTS",
                    f"cost of {method!r} must be a price or the dotted path of a function: {exc}.",
                ) from None
        rules = tuple(converted)
    object.__setattr__(config, "costs", rules)
    if isinstance(config.billable_statuses, list | set | frozenset | str):
        statuses = config.billable_statuses
        object.__setattr__(
            config,
            "billable_statuses",
            (statuses,) if isinstance(statuses, str) else tuple(statuses),
        )


def _validate_costs(config: DjangoCfgRPCConfig) -> None:
    if not isinstance(config.costs, tuple) or not all(
        isinstance(pair, tuple) and isinstance(pair[0], str) and pair[0] for pair in config.costs
    ):
        raise _fail(
            "COSTS",
            "must be a dict of method names (or glob patterns) to prices or dotted paths of "
            f"functions, or one dotted path, not {config.costs!r}.",
        )
    statuses = config.billable_statuses
    if (
        not isinstance(statuses, tuple)
        or not statuses
        or not all(status in BILLABLE_STATUSES for status in statuses)
    ):
        raise _fail(
            "BILLABLE_STATUSES",
            f"must be a non-empty list of {', '.join(BILLABLE_STATUSES)}, not {statuses!r}.",
        )
    days = config.rollup_retention_days
    if isinstance(days, bool) or not isinstance(days, int) or days < 0:
        raise _fail(
            "ROLLUP_RETENTION_DAYS", f"must be a whole number of days, 0 or more, not {days!r}."
        )
    settle = config.rollup_settle_seconds
    if not _is_number(settle) or not 0 <= settle <= MAX_WAIT_SECONDS:
        raise _fail(
            "ROLLUP_SETTLE_SECONDS",
            f"must be a number of seconds from 0 to {MAX_WAIT_SECONDS:g}, not {settle!r}.",
        )


def validate_redis_url(url: object, key: str = "REDIS_URL") -> None:
    """Raise :class:`ImproperlyConfigured` unless redis-py accepts ``url``; hides the password."""
    if not isinstance(url, str) or not url:
        raise _fail(key, "must be a redis://, rediss:// or unix:// URL.")
    try:
        parse_url(url)  # type: ignore[no-untyped-call]
        parts = urlsplit(url)
        if parts.scheme == "unix":
            # The path is the socket's; the database, if any, comes from "?db=" (checked above).
            valid = bool(parts.path.strip("/"))
        else:
            db = parts.path.strip("/")
            valid = bool(parts.hostname) and (not db or db.isdigit())
    except (ValueError, TypeError):
        valid = False
    if not valid:
        # No exception chaining: redis-py's message may quote the URL, password included.
        raise _fail(key, f"is not a valid Redis URL ({redact_url(url)}).")


@functools.cache
def get_config() -> DjangoCfgRPCConfig:
    """The active configuration: settings, then environment. Cached until settings change."""
    raw = getattr(settings, SETTING_NAME, None)
    if raw is None:
        config = DjangoCfgRPCConfig()
    elif isinstance(raw, DjangoCfgRPCConfig):
        config = raw
    elif isinstance(raw, Mapping):
        config = DjangoCfgRPCConfig.from_mapping(raw)
    else:
        raise ImproperlyConfigured(
            f"{SETTING_NAME} must be a dict or a DjangoCfgRPCConfig, not {type(raw).__name__}."
        )
    return config.with_environ()


def clear_config_cache() -> None:
    """Forget the parsed configuration and the client built from it."""
    get_config.cache_clear()
    from django_rpc_audit.client import reset_rpc_client

    reset_rpc_client()


@receiver(setting_changed, dispatch_uid="django_rpc_audit.conf.setting_changed")
def _on_setting_changed(*, setting: str, **kwargs: Any) -> None:
    if setting == SETTING_NAME:
        clear_config_cache()
