"""System checks: configuration and wiring mistakes, reported by ``manage.py check``."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from django.apps import AppConfig, apps
from django.conf import settings
from django.core.checks import CheckMessage, Error, Tags, Warning, register
from django.core.exceptions import ImproperlyConfigured

from django_rpc_audit.conf import SETTING_NAME, get_config

MIDDLEWARE_PATH = "django_rpc_audit.middleware.RPCAuditMiddleware"
AUTH_MIDDLEWARE_PATH = "django.contrib.auth.middleware.AuthenticationMiddleware"


@register(Tags.compatibility)
def check_settings(
    app_configs: Sequence[AppConfig] | None = None, **kwargs: Any
) -> list[CheckMessage]:
    """E001: ``DJANGO_CFG_RPC`` (or a ``DJANGO_CFG_RPC__*`` variable) is invalid."""
    try:
        get_config()
    except ImproperlyConfigured as exc:
        return [
            Error(
                f"{SETTING_NAME} is invalid: {exc}",
                hint="See the settings reference in django-rpc-audit's docs (docs/settings.md).",
                id="django_rpc_audit.E001",
            )
        ]
    return []


@register(Tags.compatibility)
def check_middleware(
    app_configs: Sequence[AppConfig] | None = None, **kwargs: Any
) -> list[CheckMessage]:
    """W001: the middleware is missing; W002: it runs before authentication."""
    middleware = list(getattr(settings, "MIDDLEWARE", None) or [])
    if MIDDLEWARE_PATH not in middleware:
        return [
            Warning(
                f"{MIDDLEWARE_PATH} is not in MIDDLEWARE: RPC calls made in views will not "
                "record the user, client IP or user agent.",
                hint=f"Add {MIDDLEWARE_PATH!r} to MIDDLEWARE after {AUTH_MIDDLEWARE_PATH!r}.",
                id="django_rpc_audit.W001",
            )
        ]
    if AUTH_MIDDLEWARE_PATH in middleware and middleware.index(
        AUTH_MIDDLEWARE_PATH
    ) > middleware.index(MIDDLEWARE_PATH):
        return [
            Warning(
                f"{MIDDLEWARE_PATH} comes before {AUTH_MIDDLEWARE_PATH}: it cannot see "
                "request.user, so calls are logged without a user.",
                hint=f"Move {MIDDLEWARE_PATH!r} below {AUTH_MIDDLEWARE_PATH!r}.",
                id="django_rpc_audit.W002",
            )
        ]
    return []


@register(Tags.admin)
def check_unfold(
    app_configs: Sequence[AppConfig] | None = None, **kwargs: Any
) -> list[CheckMessage]:
    """E002: the admin is installed without django-unfold; W003: unfold after the admin."""
    if not apps.is_installed("django.contrib.admin"):
        return []
    if not apps.is_installed("unfold"):
        return [
            Error(
                "django-rpc-audit's admin needs django-unfold, which is not in INSTALLED_APPS.",
                hint="Add 'unfold' to INSTALLED_APPS, before 'django.contrib.admin'.",
                id="django_rpc_audit.E002",
            )
        ]
    order = [config.name for config in apps.get_app_configs()]
    if order.index("unfold") > order.index("django.contrib.admin"):
        return [
            Warning(
                "'unfold' comes after 'django.contrib.admin' in INSTALLED_APPS: the admin "
                "templates are Django's, not Unfold's.",
                hint="Move 'unfold' above 'django.contrib.admin'.",
                id="django_rpc_audit.W003",
            )
        ]
    return []


@register(Tags.compatibility)
def check_sampling(
    app_configs: Sequence[AppConfig] | None = None, **kwargs: Any
) -> list[CheckMessage]:
    """W004: sampling is on but ``ALWAYS_LOG_SLOWER_THAN_MS`` is never reached in time.

    Each value is valid on its own; together, a call slow enough to be kept would already
    have timed out, so slow successes are sampled away like fast ones.
    """
    try:
        config = get_config()
    except ImproperlyConfigured:
        return []  # E001 reports it
    sampling = config.sample_rate < 1 or any(rate < 1 for _, rate in config.sample_rates)
    if sampling and config.always_log_slower_than_ms >= config.rpc_timeout * 1000:
        return [
            Warning(
                f"{SETTING_NAME}['ALWAYS_LOG_SLOWER_THAN_MS'] "
                f"({config.always_log_slower_than_ms:g} ms) is not below RPC_TIMEOUT "
                f"({config.rpc_timeout:g} s): no successful call is ever slow enough to be "
                "kept, so slow calls are sampled like fast ones.",
                hint="Lower ALWAYS_LOG_SLOWER_THAN_MS below RPC_TIMEOUT.",
                id="django_rpc_audit.W004",
            )
        ]
    return []


@register(Tags.compatibility, Tags.database)
def check_database_backend(
    app_configs: Sequence[AppConfig] | None = None, **kwargs: Any
) -> list[CheckMessage]:
    """E101: the log table's database is not supported; E102: MySQL / MariaDB without
    Django's backend and mysqlclient. Needs no connection, so it also runs without
    ``--database``."""
    from django_rpc_audit.databases import backend_problems, log_aliases

    return [message for alias in log_aliases() for message in backend_problems(alias)]


@register(Tags.database)
def check_database_server(
    app_configs: Sequence[AppConfig] | None = None,
    databases: Sequence[str] | None = None,
    **kwargs: Any,
) -> list[CheckMessage]:
    """E103-E105, W101: what the MySQL / MariaDB server holding the log table lacks. Runs
    when the checks are given databases (``migrate``, ``check --database``)."""
    from django_rpc_audit.databases import log_aliases, server_problems

    if not databases:
        return []
    aliases = [alias for alias in log_aliases() if alias in databases]
    return [message for alias in aliases for message in server_problems(alias)]


@register(Tags.compatibility)
def check_rate_limit_policy(
    app_configs: Sequence[AppConfig] | None = None, **kwargs: Any
) -> list[CheckMessage]:
    """E003: ``RATE_LIMIT_POLICY`` cannot be imported or is not callable."""
    from django_rpc_audit.ratelimit.limiter import load_policy

    try:
        path = get_config().rate_limit_policy
    except ImproperlyConfigured:
        return []  # E001 reports it
    try:
        load_policy(path)
    except ImproperlyConfigured as exc:
        return [
            Error(
                str(exc),
                hint="Give the dotted path of a function taking a RateLimitCall.",
                id="django_rpc_audit.E003",
            )
        ]
    return []


@register(Tags.compatibility)
def check_integrations(
    app_configs: Sequence[AppConfig] | None = None, **kwargs: Any
) -> list[CheckMessage]:
    """E004: a metrics or tracing integration is on but its package is not installed;
    W005: ``PROMETHEUS_MULTIPROC_DIR`` is set but is not a writable directory."""
    try:
        config = get_config()
    except ImproperlyConfigured:
        return []  # E001 reports it
    from django_rpc_audit.integrations import missing_packages

    messages: list[CheckMessage] = [
        Error(
            f"{SETTING_NAME}[{key!r}] is on but the {module!r} package is not installed: "
            "the integration is off.",
            hint=f"pip install {extra!r}",
            id="django_rpc_audit.E004",
        )
        for key, (module, extra) in missing_packages(config).items()
    ]
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if (
        config.prometheus_metrics
        and directory
        and not (os.path.isdir(directory) and os.access(directory, os.W_OK))
    ):
        messages.append(
            Warning(
                f"PROMETHEUS_MULTIPROC_DIR ({directory!r}) is not a writable directory: "
                "prometheus-client cannot keep the metrics, so none are recorded.",
                hint="Create the directory before the server starts, writable by its workers.",
                id="django_rpc_audit.W005",
            )
        )
    return messages


@register(Tags.compatibility)
def check_alerts(
    app_configs: Sequence[AppConfig] | None = None, **kwargs: Any
) -> list[CheckMessage]:
    """W006: webhook endpoints are configured while ``ENABLE_LOGGING`` is off.

    Alerts are written to the outbox with the calls' log rows; with no rows, none are sent.
    """
    try:
        config = get_config()
    except ImproperlyConfigured:
        return []  # E001 reports it
    if config.webhooks and not config.enable_logging:
        return [
            Warning(
                f"{SETTING_NAME}['WEBHOOKS'] is set but ENABLE_LOGGING is off: alerts are "
                "queued with the calls' log rows, so none will be sent.",
                hint="Turn ENABLE_LOGGING on, or remove WEBHOOKS.",
                id="django_rpc_audit.W006",
            )
        ]
    return []


@register(Tags.compatibility)
def check_costs(
    app_configs: Sequence[AppConfig] | None = None, **kwargs: Any
) -> list[CheckMessage]:
    """E005: a ``COSTS`` function cannot be imported or is not callable; W007: ``COSTS`` is set
    with the buffered writer, which loses the calls it holds when its process is killed; W008:
    ``ROLLUP_RETENTION_DAYS`` is shorter than ``RETENTION_DAYS``."""
    try:
        config = get_config()
    except ImproperlyConfigured:
        return []  # E001 reports it
    from django_rpc_audit.costs import cost_functions, load_cost_function

    messages: list[CheckMessage] = []
    for path in cost_functions(config):
        try:
            load_cost_function(path)
        except ImproperlyConfigured as exc:
            messages.append(
                Error(
                    str(exc),
                    hint="Give the dotted path of a function taking a CostCall.",
                    id="django_rpc_audit.E005",
                )
            )
    if 0 < config.rollup_retention_days < config.retention_days:
        messages.append(
            Warning(
                f"{SETTING_NAME}['ROLLUP_RETENTION_DAYS'] ({config.rollup_retention_days}) is "
                f"shorter than RETENTION_DAYS ({config.retention_days}): rollups are kept as long "
                "as the rows, and usage reports of older months are gone with both.",
                hint="Keep the rollups longer than the rows (0 keeps them for ever).",
                id="django_rpc_audit.W008",
            )
        )
    if config.costs and config.enable_logging and config.write_mode == "buffered":
        messages.append(
            Warning(
                f"{SETTING_NAME}['COSTS'] is set with WRITE_MODE 'buffered': a process killed "
                "without its exit handlers (SIGKILL, out of memory) loses the calls its buffer "
                "holds, and a buffer full during a long database outage drops calls, so usage "
                "reports can miss billed calls.",
                hint="Use WRITE_MODE 'stream' (with rpc_logs_ingest workers) or 'sync' for "
                "exact billing: see docs/usage-and-costs.md.",
                id="django_rpc_audit.W007",
            )
        )
    return messages
