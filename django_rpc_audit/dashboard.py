"""The real-time analytics dashboard: an admin page built from the analytics API.

The short windows are read from the log rows (minute resolution, exact percentiles); the long
ones from the hourly rollups and the rows not rolled up yet
(:class:`~django_rpc_audit.analytics.CallWindow`), so they cost the same at ten million rows
as at a thousand, and keep their figures after ``rpc_logs_cleanup``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils import timezone
from django.utils.translation import gettext_lazy as _

from django_rpc_audit.analytics import CallWindow, Source
from django_rpc_audit.conf import get_config
from django_rpc_audit.models import RPCLog, RPCStatus
from django_rpc_audit.querysets import Bucket

if TYPE_CHECKING:
    from django_rpc_audit.admin import RPCLogAdmin

#: Rows shown in each of the dashboard's tables.
TABLE_ROWS = 8
#: The chart's colour for calls refused by their rate limit.
RATE_LIMITED_COLOUR = "#f59e0b"
_ERRORS = f"{RPCStatus.FAILED},{RPCStatus.TIMEOUT}"


@dataclass(frozen=True)
class Window:
    """A time window the dashboard can show."""

    key: str
    label: Any
    length: timedelta
    bucket: Bucket
    #: Refreshes come this many times less often than ``ADMIN_DASHBOARD_REFRESH_SECONDS``: a
    #: week of calls barely moves in five seconds.
    refresh_factor: int = 1
    #: Where the figures come from: the log rows, or the rollups (and the rows not rolled up
    #: yet). See :class:`~django_rpc_audit.analytics.CallWindow`.
    source: Source = "rows"


WINDOWS: dict[str, Window] = {
    window.key: window
    for window in (
        Window("1h", _("Last hour"), timedelta(hours=1), "minute"),
        Window(
            "24h",
            _("Last 24 hours"),
            timedelta(hours=24),
            "hour",
            refresh_factor=6,
            source="rollups",
        ),
        Window(
            "7d", _("Last 7 days"), timedelta(days=7), "hour", refresh_factor=12, source="rollups"
        ),
        Window(
            "30d", _("Last 30 days"), timedelta(days=30), "day", refresh_factor=12, source="rollups"
        ),
        Window(
            "90d", _("Last 90 days"), timedelta(days=90), "day", refresh_factor=12, source="rollups"
        ),
    )
}
DEFAULT_WINDOW = "1h"


def can_view_rpc_logs(request: HttpRequest) -> bool:
    """Unfold sidebar ``permission`` callback: may this user see the RPC logs and dashboard?

    ``"permission": "django_rpc_audit.dashboard.can_view_rpc_logs"`` in ``UNFOLD["SIDEBAR"]``.
    """
    user = request.user
    return bool(user.is_active and user.is_staff and user.has_perm("django_rpc_audit.view_rpclog"))


def dashboard_view(request: HttpRequest, model_admin: RPCLogAdmin) -> HttpResponse:
    """The dashboard page; staff with the view permission on ``RPCLog`` only (else 403)."""
    if not model_admin.has_view_permission(request):
        raise PermissionDenied
    window = WINDOWS.get(request.GET.get("window", ""), WINDOWS[DEFAULT_WINDOW])
    site = model_admin.admin_site
    context = {
        **site.each_context(request),
        **dashboard_context(window, site.name),
        "title": _("RPC analytics"),
        "subtitle": window.label,
        # Unfold's header reads "<app> > <model> > content_title" from these two.
        "model_admin": model_admin,
        "content_title": _("Analytics"),
        "windows": [(w, w.key == window.key) for w in WINDOWS.values()],
        "refresh_seconds": get_config().admin_dashboard_refresh_seconds * window.refresh_factor,
        "changelist_url": _changelist(site.name),
    }
    request.current_app = site.name
    return TemplateResponse(request, "django_rpc_audit/admin/dashboard.html", context)


def dashboard_context(window: Window, site_name: str = "admin") -> dict[str, Any]:
    """Every figure the dashboard shows for ``window``, with the changelist link of each."""
    now = timezone.now()
    figures = CallWindow(now - window.length, now, source=window.source)
    since = figures.since  # with the rollups, the start of its hour
    calls = figures.rows()
    since_param = {"created_at__gte": since.isoformat()}

    def link(**params: Any) -> str:
        return _changelist(site_name, **since_param, **params)

    overview = figures.overview()
    by_method = figures.calls_by_method()
    errors_by_method = sorted(
        (row for row in by_method if row["failed_count"] + row["timeout_count"]),
        key=lambda row: (-(row["failed_count"] + row["timeout_count"]), row["method"]),
    )[:TABLE_ROWS]
    slowest = sorted(
        (row for row in by_method if row["avg_duration_ms"] is not None),
        key=lambda row: (-(row["avg_duration_ms"] or 0.0), row["method"]),
    )[:TABLE_ROWS]
    users = figures.busiest_users(limit=TABLE_ROWS)
    failures = list(
        calls.unsuccessful().select_related("user").order_by("-created_at")[:TABLE_ROWS]
    )
    slow_calls = list(calls.flagged_slow().order_by("-created_at")[:TABLE_ROWS])
    return {
        "window": window,
        "now": now,
        "since": since,
        "source": figures.source,
        "overview": overview,
        "kpis": _kpis(overview, link),
        "chart": _chart(figures, window),
        "errors_by_method": [
            {
                **row,
                "errors": row["failed_count"] + row["timeout_count"],
                "url": link(method=row["method"], status__in=_ERRORS),
            }
            for row in errors_by_method
        ],
        "slowest_methods": [
            {**row, "url": link(method=row["method"], o=_slowest_first())} for row in slowest
        ],
        "busiest_users": [
            {
                **row,
                "errors": row["failed_count"] + row["timeout_count"],
                "url": link(user=row["user_id"])
                if row["user_id"] is not None
                else link(user__isnull="True"),
            }
            for row in users
        ],
        "recent_failures": [{"log": log, "url": _change_url(site_name, log)} for log in failures],
        "failures_url": link(status__in=_ERRORS),
        "slow_calls": [{"log": log, "url": _change_url(site_name, log)} for log in slow_calls],
        "slow_calls_url": link(is_slow__exact="1"),
        "rate_limited_colour": RATE_LIMITED_COLOUR,
    }


def _change_url(site_name: str, log: RPCLog) -> str:
    return reverse(
        f"{site_name}:django_rpc_audit_rpclog_change", args=[log.pk], current_app=site_name
    )


def _slowest_first() -> str:
    """The changelist's ``o`` parameter ordering by the duration column, slowest first."""
    from django_rpc_audit.admin import RPCLogAdmin

    return f"-{list(RPCLogAdmin.list_display).index('duration')}"


