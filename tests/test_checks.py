"""System checks."""

from __future__ import annotations

import pytest
from django.core.management import call_command

from django_rpc_audit import checks


def ids(messages) -> list[str]:
    return [message.id for message in messages]


@pytest.mark.django_db  # Django 6's check command also runs the database checks.
def test_test_settings_pass_every_check():
    call_command("check", fail_level="WARNING")


def test_invalid_config_is_e001(settings):
    settings.DJANGO_CFG_RPC = {"REDIS_URL": "http://:hunter2@cache/0"}
    messages = checks.check_settings()
    assert ids(messages) == ["django_rpc_audit.E001"]
    assert "REDIS_URL" in messages[0].msg
    assert "hunter2" not in messages[0].msg


def test_missing_middleware_is_w001(settings):
    settings.MIDDLEWARE = [m for m in settings.MIDDLEWARE if m != checks.MIDDLEWARE_PATH]
    assert ids(checks.check_middleware()) == ["django_rpc_audit.W001"]


def test_middleware_before_authentication_is_w002(settings):
    rest = [m for m in settings.MIDDLEWARE if m != checks.MIDDLEWARE_PATH]
    settings.MIDDLEWARE = [checks.MIDDLEWARE_PATH, *rest]
    assert ids(checks.check_middleware()) == ["django_rpc_audit.W002"]


def test_unfold_missing_is_e002(settings):
    settings.INSTALLED_APPS = [app for app in settings.INSTALLED_APPS if app != "unfold"]
    assert ids(checks.check_unfold()) == ["django_rpc_audit.E002"]


def test_unfold_after_admin_is_w003(settings):
    rest = [app for app in settings.INSTALLED_APPS if app != "unfold"]
    settings.INSTALLED_APPS = [*rest, "unfold"]
    assert ids(checks.check_unfold()) == ["django_rpc_audit.W003"]


def test_slow_threshold_beyond_the_timeout_under_sampling_is_w004(rpc_settings):
    rpc_settings(RPC_TIMEOUT=1, SAMPLE_RATE=0.1, ALWAYS_LOG_SLOWER_THAN_MS=1000)
    messages = checks.check_sampling()
    assert ids(messages) == ["django_rpc_audit.W004"]
    assert "ALWAYS_LOG_SLOWER_THAN_MS" in messages[0].msg


def test_slow_threshold_is_fine_without_sampling_or_below_the_timeout(rpc_settings):
    rpc_settings(RPC_TIMEOUT=1, SAMPLE_RATE=1.0, ALWAYS_LOG_SLOWER_THAN_MS=5000)
    assert checks.check_sampling() == []
    rpc_settings(RPC_TIMEOUT=10, SAMPLE_RATE=0.1, ALWAYS_LOG_SLOWER_THAN_MS=5000)
    assert checks.check_sampling() == []
    rpc_settings(SAMPLE_RATE=1.0, SAMPLE_RATES={"system.*": 0.5}, ALWAYS_LOG_SLOWER_THAN_MS=10_000)
    assert ids(checks.check_sampling()) == ["django_rpc_audit.W004"]


def test_an_integration_without_its_package_is_e004(rpc_settings, hide_package):
    hide_package("prometheus_client")
    rpc_settings(PROMETHEUS_METRICS=True, OTEL_TRACES=True)
    messages = checks.check_integrations()
    assert ids(messages) == ["django_rpc_audit.E004"]
    assert "PROMETHEUS_METRICS" in messages[0].msg
    assert "django-rpc-audit[prometheus]" in messages[0].hint


def test_an_unwritable_multiprocess_directory_is_w005(rpc_settings, monkeypatch, tmp_path):
    rpc_settings(PROMETHEUS_METRICS=True)
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "missing"))
    assert ids(checks.check_integrations()) == ["django_rpc_audit.W005"]
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    assert checks.check_integrations() == []


def test_webhooks_without_logging_is_w006(rpc_settings):
    endpoint = {"NAME": "ops", "URL": "https://hooks.example.com/", "FORMAT": "slack"}
    rpc_settings(WEBHOOKS=[endpoint], ENABLE_LOGGING=False)
    messages = checks.check_alerts()
    assert ids(messages) == ["django_rpc_audit.W006"]
    assert "ENABLE_LOGGING" in messages[0].msg
    rpc_settings(ENABLE_LOGGING=True)
    assert checks.check_alerts() == []


def test_a_cost_function_that_cannot_be_loaded_is_e005(rpc_settings):
    rpc_settings(
        COSTS={"a": "tests.test_costs.no_such_function", "b": "tests.test_costs.COSTS", "c": "1"}
    )
    messages = checks.check_costs()
    assert ids(messages) == ["django_rpc_audit.E005", "django_rpc_audit.E005"]
    assert "cannot be imported" in messages[0].msg
    assert "is not callable" in messages[1].msg
    rpc_settings(COSTS={"a": "tests.test_costs.per_recipient"})
    assert checks.check_costs() == []


@pytest.mark.parametrize(
    ("mode", "warned"), [("buffered", True), ("stream", False), ("sync", False)]
)
def test_costs_with_the_buffered_writer_is_w007(rpc_settings, mode, warned):
    rpc_settings(COSTS={"reports.*": "1"}, WRITE_MODE=mode)
    messages = checks.check_costs()
    assert ids(messages) == (["django_rpc_audit.W007"] if warned else [])
    if warned:
        assert "stream" in messages[0].hint
    rpc_settings(COSTS={})
    assert checks.check_costs() == []


def test_rollups_kept_shorter_than_the_rows_is_w008(rpc_settings):
    rpc_settings(RETENTION_DAYS=90, ROLLUP_RETENTION_DAYS=30)
    messages = checks.check_costs()
    assert ids(messages) == ["django_rpc_audit.W008"]
    assert "RETENTION_DAYS (90)" in messages[0].msg
    for days in (0, 90, 400):
        rpc_settings(ROLLUP_RETENTION_DAYS=days)
        assert checks.check_costs() == []
