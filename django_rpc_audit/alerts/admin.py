"""The alerts in the admin: every webhook delivery with its attempts, and the endpoints' state.

Read-only, like the call log; staff with the ``resend_webhookdelivery`` permission can send
deliveries again, and staff who may change endpoints can enable one disabled by a 410.
"""

from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils import timezone
from django.utils.translation import gettext_lazy as _
from django.utils.translation import ngettext
from unfold.admin import ModelAdmin
from unfold.decorators import action, display

from django_rpc_audit.alerts.delivery import resend
from django_rpc_audit.alerts.models import DeliveryState, WebhookDelivery, WebhookEndpointState

_STATE_LABELS = {
    DeliveryState.PENDING: "info",
    DeliveryState.DELIVERED: "success",
    DeliveryState.GROUPED: "",
    DeliveryState.SKIPPED: "",
    DeliveryState.FAILED: "danger",
    DeliveryState.CANCELLED: "warning",
}


class _ReadOnly:
    """Nobody adds or edits these rows by hand: the outbox and the endpoints' state are the
    delivery loop's; staff act on them through the actions."""

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(WebhookDelivery)
class WebhookDeliveryAdmin(_ReadOnly, ModelAdmin):  # type: ignore[misc]
    """Each delivery: state, attempts, last response code, next try; "send again"."""

    list_display = (
        "state_badge",
        "event",
        "kind",
        "method",
        "endpoint",
        "attempts",
        "last_status_code",
        "next_attempt_at",
        "created_at",
    )
    list_display_links = ("state_badge", "event")
    list_filter = ("state", "event", "kind", "endpoint")
    search_fields = ("method", "correlation_id", "endpoint")
    list_per_page = 50
    show_full_result_count = False
    show_facets = admin.ShowFacets.NEVER
    ordering = ("-created_at",)
    actions = ("send_again",)
    readonly_fields = (
        "id",
        "webhook_id",
        "endpoint",
        "event",
        "kind",
        "state",
        "method",
        "error_code",
        "correlation_id",
        "log_id",
        "occurred_at",
        "digest_id",
        "attempts",
        "next_attempt_at",
        "last_attempt_at",
        "last_status_code",
        "last_error",
        "payload",
        "created_at",
    )
    exclude = ("group_key", "storm_checked")

    def has_resend_permission(self, request: HttpRequest) -> bool:
        user: Any = request.user
        return bool(user.is_staff and user.has_perm("django_rpc_audit.resend_webhookdelivery"))

    @display(description=_("state"), ordering="state", label=_STATE_LABELS)
    def state_badge(self, obj: WebhookDelivery) -> Any:
        return obj.state, obj.get_state_display()

    @display(description=_("webhook-id"))
    def webhook_id(self, obj: WebhookDelivery) -> str:
        return obj.webhook_id

    @action(description=_("Send again"), permissions=["resend"])
    def send_again(self, request: HttpRequest, queryset: QuerySet[WebhookDelivery]) -> None:
        count = resend(queryset)
        from django_rpc_audit.alerts import worker

        worker.wake()
        self.message_user(
            request,
            ngettext(
                "%(count)d delivery queued again.", "%(count)d deliveries queued again.", count
            )
            % {"count": count},
            messages.SUCCESS,
        )


@admin.register(WebhookEndpointState)
class WebhookEndpointStateAdmin(_ReadOnly, ModelAdmin):  # type: ignore[misc]
    """Endpoints disabled after answering 410 Gone; "enable again" re-arms one."""

    list_display = ("name", "disabled_at", "disabled_reason", "updated_at")
    readonly_fields = ("name", "disabled_at", "disabled_reason", "updated_at")
    actions = ("enable_again",)

    def has_enable_permission(self, request: HttpRequest) -> bool:
        user: Any = request.user
        return bool(user.is_staff and user.has_perm("django_rpc_audit.change_webhookendpointstate"))

    @action(description=_("Enable again"), permissions=["enable"])
    def enable_again(self, request: HttpRequest, queryset: QuerySet[WebhookEndpointState]) -> None:
        count = queryset.update(disabled_at=None, disabled_reason="", updated_at=timezone.now())
        self.message_user(
            request,
            ngettext("%(count)d endpoint enabled.", "%(count)d endpoints enabled.", count)
            % {"count": count},
            messages.SUCCESS,
        )