def _changelist(site_name: str, **params: Any) -> str:
    from django_rpc_audit.admin import changelist_url

    return changelist_url(site_name, **params)


def _kpis(overview: Any, link: Any) -> list[dict[str, Any]]:
    from django_rpc_audit.admin import format_duration

    def rate(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}%"

    def duration(value: float | None) -> str:
        return "-" if value is None else format_duration(value)

    kpis = [
        {
            "key": "total",
            "label": _("Total calls"),
            "value": f"{overview['total_calls']:,}",
            "detail": _("%(pending)s in flight") % {"pending": f"{overview['pending_count']:,}"},
            "url": link(),
        },
        {
            "key": "success_rate",
            "label": _("Success rate"),
            "value": rate(overview["success_rate"]),
            "detail": _("%(count)s succeeded") % {"count": f"{overview['success_count']:,}"},
            "url": link(status__exact=RPCStatus.SUCCESS),
            "tone": "success",
        },
        {
            "key": "error_rate",
            "label": _("Error rate"),
            "value": rate(overview["error_rate"]),
            "detail": _("%(failed)s failed, %(timeout)s timed out")
            % {
                "failed": f"{overview['failed_count']:,}",
                "timeout": f"{overview['timeout_count']:,}",
            },
            "url": link(status__in=_ERRORS),
            "tone": "danger" if overview["error_rate"] else "",
        },
        {
            "key": "rate_limited",
            "label": _("Rate limited"),
            "value": f"{overview['rate_limited_count']:,}",
            "detail": _("refused, not sent"),
            "url": link(status__exact=RPCStatus.RATE_LIMITED),
        },
    ]
    for name, label in (("p50", "p50"), ("p95", "p95"), ("p99", "p99")):
        value = overview[f"{name}_duration_ms"]
        kpis.append(
            {
                "key": name,
                "label": _("%(percentile)s latency") % {"percentile": label},
                "value": duration(value),
                "detail": _("calls at least this slow"),
                "url": link(duration_ms__gte=value) if value is not None else link(),
            }
        )
    return kpis


#: Minutes in each bucket of the chart, which shows calls per minute whatever its buckets.
_MINUTES = {"minute": 1, "hour": 60, "day": 24 * 60}


def _chart(figures: CallWindow, window: Window) -> dict[str, Any]:
    """Calls per minute per bucket, stacked by outcome: Chart.js data for Unfold's look."""
    timeline = figures.calls_over_time(bucket=window.bucket)
    minutes = _MINUTES[window.bucket]
    if window.bucket == "day":
        label_format = "%d %b"
    else:
        label_format = "%H:%M" if window.length <= timedelta(hours=24) else "%a %H:%M"
    labels = [bucket["start"].strftime(label_format) for bucket in timeline]
    errors = [(b["failed_count"] + b["timeout_count"]) / minutes for b in timeline]
    limited = [b["rate_limited_count"] / minutes for b in timeline]
    others = [
        b["total_calls"] / minutes - error - refused
        for b, error, refused in zip(timeline, errors, limited, strict=True)
    ]
    data = {
        "labels": labels,
        "datasets": [
            {
                "label": str(_("Succeeded or in flight")),
                "data": [round(value, 2) for value in others],
                "backgroundColor": "var(--color-primary-600)",
                "stack": "calls",
            },
            {
                "label": str(_("Failed or timed out")),
                "data": [round(value, 2) for value in errors],
                "backgroundColor": "#ef4444",
                "stack": "calls",
            },
            {
                "label": str(_("Rate limited")),
                "data": [round(value, 2) for value in limited],
                "backgroundColor": RATE_LIMITED_COLOUR,
                "stack": "calls",
            },
        ],
    }
    return {
        "data": json.dumps(data),
        "total_calls": sum(bucket["total_calls"] for bucket in timeline),
        "buckets": len(timeline),
    }
