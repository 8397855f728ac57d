"""DJANGO_CFG_RPC parsing, environment overrides, validation and cache invalidation."""

from __future__ import annotations

import dataclasses

import pytest
from django.core.exceptions import ImproperlyConfigured

from django_rpc_audit import get_rpc_client
from django_rpc_audit.conf import DjangoCfgRPCConfig, clear_config_cache, get_config
from django_rpc_audit.exceptions import RPCDisabledError


def test_defaults_are_documented_values():
    config = DjangoCfgRPCConfig()
    assert config.enabled is True
    assert config.enable_logging is True
    assert config.transport == "redis"
    assert config.redis_url == "redis://localhost:6379/2"
    assert config.request_stream == "stream:requests"
    assert config.response_key_prefix == "list:response:"
    assert config.stream_maxlen == 10_000
    assert config.rpc_timeout == 30.0


def test_config_is_frozen():
    config = DjangoCfgRPCConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.enabled = False  # type: ignore[misc]


def test_settings_dict_is_read(settings):
    settings.DJANGO_CFG_RPC = {"TRANSPORT": "local", "RPC_TIMEOUT": 7, "STREAM_MAXLEN": 50}
    config = get_config()
    assert (config.transport, config.rpc_timeout, config.stream_maxlen) == ("local", 7, 50)


def test_config_instance_can_be_assigned(settings):
    settings.DJANGO_CFG_RPC = DjangoCfgRPCConfig(transport="local", request_stream="s:x")
    assert get_config().request_stream == "s:x"


def test_cache_is_cleared_when_setting_changes(settings):
    settings.DJANGO_CFG_RPC = {"RPC_TIMEOUT": 3}
    assert get_config().rpc_timeout == 3
    settings.DJANGO_CFG_RPC = {"RPC_TIMEOUT": 4}
    assert get_config().rpc_timeout == 4


def test_client_is_rebuilt_when_setting_changes(settings):
    settings.DJANGO_CFG_RPC = {"TRANSPORT": "local"}
    first = get_rpc_client()
    assert get_rpc_client() is first
    settings.DJANGO_CFG_RPC = {"TRANSPORT": "redis", "REDIS_URL": "redis://127.0.0.1:6379/15"}
    second = get_rpc_client()
    assert second is not first
    assert type(second.transport).__name__ == "RedisTransport"


@pytest.mark.parametrize(
    ("key", "raw", "expected"),
    [
        ("ENABLE_LOGGING", "false", False),
        ("ENABLE_LOGGING", "0", False),
        ("ENABLE_LOGGING", "yes", True),
        ("ENABLED", "off", False),
        ("RPC_TIMEOUT", "2.5", 2.5),
        ("STREAM_MAXLEN", "123", 123),
        ("TRANSPORT", "local", "local"),
        ("REQUEST_STREAM", "s:env", "s:env"),
        ("TRUSTED_PROXY_IPS", "10.0.0.1, 10.0.0.2", ("10.0.0.1", "10.0.0.2")),
    ],
)
def test_environment_overrides_settings(settings, monkeypatch, key, raw, expected):
    settings.DJANGO_CFG_RPC = {"TRANSPORT": "redis", "ENABLE_LOGGING": True}
    monkeypatch.setenv(f"DJANGO_CFG_RPC__{key}", raw)
    clear_config_cache()
    assert getattr(get_config(), key.lower()) == expected


def test_environment_overrides_a_config_instance(settings, monkeypatch):
    settings.DJANGO_CFG_RPC = DjangoCfgRPCConfig(enable_logging=True)
    monkeypatch.setenv("DJANGO_CFG_RPC__ENABLE_LOGGING", "false")
    clear_config_cache()
    assert get_config().enable_logging is False


@pytest.mark.parametrize(
    ("key", "raw"),
    [
        ("ENABLE_LOGGING", "ture"),
        ("RPC_TIMEOUT", "soon"),
        ("RPC_TIMEOUT", "-1"),
        ("RPC_TIMEOUT", "inf"),
        ("RPC_TIMEOUT", "nan"),
        ("REAP_MARGIN_SECONDS", "inf"),
        ("BUFFER_FLUSH_INTERVAL", "inf"),
        ("STREAM_MAXLEN", "1.5"),
        ("TRANSPORT", "carrier-pigeon"),
        ("REDIS_URL", "http://cache:6379/0"),
    ],
)
def test_invalid_environment_value_names_the_key(settings, monkeypatch, key, raw):
    monkeypatch.setenv(f"DJANGO_CFG_RPC__{key}", raw)
    clear_config_cache()
    with pytest.raises(ImproperlyConfigured, match=key):
        get_config()


