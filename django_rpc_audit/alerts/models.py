"""The alerts' tables: the webhook outbox (one row per delivery) and the endpoints' state."""

from __future__ import annotations

import uuid

from django.db import models
from django.utils import timezone
from django.utils.translation import gettext_lazy as _


class DeliveryState(models.TextChoices):
    """Where a delivery stands."""

    #: Waiting for its (next) attempt at ``next_attempt_at``.
    PENDING = "pending", _("Pending")
    #: The endpoint answered 2xx.
    DELIVERED = "delivered", _("Delivered")
    #: Not sent on its own: counted in the digest ``digest_id`` (storm control).
    GROUPED = "grouped", _("Grouped")
    #: A digest with nothing to report (no further occurrence within its window).
    SKIPPED = "skipped", _("Skipped")
    #: Given up: the retry schedule ran out, or the endpoint refused it for good (4xx).
    FAILED = "failed", _("Failed")
    #: Not sent: the endpoint is disabled (it answered 410) or no longer configured.
    CANCELLED = "cancelled", _("Cancelled")


class DeliveryKind(models.TextChoices):
    EVENT = "event", _("Event")
    DIGEST = "digest", _("Digest")


class WebhookDelivery(models.Model):
    """One notification for one endpoint: an event (a failed, timed-out or slow call) or the
    digest of the further occurrences grouped within a window. Its id is the ``webhook-id``."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    endpoint = models.CharField(_("endpoint"), max_length=64)
    event = models.CharField(_("event"), max_length=32)
    kind = models.CharField(
        _("kind"), max_length=16, choices=DeliveryKind.choices, default=DeliveryKind.EVENT
    )
    state = models.CharField(
        _("state"), max_length=16, choices=DeliveryState.choices, default=DeliveryState.PENDING
    )
    method = models.CharField(_("method"), max_length=255)
    error_code = models.CharField(_("error code"), max_length=100, blank=True)
    #: Hash of (event, method, error code): what storm control groups by, per endpoint.
    group_key = models.CharField(_("group key"), max_length=64)
    correlation_id = models.CharField(_("correlation id"), max_length=64, blank=True)
    #: The ``RPCLog`` row of the call (no foreign key: pruning logs must not touch alerts).
    log_id = models.UUIDField(_("log id"), null=True, blank=True)
    #: When the call ended (an event) or the window opened (a digest).
    occurred_at = models.DateTimeField(_("occurred at"), default=timezone.now)
    #: The ``data`` of the webhook body; a digest's is filled in once, at its first attempt.
    payload = models.JSONField(_("payload"), null=True, blank=True)
    #: Storm control has decided on this event (sent on its own, or grouped).
    storm_checked = models.BooleanField(_("storm checked"), default=False)
    #: The window's digest: the one this event was grouped into, or that counts the events
    #: after it when this event opened the window (sent on its own).
    digest_id = models.UUIDField(_("digest"), null=True, blank=True)
    attempts = models.PositiveIntegerField(_("attempts"), default=0)
    next_attempt_at = models.DateTimeField(_("next try"), null=True, blank=True)
    last_attempt_at = models.DateTimeField(_("last try"), null=True, blank=True)
    last_status_code = models.PositiveSmallIntegerField(_("last response"), null=True, blank=True)
    last_error = models.TextField(_("last error"), blank=True)
    created_at = models.DateTimeField(_("created at"), default=timezone.now)

    class Meta:
        verbose_name = _("webhook delivery")
        verbose_name_plural = _("webhook deliveries")
        ordering = ("-created_at",)
        permissions = (("resend_webhookdelivery", _("Can send webhook deliveries again")),)
        indexes = (
            # The delivery loop's claim: due pending rows, oldest due first.
            models.Index(fields=["state", "next_attempt_at"], name="rpcwebhook_due_idx"),
            # A digest counts the events grouped into it.
            models.Index(fields=["digest_id"], name="rpcwebhook_digest_idx"),
            models.Index(fields=["created_at"], name="rpcwebhook_created_idx"),
        )

    def __str__(self) -> str:
        return f"{self.event} {self.method} -> {self.endpoint} [{self.state}]"

    @property
    def webhook_id(self) -> str:
        """The ``webhook-id`` header: the same for every attempt of this delivery."""
        return f"msg_{self.id.hex}"


class WebhookEndpointState(models.Model):
    """Run-time state of a configured endpoint: disabled after it answered 410 Gone."""

    name = models.CharField(_("endpoint"), max_length=64, primary_key=True)
    disabled_at = models.DateTimeField(_("disabled at"), null=True, blank=True)
    disabled_reason = models.TextField(_("reason"), blank=True)
    updated_at = models.DateTimeField(_("updated at"), auto_now=True)

    class Meta:
        verbose_name = _("webhook endpoint")
        verbose_name_plural = _("webhook endpoints")

    def __str__(self) -> str:
        return self.name
