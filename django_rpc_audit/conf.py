"""Settings: the ``DJANGO_CFG_RPC`` dict, parsed once into a frozen :class:`DjangoCfgRPCConfig`."""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit

import environ
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.signals import setting_changed
from django.dispatch import receiver
from redis.connection import parse_url

from django_rpc_audit.utils import redact_url

SETTING_NAME = "DJANGO_CFG_RPC"
ENV_PREFIX = f"{SETTING_NAME}__"

Transport = Literal["redis", "local"]
TRANSPORTS: tuple[Transport, ...] = ("redis", "local")

WriteMode = Literal["buffered", "sync"]
WRITE_MODES: tuple[WriteMode, ...] = ("buffered", "sync")

# django-environ reads any unknown word as False ("ture" would silently turn logging off);
# we accept its true words plus their usual opposites and reject everything else.
_FALSE_STRINGS = ("false", "off", "no", "n", "0", "")


@dataclass(frozen=True, slots=True, kw_only=True)
class DjangoCfgRPCConfig:
    """The typed, validated configuration the package reads.

    Build it from the ``DJANGO_CFG_RPC`` dict (upper-case keys) or assign an instance to the
    setting directly::

        DJANGO_CFG_RPC = DjangoCfgRPCConfig(redis_url="redis://localhost:6379/2")

    Either way, environment variables ``DJANGO_CFG_RPC__<KEY>`` win over what the settings say.
    """

    #: Master switch. When false, :func:`~django_rpc_audit.get_rpc_client` raises
    #: :class:`~django_rpc_audit.exceptions.RPCDisabledError`.
    enabled: bool = True
    #: Redis server the django-ipc peer listens on. A password in it never appears in errors.
    redis_url: str = "redis://localhost:6379/2"
    #: Write an ``RPCLog`` row for every call. Off: calls and signals go on, no rows are written.
    enable_logging: bool = True
    #: ``"redis"`` (the django-ipc wire protocol) or ``"local"`` (in-process handlers).
    transport: Transport = "redis"
    #: Seconds a call waits for its reply before it is a timeout.
    rpc_timeout: float = 30.0
    #: Redis Stream the requests are added to.
    request_stream: str = "stream:requests"
    #: Prefix of the per-call reply list; the correlation id follows it.
    response_key_prefix: str = "list:response:"
    #: Approximate ``MAXLEN`` of the request stream.
    stream_maxlen: int = 10_000
    #: Addresses (or prefixes) of the reverse proxies whose ``X-Forwarded-For`` is trusted.
    #: Empty, and with no ``IPWARE_*`` setting either, the caller IP is ``REMOTE_ADDR`` only.
    trusted_proxy_ips: tuple[str, ...] = field(default=())

    # -- buffered writer
    #: ``"buffered"``: the receivers only enqueue, a background thread writes batches on its own
    #: database connection. ``"sync"``: each event is written at once on the caller's thread and
    #: connection (inside the caller's transaction).
    write_mode: WriteMode = "buffered"
    #: Most calls the buffered writer holds in memory. When full, successful calls are dropped
    #: first (counted and logged); failures and timeouts are kept.
    buffer_size: int = 100_000
    #: Rows per ``INSERT`` (and per commit) of the buffered writer.
    buffer_batch_size: int = 1_000
    #: Seconds between the buffered writer's flushes (sooner once a batch is full).
    buffer_flush_interval: float = 0.5
    #: Longest wait, in seconds, between retries while the database is unreachable.
    buffer_max_retry_delay: float = 10.0
    #: Seconds the process waits at exit for the buffered writer to write what it holds.
    buffer_shutdown_timeout: float = 10.0

    def __post_init__(self) -> None:
        if isinstance(self.trusted_proxy_ips, list | set | frozenset):
            # Settings naturally give lists; a tuple keeps the frozen config hashable.
            object.__setattr__(self, "trusted_proxy_ips", tuple(self.trusted_proxy_ips))
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
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
        raise _fail("RPC_TIMEOUT", f"must be a positive number of seconds, not {timeout!r}.")
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
        raise _fail("TRUSTED_PROXY_IPS", "must be a list of IP addresses or prefixes.")
    validate_redis_url(config.redis_url)
    _validate_buffered_writer(config)


def _validate_buffered_writer(config: DjangoCfgRPCConfig) -> None:
    if config.write_mode not in WRITE_MODES:
        raise _fail(
            "WRITE_MODE", f"must be one of {', '.join(WRITE_MODES)}, not {config.write_mode!r}."
        )
    for name in ("buffer_size", "buffer_batch_size"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise _fail(name.upper(), f"must be a positive integer, not {value!r}.")
    for name in ("buffer_flush_interval", "buffer_max_retry_delay", "buffer_shutdown_timeout"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
            raise _fail(name.upper(), f"must be a positive number of seconds, not {value!r}.")


def validate_redis_url(url: object) -> None:
    """Raise :class:`ImproperlyConfigured` unless redis-py accepts ``url``; hides the password."""
    if not isinstance(url, str) or not url:
        raise _fail("REDIS_URL", "must be a redis://, rediss:// or unix:// URL.")
    try:
        parse_url(url)  # type: ignore[no-untyped-call]
        parts = urlsplit(url)
        db = parts.path.strip("/")
        valid = (parts.scheme == "unix" or bool(parts.hostname)) and (not db or db.isdigit())
    except (ValueError, TypeError):
        valid = False
    if not valid:
        # No exception chaining: redis-py's message may quote the URL, password included.
        raise _fail("REDIS_URL", f"is not a valid Redis URL ({redact_url(url)}).")


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