@pytest.mark.parametrize(
    ("values", "key"),
    [
        ({"TRANSPORT": "smtp"}, "TRANSPORT"),
        ({"RPC_TIMEOUT": 0}, "RPC_TIMEOUT"),
        ({"RPC_TIMEOUT": True}, "RPC_TIMEOUT"),
        ({"RPC_TIMEOUT": float("inf")}, "RPC_TIMEOUT"),
        ({"REAP_MARGIN_SECONDS": float("inf")}, "REAP_MARGIN_SECONDS"),
        # A socket timeout Python cannot set: every rate-limited call would raise OverflowError.
        ({"RATE_LIMIT_TIMEOUT": float("inf")}, "RATE_LIMIT_TIMEOUT"),
        ({"RATE_LIMIT_BACKOFF_SECONDS": 1e12}, "RATE_LIMIT_BACKOFF_SECONDS"),
        ({"STREAM_MAXLEN": 0}, "STREAM_MAXLEN"),
        ({"ENABLE_LOGGING": "yes"}, "ENABLE_LOGGING"),
        ({"REQUEST_STREAM": ""}, "REQUEST_STREAM"),
        ({"REDIS_URL": "redis://cache:notaport/0"}, "REDIS_URL"),
        ({"REDIS_URL": "redis://cache:6379/zero"}, "REDIS_URL"),
        ({"TRUSTED_PROXY_IPS": "10.0.0.1"}, "TRUSTED_PROXY_IPS"),
        ({"NO_SUCH_KEY": 1}, "NO_SUCH_KEY"),
        ({"WRITE_MODE": "kafka"}, "WRITE_MODE"),
        ({"LOG_STREAM": ""}, "LOG_STREAM"),
        ({"LOG_STREAM_MAXLEN": 0}, "LOG_STREAM_MAXLEN"),
        ({"LOG_STREAM_REDIS_URL": "http://logs"}, "LOG_STREAM_REDIS_URL"),
        ({"LOG_STREAM_REDIS_URL": None}, "LOG_STREAM_REDIS_URL"),
        ({"INGEST_GROUP": ""}, "INGEST_GROUP"),
        ({"INGEST_BATCH_SIZE": True}, "INGEST_BATCH_SIZE"),
        ({"INGEST_CLAIM_IDLE_SECONDS": 0}, "INGEST_CLAIM_IDLE_SECONDS"),
        ({"INGEST_MAX_DELIVERIES": 0}, "INGEST_MAX_DELIVERIES"),
    ],
)
def test_invalid_setting_names_the_key(settings, values, key):
    settings.DJANGO_CFG_RPC = values
    with pytest.raises(ImproperlyConfigured, match=key):
        get_config()


def test_the_log_stream_uses_redis_url_unless_it_has_its_own(settings, rpc_env):
    settings.DJANGO_CFG_RPC = {"REDIS_URL": "redis://cache:6379/2"}
    assert get_config().log_stream_url == "redis://cache:6379/2"
    rpc_env("LOG_STREAM_REDIS_URL", "redis://logs:6379/0")
    assert get_config().log_stream_url == "redis://logs:6379/0"


def test_invalid_log_stream_redis_url_hides_the_password(settings):
    settings.DJANGO_CFG_RPC = {"LOG_STREAM_REDIS_URL": "redis://:hunter2@logs:badport/0"}
    with pytest.raises(ImproperlyConfigured, match="LOG_STREAM_REDIS_URL") as excinfo:
        get_config()
    assert "hunter2" not in str(excinfo.value)


@pytest.mark.parametrize(
    "url",
    [
        "unix:///var/run/redis.sock",
        "unix:///var/run/redis.sock?db=3",
        "unix://:pw@/var/run/redis.sock?db=0",
        "redis://cache:6379?db=4",
        "rediss://:pw@cache:6380/2",
    ],
)
def test_redis_urls_redis_py_accepts_are_accepted(settings, url):
    """README lists ``unix://``: its path is the socket, the database comes from ``?db=``."""
    settings.DJANGO_CFG_RPC = {"REDIS_URL": url}
    assert get_config().redis_url == url


