"""App config: registers the local RPC handlers and connects the failure webhook."""

from __future__ import annotations

from django.apps import AppConfig


class NotificationsConfig(AppConfig):
    name = "notifications"
    verbose_name = "Notifications (django-rpc-audit example)"

    def ready(self) -> None:
        from django_rpc_audit.signals import rpc_finished
        from notifications import handlers  # noqa: F401  (registers the local handlers)
        from notifications.receivers import post_failure_webhook

        rpc_finished.connect(
            post_failure_webhook, dispatch_uid="notifications.post_failure_webhook"
        )
