"""App config: connects the built-in receivers and registers the system checks."""

from __future__ import annotations

from django.apps import AppConfig
from django.utils.translation import gettext_lazy as _


class RPCAuditConfig(AppConfig):
    name = "django_rpc_audit"
    label = "django_rpc_audit"
    verbose_name = _("RPC audit")
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from django_rpc_audit import checks, conf  # noqa: F401  (registers checks, setting_changed)
        from django_rpc_audit.receivers import log_rpc_finished, log_rpc_started
        from django_rpc_audit.signals import rpc_finished, rpc_started
        from django_rpc_audit.writers import install_sigterm_flush

        # Always connected: ENABLE_LOGGING is read per call from the cached config, so
        # override_settings and environment changes take effect without reconnecting.
        rpc_started.connect(log_rpc_started, dispatch_uid="django_rpc_audit.log_rpc_started")
        rpc_finished.connect(log_rpc_finished, dispatch_uid="django_rpc_audit.log_rpc_finished")
        # The buffered writer's rows are written on SIGTERM too, not only at a normal exit.
        install_sigterm_flush()
