"""App config: registers the local RPC handlers (alerts are django-rpc-audit's own webhooks)."""

from __future__ import annotations

from django.apps import AppConfig


class NotificationsConfig(AppConfig):
    name = "notifications"
    verbose_name = "Notifications (django-rpc-audit example)"

    def ready(self) -> None:
        from notifications import handlers  # noqa: F401  (registers the local handlers)
