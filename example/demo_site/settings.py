"""Settings of the example project.

SQLite and the in-process ("local") transport by default, so the demo runs with nothing but
Python. Environment variables switch it to the real thing:

``DATABASE_URL``
    Any database django-environ understands, e.g. ``postgres://postgres@127.0.0.1:5432/demo``.
``REDIS_URL``
    Talk to a django-ipc server over this Redis instead of answering calls in-process.
``RPC_FAILURE_WEBHOOK_URL``, ``RPC_WEBHOOK_SECRET``, ``RPC_WEBHOOK_FORMAT``
    Where django-rpc-audit's alerts go: signed webhooks (Standard Webhooks; the secret is
    ``whsec_...``) of failed, timed-out and slow calls, or ``slack`` for an incoming webhook.
"""

from __future__ import annotations

from pathlib import Path

import environ
from django.urls import reverse_lazy

BASE_DIR = Path(__file__).resolve().parent.parent

env = environ.Env()

SECRET_KEY = env.str("DJANGO_SECRET_KEY", default="django-rpc-audit-example-not-secret")
DEBUG = env.bool("DJANGO_DEBUG", default=True)
# "testserver" is the host django.test.Client sends; rpc_demo makes its requests with it.
ALLOWED_HOSTS = env.list("DJANGO_ALLOWED_HOSTS", default=["localhost", "127.0.0.1", "testserver"])

INSTALLED_APPS = [
    # Unfold's templates must be found before the admin's own.
    "unfold",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django_rpc_audit",
    "notifications",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    # After authentication: it hands request.user to every RPC call the view makes.
    "django_rpc_audit.middleware.RPCAuditMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "demo_site.urls"
WSGI_APPLICATION = "demo_site.wsgi.application"
ASGI_APPLICATION = "demo_site.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

DATABASES = {
    "default": env.db_url("DATABASE_URL", default=f"sqlite:///{BASE_DIR / 'db.sqlite3'}"),
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"

REDIS_URL = env.str("REDIS_URL", default="")

# The admin's sidebar: the RPC calls and their analytics dashboard, then every other app.
UNFOLD = {
    "SITE_TITLE": "django-rpc-audit demo",
    "SITE_HEADER": "RPC audit demo",
    "SIDEBAR": {
        "show_search": False,
        "show_all_applications": True,
        "navigation": [
            {
                "title": "RPC audit",
                "items": [
                    {
                        "title": "Calls",
                        "icon": "swap_horiz",
                        "link": reverse_lazy("admin:django_rpc_audit_rpclog_changelist"),
                        "permission": "django_rpc_audit.dashboard.can_view_rpc_logs",
                    },
                    {
                        "title": "Analytics",
                        "icon": "monitoring",
                        "link": reverse_lazy("admin:django_rpc_audit_rpclog_dashboard"),
                        "permission": "django_rpc_audit.dashboard.can_view_rpc_logs",
                    },
                    {
                        "title": "Usage",
                        "icon": "receipt_long",
                        "link": reverse_lazy("admin:django_rpc_audit_rpclog_usage"),
                        "permission": "django_rpc_audit.dashboard.can_view_rpc_logs",
                    },
                ],
            },
        ],
    },
}

DJANGO_CFG_RPC = {
    "ENABLED": True,
    # Without REDIS_URL the calls are answered in-process by notifications/handlers.py.
    "TRANSPORT": "redis" if REDIS_URL else "local",
    "REDIS_URL": REDIS_URL or "redis://127.0.0.1:6379/2",
    # Short, so the demo's timeouts cost little; views that expect a quick answer pass an
    # even shorter timeout= of their own.
    "RPC_TIMEOUT": 2,
}

# Alerts (docs/alerts.md): signed webhooks of failed, timed-out and slow calls.
RPC_FAILURE_WEBHOOK_URL = env.str("RPC_FAILURE_WEBHOOK_URL", default="")
if RPC_FAILURE_WEBHOOK_URL:
    DJANGO_CFG_RPC["WEBHOOKS"] = [
        {
            "NAME": "demo",
            "URL": RPC_FAILURE_WEBHOOK_URL,
            "SECRET": env.str("RPC_WEBHOOK_SECRET", default=""),
            "FORMAT": env.str("RPC_WEBHOOK_FORMAT", default="standard"),
        }
    ]
    DJANGO_CFG_RPC["ADMIN_BASE_URL"] = "http://127.0.0.1:8000"

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(levelname)s %(name)s: %(message)s"}},
    "handlers": {
        "stdout": {
            "class": "logging.StreamHandler",
            "stream": "ext://sys.stdout",
            "formatter": "plain",
        },
    },
    "loggers": {
        "notifications": {"handlers": ["stdout"], "level": "INFO", "propagate": False},
        "django_rpc_audit": {"handlers": ["stdout"], "level": "WARNING", "propagate": False},
    },
}
