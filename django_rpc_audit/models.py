"""The ``RPCLog`` model: one row per RPC call."""

from __future__ import annotations

import uuid

from django.conf import settings
from django.db import models
from django.utils import timezone
from django.utils.translation import gettext_lazy as _

from django_rpc_audit.alerts.models import WebhookDelivery, WebhookEndpointState
from django_rpc_audit.conf import COST_DECIMAL_PLACES, COST_MAX_DIGITS
from django_rpc_audit.indexes import HashIndex, PartialIndex
from django_rpc_audit.querysets import RPCLogQuerySet
from django_rpc_audit.rollups.models import (
    RPCDailyRollup,
    RPCDailyUserRollup,
    RPCHourlyMethodRollup,
    RPCRollup,
    RPCRollupBucket,
    RPCRollupDay,
)
from django_rpc_audit.status import RPCStatus

__all__ = [
    "RPCDailyRollup",
    "RPCDailyUserRollup",
    "RPCHourlyMethodRollup",
    "RPCLog",
    "RPCRollup",
    "RPCRollupBucket",
    "RPCRollupDay",
    "RPCStatus",
    "WebhookDelivery",
    "WebhookEndpointState",
]


class RPCLog(models.Model):
    """One RPC call: who made it, from where, with what, how long it took and how it ended."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    correlation_id = models.CharField(_("correlation id"), max_length=64)
    method = models.CharField(_("method"), max_length=255)
    params = models.JSONField(_("params"), default=dict, blank=True)
    response = models.JSONField(_("response"), null=True, blank=True)
    status = models.CharField(
        _("status"), max_length=16, choices=RPCStatus.choices, default=RPCStatus.PENDING
    )
    error_code = models.CharField(_("error code"), max_length=100, blank=True)
    error_message = models.TextField(_("error message"), blank=True)
    duration_ms = models.FloatField(_("duration (ms)"), null=True, blank=True)
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        verbose_name=_("user"),
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="rpc_logs",
        # Covered by the (user, created_at) index below; a second one would only cost writes.
        db_index=False,
    )
    #: The user's ``USERNAME_FIELD`` when the call was made: who made it, also once the user
    #: is deleted (``user`` is then unset). A database default too, like ``sample_rate``.
    username = models.CharField(
        _("username"), max_length=255, blank=True, default="", db_default=""
    )
    caller_ip = models.GenericIPAddressField(_("caller IP"), null=True, blank=True)
    user_agent = models.TextField(_("user agent"), blank=True)
    created_at = models.DateTimeField(_("created at"), default=timezone.now)
    completed_at = models.DateTimeField(_("completed at"), null=True, blank=True)
    #: Share of calls like this one that are logged: 1.0 unless successful calls are sampled;
    #: analytics count each row as ``1 / sample_rate`` calls. A database default too, so rows
    #: written by code that does not know the column (a release still running during a rolling
    #: deploy, raw SQL) still land.
    sample_rate = models.FloatField(_("sample rate"), default=1.0, db_default=1.0)
    #: The OpenTelemetry trace and span of the call (32 and 16 hex digits) when ``OTEL_TRACES``
    #: traced it and the trace is sampled; empty otherwise.
    trace_id = models.CharField(_("trace id"), max_length=32, blank=True, default="", db_default="")
    span_id = models.CharField(_("span id"), max_length=16, blank=True, default="", db_default="")
    #: Slower than its method's recent normal (``django_rpc_audit.alerts.slow``).
    is_slow = models.BooleanField(_("slow"), default=False, db_default=False)
    #: What the call costs (``COSTS``), in the unit the prices are in; ``NULL`` when it costs
    #: nothing: no rule for its method, an outcome that is not billed, or a function that
    #: returned ``None`` (or failed). Calls with a cost are never sampled out.
    cost = models.DecimalField(
        _("cost"),
        max_digits=COST_MAX_DIGITS,
        decimal_places=COST_DECIMAL_PLACES,
        null=True,
        blank=True,
    )

    objects = RPCLogQuerySet.as_manager()

    class Meta:
        verbose_name = _("RPC log")
        verbose_name_plural = _("RPC logs")
        ordering = ("-created_at",)
        get_latest_by = "created_at"
        # One index per documented query shape; each also serves its prefix. Every index costs
        # each insert (BENCHMARKS.md, ingest): the rare rows get partial indexes, equality-only
        # lookups a hash index. created_at stays a B-tree, not BRIN: the admin's newest-first
        # pages need its order.
        indexes = (
            # recent(), the admin's default ordering and date hierarchy.
            models.Index(fields=["created_at"], name="rpclog_created_idx"),
            # failed() / timed_out() / pending() / stale() within a window. Successful calls,
            # most rows, are not in it: succeeded() takes created_at's index.
            PartialIndex(
                fields=["status", "created_at"],
                name="rpclog_unsuccess_created_idx",
                where=~models.Q(status=RPCStatus.SUCCESS),
            ),
            # for_method() within a window, and stats_by_method()'s grouping.
            models.Index(fields=["method", "created_at"], name="rpclog_method_created_idx"),
            # for_user() within a window; also the user foreign key's index.
            models.Index(fields=["user", "created_at"], name="rpclog_user_created_idx"),
            # Looking a call up by the id shared with the server's logs (equality only).
            HashIndex(fields=["correlation_id"], name="rpclog_correlation_hash"),
            # From a trace (Grafana, Tempo, Jaeger) to its calls: the admin's trace id search.
            # Rows without a trace (most, unless OTEL_TRACES) are not in it.
            PartialIndex(
                fields=["trace_id"], name="rpclog_traced_idx", where=~models.Q(trace_id="")
            ),
            # The slow calls within a window (dashboard panel, changelist filter); only they are
            # in it.
            PartialIndex(
                fields=["is_slow", "created_at"],
                name="rpclog_slow_created_idx",
                where=models.Q(is_slow=True),
            ),
        )

    def __str__(self) -> str:
        return f"{self.method} [{self.status}] {self.correlation_id}"

    @property
    def is_finished(self) -> bool:
        """True once the call has an outcome."""
        return self.status != RPCStatus.PENDING
