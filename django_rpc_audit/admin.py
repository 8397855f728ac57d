"""Read-only django-unfold admin for ``RPCLog``: an audit trail is looked at, not edited."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.http import HttpRequest
from django.utils.translation import gettext_lazy as _
from unfold.admin import ModelAdmin
from unfold.decorators import display

from django_rpc_audit.models import RPCLog, RPCStatus


class RPCLogDisplayMixin:
    """Display methods for ``RPCLog`` columns, reusable when a project registers its own admin."""

    @display(
        description=_("status"),
        ordering="status",
        label={
            RPCStatus.SUCCESS: "success",
            RPCStatus.FAILED: "danger",
            RPCStatus.TIMEOUT: "warning",
            RPCStatus.PENDING: "info",
        },
    )
    def status_badge(self, obj: RPCLog) -> Any:
        return obj.status, obj.get_status_display()

    @display(description=_("duration"), ordering="duration_ms")
    def duration(self, obj: RPCLog) -> str:
        if obj.duration_ms is None:
            return "-"
        if obj.duration_ms < 1:
            return f"{obj.duration_ms * 1000:.0f} µs"
        if obj.duration_ms < 1000:
            return f"{obj.duration_ms:.1f} ms"
        return f"{obj.duration_ms / 1000:.2f} s"


@admin.register(RPCLog)
class RPCLogAdmin(RPCLogDisplayMixin, ModelAdmin):  # type: ignore[misc]
    list_display = ("status_badge", "method", "duration", "user", "caller_ip", "created_at")
    list_filter = ("status",)
    search_fields = ("method", "=correlation_id")
    list_select_related = ("user",)
    date_hierarchy = "created_at"
    show_full_result_count = False
    ordering = ("-created_at",)
    readonly_fields = [field.name for field in RPCLog._meta.fields]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: RPCLog | None = None) -> bool:
        return False
