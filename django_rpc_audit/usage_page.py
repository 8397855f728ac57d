"""The admin's Usage page: calls and costs per user for a month, from the rollups, and CSV."""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

from django.core.exceptions import PermissionDenied, ValidationError
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils import timezone
from django.utils.translation import gettext_lazy as _

from django_rpc_audit.usage import UsageLine, month_range, to_csv, total, usage

if TYPE_CHECKING:
    from django_rpc_audit.admin import RPCLogAdmin


def usage_view(request: HttpRequest, model_admin: RPCLogAdmin) -> HttpResponse:
    """The Usage page (``?month=2026-11``, ``&user=<id>`` for one user's methods,
    ``&format=csv`` to download it); staff with the view permission on ``RPCLog`` (else 403).
    Read-only: every user's month from the daily user rollups (its whole UTC days) and the
    hourly ones (the rest); one user's methods from the hourly rollups."""
    if not model_admin.has_view_permission(request):
        raise PermissionDenied
    site = model_admin.admin_site
    month = request.GET.get("month") or f"{timezone.now():%Y-%m}"
    try:
        start, end = month_range(month)
    except ValueError:
        start, end = month_range(f"{timezone.now():%Y-%m}")
    user_filter = _user_filter(request.GET.get("user") or None)
    by = ("user", "method") if user_filter else ("user",)
    lines = _lines(start, end, by, user_filter)
    label = f"{start:%Y-%m}"
    if request.GET.get("format") == "csv":
        response = HttpResponse(content_type="text/csv; charset=utf-8")
        response["Content-Disposition"] = f'attachment; filename="rpc-usage-{label}.csv"'
        to_csv(lines, response)
        return response
    here = reverse(f"{site.name}:django_rpc_audit_rpclog_usage", current_app=site.name)
    changelist = _changelist(site.name)
    context = {
        **site.each_context(request),
        "title": _("RPC usage"),
        "subtitle": label,
        "model_admin": model_admin,
        "content_title": _("Usage"),
        "month": label,
        "one_user": bool(user_filter),
        "rows": [_row(line, start, end, changelist, here, label) for line in lines],
        "total": total(lines),
        "previous_url": f"{here}?month={_shift(start, -1):%Y-%m}",
        "next_url": f"{here}?month={_shift(start, 1):%Y-%m}",
        "all_users_url": f"{here}?month={label}",
        "csv_url": f"{here}?{request.GET.urlencode()}&format=csv"
        if request.GET
        else f"{here}?format=csv",
        "changelist_url": _changelist(site.name, **_period(start, end)),
    }
    request.current_app = site.name
    return TemplateResponse(request, "django_rpc_audit/admin/usage.html", context)


def _user_filter(raw: str | None) -> dict[str, Any]:
    """``?user=``: a user's primary key, ``none`` for anonymous calls, else every user (a value
    that is no key of the user model is ignored, not an error page)."""
    if raw is None:
        return {}
    if raw == "none":
        return {"user": None}
    from django.contrib.auth import get_user_model

    try:
        return {"user": get_user_model()._meta.pk.to_python(raw)}
    except ValidationError:
        return {}


def _lines(
    start: dt.datetime, end: dt.datetime, by: tuple[str, ...], user_filter: dict[str, Any]
) -> list[UsageLine]:
    if user_filter.get("user", 0) is None:
        lines = usage(start, end, by=("user", "method"))
        return [line for line in lines if line.user_id is None]
    return usage(start, end, by=by, **user_filter)  # type: ignore[arg-type]


def _row(
    line: UsageLine, start: dt.datetime, end: dt.datetime, changelist: str, here: str, month: str
) -> dict[str, Any]:
    """A line of the page, with its links (``changelist``: the changelist's URL, reversed once
    for every line of a month)."""
    period = _period(start, end)
    if line.user_id is not None:
        who = {"user": line.user_id}
    else:
        # Anonymous calls, or a deleted user's: found by the username snapshot.
        who = {"user__isnull": "True", "q": line.username or None}
    method = {"method": line.method} if line.method else {}
    return {
        "line": line,
        "calls_url": _with_query(changelist, **period, **who, **method),
        "billed_url": _with_query(changelist, **period, **who, **method, cost__isnull="False"),
        "methods_url": f"{here}?month={month}&user={line.user_id or 'none'}",
    }


def _period(start: dt.datetime, end: dt.datetime) -> dict[str, str]:
    return {"created_at__gte": start.isoformat(), "created_at__lt": end.isoformat()}


def _shift(first: dt.datetime, months: int) -> dt.date:
    index = first.year * 12 + first.month - 1 + months
    return dt.date(index // 12, index % 12 + 1, 1)


def _changelist(site_name: str, **params: Any) -> str:
    from django_rpc_audit.admin import changelist_url

    return changelist_url(site_name, **params)


def _with_query(url: str, **params: Any) -> str:
    """``url`` with ``params`` as its query string (``None`` values left out), as
    :func:`~django_rpc_audit.admin.changelist_url` builds it."""
    query = {key: value for key, value in params.items() if value is not None}
    return f"{url}?{urlencode(query)}" if query else url
