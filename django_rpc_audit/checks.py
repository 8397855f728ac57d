"""System checks: configuration and wiring mistakes, reported by ``manage.py check``."""

from __future__ import annotations

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