@pytest.mark.parametrize(
    "url",
    ["unix://", "unix:///var/run/redis.sock?db=zero", "redis://cache:6379?db=x", "http://cache/0"],
)
def test_redis_urls_redis_py_refuses_are_refused(settings, url):
    settings.DJANGO_CFG_RPC = {"REDIS_URL": url}
    with pytest.raises(ImproperlyConfigured, match="REDIS_URL"):
        get_config()


def test_invalid_redis_url_error_hides_the_password(settings):
    settings.DJANGO_CFG_RPC = {"REDIS_URL": "redis://:hunter2@cache:badport/0"}
    with pytest.raises(ImproperlyConfigured) as excinfo:
        get_config()
    assert "hunter2" not in str(excinfo.value)
    assert excinfo.value.__cause__ is None
    assert excinfo.value.__context__ is None


def test_setting_of_wrong_type(settings):
    settings.DJANGO_CFG_RPC = ["TRANSPORT", "local"]
    with pytest.raises(ImproperlyConfigured, match="dict"):
        get_config()


def test_disabled_rpc_raises_on_get_client(settings):
    settings.DJANGO_CFG_RPC = {"ENABLED": False}
    with pytest.raises(RPCDisabledError, match="ENABLED"):
        get_rpc_client()


def test_trusted_proxies_may_be_given_as_a_list():
    assert DjangoCfgRPCConfig(trusted_proxy_ips=["10.0.0.1"]).trusted_proxy_ips == ("10.0.0.1",)


# -- data hygiene settings ----------------------------------------------------------------


def test_data_hygiene_defaults():
    config = DjangoCfgRPCConfig()
    assert config.redact_keys == ()
    assert config.redact_methods == ()
    assert (config.max_params_bytes, config.max_response_bytes) == (65_536, 65_536)
    assert (config.max_error_message_bytes, config.max_user_agent_bytes) == (16_384, 1_024)
    assert (config.sample_rate, config.sample_rates) == (1.0, ())
    assert config.always_log_slower_than_ms == 1_000.0
    assert (config.retention_days, config.reap_margin_seconds) == (90, 60.0)


def test_data_hygiene_dicts_become_hashable_tuples(settings):
    from django_rpc_audit.redaction import MethodRule

    settings.DJANGO_CFG_RPC = {
        "REDACT_KEYS": ["card_number"],
        "REDACT_METHODS": {"auth.*": {"params": "drop", "response": ["user_id"]}},
        "SAMPLE_RATES": {"system.ping": 0.01},
    }
    config = get_config()
    assert config.redact_keys == ("card_number",)
    assert config.redact_methods == (("auth.*", MethodRule(params="drop", response=("user_id",))),)
    assert config.sample_rates == (("system.ping", 0.01),)
    hash(config)


@pytest.mark.parametrize(
    ("key", "raw", "expected"),
    [
        ("SAMPLE_RATE", "0.25", 0.25),
        ("SAMPLE_RATES", "system.*=0.1, send=0.5", (("system.*", 0.1), ("send", 0.5))),
        ("REDACT_KEYS", "card_number, pin", ("card_number", "pin")),
        ("MAX_PARAMS_BYTES", "4096", 4096),
        ("RETENTION_DAYS", "30", 30),
        ("ALWAYS_LOG_SLOWER_THAN_MS", "250", 250.0),
    ],
)
def test_data_hygiene_environment_overrides(settings, monkeypatch, key, raw, expected):
    monkeypatch.setenv(f"DJANGO_CFG_RPC__{key}", raw)
    clear_config_cache()
    assert getattr(get_config(), key.lower()) == expected


