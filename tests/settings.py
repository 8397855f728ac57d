"""Settings for the test suite: SQLite by default, PostgreSQL when DATABASE_URL says so."""

from __future__ import annotations

import environ

env = environ.Env()

SECRET_KEY = "django-rpc-audit-tests"  # noqa: S105
DEBUG = False
USE_TZ = True
TIME_ZONE = "UTC"
ALLOWED_HOSTS = ["*"]
ROOT_URLCONF = "tests.urls"

DATABASES = {"default": env.db_url("DATABASE_URL", default="sqlite:///:memory:")}

INSTALLED_APPS = [
    "unfold",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    # Serves Unfold's and the dashboard's static files to the browser test's live server.
    "django.contrib.staticfiles",
    "django_rpc_audit",
]

MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django_rpc_audit.middleware.RPCAuditMiddleware",
]

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]

STATIC_URL = "/static/"

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]

DJANGO_CFG_RPC = {
    "TRANSPORT": "local",
    "REDIS_URL": env.str("REDIS_URL", default="redis://127.0.0.1:6379/15"),
    "RPC_TIMEOUT": 5,
    # Most tests assert rows right after a call, inside their transaction: the synchronous
    # writer. The buffered writer's tests (test_writers_buffered.py) choose it explicitly.
    "WRITE_MODE": "sync",
    # The alert tests deliver with deliver_due() in the test's thread (and transaction); the
    # background delivery thread is tested in child processes (test_alerts_processes.py).
    "WEBHOOK_DELIVERY_THREAD": False,
}