@pytest.mark.parametrize(
    ("values", "key"),
    [
        ({"REDACT_KEYS": "password"}, "REDACT_KEYS"),
        ({"REDACT_KEYS": ["__"]}, "REDACT_KEYS"),
        ({"REDACT_METHODS": {"auth.*": "drop"}}, "REDACT_METHODS"),
        ({"REDACT_METHODS": {"auth.*": {"params": "hide"}}}, "REDACT_METHODS"),
        ({"REDACT_METHODS": {"auth.*": {"headers": "drop"}}}, "REDACT_METHODS"),
        ({"MAX_PARAMS_BYTES": 10}, "MAX_PARAMS_BYTES"),
        ({"MAX_RESPONSE_BYTES": 1.5e6}, "MAX_RESPONSE_BYTES"),
        ({"MAX_USER_AGENT_BYTES": True}, "MAX_USER_AGENT_BYTES"),
        ({"SAMPLE_RATE": 1.5}, "SAMPLE_RATE"),
        ({"SAMPLE_RATE": "0.5"}, "SAMPLE_RATE"),
        ({"SAMPLE_RATES": {"x": -0.1}}, "SAMPLE_RATES"),
        ({"SAMPLE_RATES": {"x": "often"}}, "SAMPLE_RATES"),
        ({"ALWAYS_LOG_SLOWER_THAN_MS": -1}, "ALWAYS_LOG_SLOWER_THAN_MS"),
        ({"RETENTION_DAYS": 0}, "RETENTION_DAYS"),
        ({"RETENTION_DAYS": 7.5}, "RETENTION_DAYS"),
        ({"REAP_MARGIN_SECONDS": -1}, "REAP_MARGIN_SECONDS"),
    ],
)
def test_invalid_data_hygiene_setting_names_the_key(settings, values, key):
    settings.DJANGO_CFG_RPC = values
    with pytest.raises(ImproperlyConfigured, match=key):
        get_config()


# -- metrics and traces -------------------------------------------------------------------------


def test_metrics_and_traces_are_off_by_default():
    config = DjangoCfgRPCConfig()
    assert (config.otel_traces, config.otel_metrics, config.prometheus_metrics) == (
        False,
        False,
        False,
    )
    assert config.otel_status_code_attribute == "rpc.response.status_code"
    assert config.metrics_max_methods == 100
    assert config.trace_url_template == ""


@pytest.mark.parametrize(
    ("key", "raw", "expected"),
    [
        ("OTEL_TRACES", "true", True),
        ("OTEL_METRICS", "on", True),
        ("PROMETHEUS_METRICS", "1", True),
        ("OTEL_STATUS_CODE_ATTRIBUTE", "rpc.status_code", "rpc.status_code"),
        ("METRICS_MAX_METHODS", "20", 20),
        (
            "TRACE_URL_TEMPLATE",
            "https://tempo.example.com/trace/{trace_id}",
            "https://tempo.example.com/trace/{trace_id}",
        ),
    ],
)
def test_metrics_and_traces_environment_overrides(settings, monkeypatch, key, raw, expected):
    monkeypatch.setenv(f"DJANGO_CFG_RPC__{key}", raw)
    clear_config_cache()
    assert getattr(get_config(), key.lower()) == expected


@pytest.mark.parametrize(
    ("values", "key"),
    [
        ({"OTEL_TRACES": "yes"}, "OTEL_TRACES"),
        ({"PROMETHEUS_METRICS": 1}, "PROMETHEUS_METRICS"),
        ({"OTEL_STATUS_CODE_ATTRIBUTE": "Status Code"}, "OTEL_STATUS_CODE_ATTRIBUTE"),
        ({"METRICS_MAX_METHODS": 0}, "METRICS_MAX_METHODS"),
        ({"METRICS_MAX_METHODS": True}, "METRICS_MAX_METHODS"),
        ({"TRACE_URL_TEMPLATE": "https://tempo.example.com/trace/"}, "TRACE_URL_TEMPLATE"),
        ({"TRACE_URL_TEMPLATE": "javascript:alert('{trace_id}')"}, "TRACE_URL_TEMPLATE"),
    ],
)
def test_invalid_metrics_and_traces_setting_names_the_key(settings, values, key):
    settings.DJANGO_CFG_RPC = values
    with pytest.raises(ImproperlyConfigured, match=key):
        get_config()


def test_the_config_repr_hides_the_log_stream_redis_password():
    config = DjangoCfgRPCConfig(log_stream_redis_url="redis://:hunter2@logs:6379/0")
    assert "hunter2" not in repr(config)
    assert "redis://:***@logs:6379/0" in repr(config)
