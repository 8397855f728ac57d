"""Read-only django-unfold admin for ``RPCLog``: an audit trail is looked at, not edited.

Built to stay fast on tables of millions of rows: no ``COUNT(*)`` per page (an infinite
paginator), filter choices read from the latest calls only (never a ``SELECT DISTINCT`` over
the table), the user joined in the page's one query, and a search that looks a correlation id
up by its index.
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timedelta
from typing import Any

from django.apps import apps
from django.contrib import admin
from django.core.exceptions import ValidationError
from django.db.models import Max, Min, Model, Q, QuerySet
from django.http import HttpRequest, HttpResponse
from django.template.loader import render_to_string
from django.urls import NoReverseMatch, URLPattern, path, reverse
from django.utils import timezone
from django.utils.html import escape, format_html, format_html_join
from django.utils.http import urlencode
from django.utils.safestring import SafeString, mark_safe
from django.utils.translation import gettext_lazy as _
from unfold.admin import ModelAdmin
from unfold.decorators import display
from unfold.paginator import InfinitePaginator

from django_rpc_audit.conf import get_config
from django_rpc_audit.models import RPCLog, RPCStatus
from django_rpc_audit.querysets import RPCLogQuerySet
from django_rpc_audit.utils import canonical_correlation_id

#: How many of the latest calls the method and user filters read their choices from.
FILTER_CHOICE_ROWS = 10_000
#: JSON longer than this (characters) is cut in the detail view; the row keeps all of it.
JSON_DISPLAY_LIMIT = 100_000
#: The Unfold label colour of each status, in the list's badge and the detail view's label.
STATUS_VARIANTS: dict[str, str] = {
    RPCStatus.SUCCESS: "success",
    RPCStatus.FAILED: "danger",
    RPCStatus.TIMEOUT: "warning",
    RPCStatus.PENDING: "info",
    RPCStatus.RATE_LIMITED: "primary",
}

# An OpenTelemetry trace id (32 hex digits, as Grafana, Tempo and Jaeger show it).
_TRACE_ID = re.compile(r"^[0-9a-fA-F]{32}$")

# Possessive, and a string may run to the end of the text (cut at JSON_DISPLAY_LIMIT): an
# unterminated string is one token, not a fresh scan from each quote inside it (quadratic).
_JSON_TOKEN = re.compile(
    r'(?P<key>"(?:\\.|[^"\\])*+")(?=\s*:)'
    r'|(?P<string>"(?:\\.|[^"\\])*+(?:"|\\?\Z))'
    r"|(?P<number>-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)"
    r"|(?P<literal>\btrue\b|\bfalse\b|\bnull\b)"
)
_JSON_CLASSES = {
    "key": "text-primary-600 dark:text-primary-500",
    "string": "text-green-700 dark:text-green-400",
    "number": "text-blue-700 dark:text-blue-400",
    "literal": "text-orange-700 dark:text-orange-400",
}
_MONO = "font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace;"


def highlight_json(value: Any) -> SafeString:
    """``value`` as indented JSON in a ``<pre>``, coloured by token, every character escaped."""
    text = json.dumps(value, indent=2, ensure_ascii=False, default=str)
    truncated = len(text) > JSON_DISPLAY_LIMIT
    if truncated:
        text = text[:JSON_DISPLAY_LIMIT]
    parts: list[str] = []
    position = 0
    for match in _JSON_TOKEN.finditer(text):
        parts.append(escape(text[position : match.start()]))
        kind = match.lastgroup or "string"
        parts.append(f'<span class="{_JSON_CLASSES[kind]}">{escape(match.group())}</span>')
        position = match.end()
    parts.append(escape(text[position:]))
    if truncated:
        parts.append(escape(f"\n… (cut at {JSON_DISPLAY_LIMIT:,} characters)"))
    # Every piece of the value went through escape() above.
    return mark_safe(  # noqa: S308
        '<pre class="bg-base-50 border border-base-200 dark:bg-base-800 dark:border-base-700 '
        'overflow-x-auto p-3 rounded-default text-xs w-full" '
        f'style="white-space: pre; {_MONO}" data-json>{"".join(parts)}</pre>'
    )


def format_duration(duration_ms: float | None) -> str:
    """A duration in the unit that reads best: µs, ms or s; ``-`` when there is none."""
    if duration_ms is None:
        return "-"
    if duration_ms < 1:
        return f"{duration_ms * 1000:.0f} µs"
    if duration_ms < 1000:
        return f"{duration_ms:.1f} ms"
    return f"{duration_ms / 1000:.2f} s"


def duration_speed(duration_ms: float | None) -> str:
    """``"fast"``, ``"warn"`` or ``"slow"`` by the ``ADMIN_DURATION_*_MS`` thresholds."""
    config = get_config()
    if duration_ms is None or duration_ms < config.admin_duration_warn_ms:
        return "fast"
    if duration_ms < config.admin_duration_slow_ms:
        return "warn"
    return "slow"


def user_admin_url(user: Model, site_name: str = "admin") -> str | None:
    """The change page of ``user`` in the admin site ``site_name``; ``None`` if it has none."""
    meta = user._meta
    try:
        return reverse(
            f"{site_name}:{meta.app_label}_{meta.model_name}_change",
            args=[user.pk],
            current_app=site_name,
        )
    except NoReverseMatch:
        return None


def trace_url(trace_id: str, span_id: str = "") -> str | None:
    """The ``TRACE_URL_TEMPLATE`` link to a trace; ``None`` without a template or a trace."""
    template = get_config().trace_url_template
    if not template or not trace_id:
        return None
    return template.replace("{trace_id}", trace_id).replace("{span_id}", span_id)


def changelist_url(site_name: str = "admin", **params: Any) -> str:
    """The ``RPCLog`` changelist, filtered by ``params`` (query string parameters)."""
    url = reverse(f"{site_name}:django_rpc_audit_rpclog_changelist", current_app=site_name)
    query = {key: value for key, value in params.items() if value is not None}
    return f"{url}?{urlencode(query)}" if query else url


class ChangeListQuerySet(RPCLogQuerySet):
    """The admin's QuerySet, whose ``datetimes()`` reads two index entries, not every row.

    The date hierarchy is its only caller. Django's version is a ``SELECT DISTINCT`` of the
    truncated date over every matching row, a scan of the whole table on each page; this one
    lists every year / month / day between the first and the last matching call (``MIN`` and
    ``MAX``, answered by the index). On a log table every period in between has calls; one that
    has none leads to an empty page.
    """

    def datetimes(  # type: ignore[override]
        self, field_name: str, kind: str, order: str = "ASC", tzinfo: Any = None
    ) -> list[datetime]:
        if kind not in ("year", "month", "day") or tzinfo is not None:
            return list(super().datetimes(field_name, kind, order, tzinfo))  # type: ignore[arg-type]
        bounds = self.order_by().aggregate(first=Min(field_name), last=Max(field_name))
        if bounds["first"] is None:
            return []
        first, last = (
            timezone.localtime(value) if timezone.is_aware(value) else value
            for value in (bounds["first"], bounds["last"])
        )
        periods: list[datetime] = []
        current = _period_start(first, kind)
        while current <= last:
            periods.append(current)
            current = _next_period(current, kind)
        return periods[::-1] if order == "DESC" else periods


def _period_start(value: datetime, kind: str) -> datetime:
    value = value.replace(hour=0, minute=0, second=0, microsecond=0)
    if kind in ("year", "month"):
        value = value.replace(day=1)
    if kind == "year":
        value = value.replace(month=1)
    return value


def _next_period(value: datetime, kind: str) -> datetime:
    if kind == "day":
        following = value.replace(tzinfo=None) + timedelta(days=1)
    elif kind == "month":
        following = value.replace(
            tzinfo=None, year=value.year + value.month // 12, month=value.month % 12 + 1
        )
    else:
        following = value.replace(tzinfo=None, year=value.year + 1)
    if value.tzinfo is not None:
        # Through make_aware, so a period after a DST change keeps midnight local time.
        return timezone.make_aware(following, value.tzinfo)
    return following


class MethodFilter(admin.SimpleListFilter):
    """By method; the choices are the methods of the latest calls, not a scan of the table."""

    title = _("method")
    parameter_name = "method"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        methods = set(RPCLog.objects.recent_methods(rows=FILTER_CHOICE_ROWS))
        if self.value():
            methods.add(str(self.value()))
        return [(method, method) for method in sorted(methods)]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        if self.value():
            return queryset.filter(method=self.value())
        return queryset


class UserFilter(admin.SimpleListFilter):
    """By user; the choices are the users of the latest calls, not every account."""

    title = _("user")
    parameter_name = "user"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        from django.contrib.auth import get_user_model

        ids = set(RPCLog.objects.recent_user_ids(rows=FILTER_CHOICE_ROWS))
        selected = self.user_pk()
        if selected is not None:
            ids.add(selected)
        user_model = get_user_model()
        users = user_model._default_manager.filter(pk__in=ids).order_by(user_model.USERNAME_FIELD)
        return [(str(user.pk), user.get_username()) for user in users]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        if not self.value():
            return queryset
        selected = self.user_pk()
        return queryset.none() if selected is None else queryset.filter(user_id=selected)

    def user_pk(self) -> Any:
        """The selected user's primary key; ``None`` if none is, or the value is not one."""
        from django.contrib.auth import get_user_model

        if not self.value():
            return None
        try:
            return get_user_model()._meta.pk.to_python(self.value())
        except ValidationError:
            return None


def correlation_id_spellings(value: str) -> list[str]:
    """The stored spellings a correlation id ``value`` may have: as given, and canonical.

    Calls are logged with the client's spelling (lower case, dashes); rows that manual logging
    wrote before it normalised ids keep the spelling they were given.
    """
    value = value.strip()
    canonical = canonical_correlation_id(value)
    return sorted({value, canonical}) if canonical else [value]


class CorrelationIdFilter(admin.SimpleListFilter):
    """``?correlation_id=...`` (the detail page's related-calls link), in any UUID spelling.

    Shown only while it is in use (it has no choices to offer otherwise); an exact, indexed
    lookup either way.
    """

    title = _("correlation id")
    parameter_name = "correlation_id"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        value = self.value()
        return [(str(value), str(value))] if value else []

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        value = self.value()
        if not value:
            return queryset
        return queryset.filter(correlation_id__in=correlation_id_spellings(str(value)))


class RPCLogDisplayMixin:
    """Display methods for ``RPCLog`` columns, reusable when a project registers its own admin."""

    admin_site: admin.AdminSite

    @display(
        description=_("status"),
        ordering="status",
        label=STATUS_VARIANTS,
    )
    def status_badge(self, obj: RPCLog) -> Any:
        return obj.status, obj.get_status_display()

    @display(
        description=_("duration"),
        ordering="duration_ms",
        label={"fast": "success", "warn": "warning", "slow": "danger"},
    )
    def duration(self, obj: RPCLog) -> Any:
        if obj.duration_ms is None:
            return "-"
        return duration_speed(obj.duration_ms), format_duration(obj.duration_ms)

    @display(description=_("user"), ordering="user")
    def user_link(self, obj: RPCLog) -> str:
        if obj.user is None:
            if obj.username:
                # The username it had when the call was made; the user is gone since.
                return format_html(
                    "{} <span class='text-subtle'>({})</span>", obj.username, _("deleted")
                )
            return "-"
        url = user_admin_url(obj.user, self.admin_site.name)
        if url is None:
            return obj.user.get_username()
        return format_html(
            '<a href="{}" class="text-primary-600 dark:text-primary-500">{}</a>',
            url,
            obj.user.get_username(),
        )


@admin.register(RPCLog)
class RPCLogAdmin(RPCLogDisplayMixin, ModelAdmin):  # type: ignore[misc]
    """The changelist, the detail view and the analytics dashboard of the RPC calls.

    Nobody adds or changes rows here. Deleting one (from its detail page) is left to users with
    the ``delete_rpclog`` permission, superusers included; there is no bulk delete action.
    """

    list_display = ("status_badge", "method", "duration", "user_link", "caller_ip", "created_at")
    list_display_links = ("status_badge", "method")
    list_filter = (
        "status",
        "is_slow",
        MethodFilter,
        ("created_at", admin.DateFieldListFilter),
        UserFilter,
        CorrelationIdFilter,
    )
    search_fields = ("method", "user__username", "username", "user__email", "error_message")
    search_help_text = _(
        "Method, username, email or error message; a correlation id or trace id is looked up "
        "exactly."
    )
    list_select_related = ("user",)
    date_hierarchy = "created_at"
    show_full_result_count = False
    # Facet counts are one COUNT per filter choice over the table: never offered.
    show_facets = admin.ShowFacets.NEVER
    paginator = InfinitePaginator
    list_per_page = 50
    ordering = ("-created_at",)
    actions = None
    list_before_template = "django_rpc_audit/admin/changelist_before.html"
    readonly_fields = (
        "status_label",
        "method",
        "correlation_id_copy",
        "related_calls",
        "trace",
        "error_box",
        "timeline",
        "user_link",
        "caller_ip",
        "user_agent",
        "params_json",
        "response_json",
    )

    # -- permissions: read-only -----------------------------------------------------------------

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: RPCLog | None = None) -> bool:
        return False

    # -- changelist -----------------------------------------------------------------------------

    def get_queryset(self, request: HttpRequest) -> QuerySet[Any]:
        queryset = super().get_queryset(request)
        return ChangeListQuerySet(
            model=queryset.model, query=queryset.query, using=queryset._db, hints=queryset._hints
        )

    def get_list_filter(self, request: HttpRequest) -> Any:
        if apps.is_installed("unfold.contrib.filters"):
            # A from/to date range when the project has Unfold's filters app.
            from unfold.contrib.filters.admin import RangeDateTimeFilter

            return (
                "status",
                "is_slow",
                MethodFilter,
                ("created_at", RangeDateTimeFilter),
                UserFilter,
                CorrelationIdFilter,
            )
        return self.list_filter

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet[Any], search_term: str
    ) -> tuple[QuerySet[Any], bool]:
        term = search_term.strip()
        if _TRACE_ID.match(term):
            # 32 hex digits: a trace id, or a correlation id written without its dashes.
            spellings = correlation_id_spellings(term)
            return queryset.filter(
                Q(trace_id=term.lower()) | Q(correlation_id__in=spellings)
            ), False
        if canonical_correlation_id(term) is not None:
            return queryset.filter(correlation_id__in=correlation_id_spellings(term)), False
        return super().get_search_results(request, queryset, search_term)  # type: ignore[no-any-return]

    def get_search_fields(self, request: HttpRequest) -> Any:
        from django.contrib.auth import get_user_model

        user_model = get_user_model()
        # ``username``: the snapshot, which finds the calls of deleted users too.
        fields = ["method", f"user__{user_model.USERNAME_FIELD}", "username", "error_message"]
        if any(f.name == "email" for f in user_model._meta.get_fields()):
            fields.insert(2, "user__email")
        return fields

    def changelist_view(
        self, request: HttpRequest, extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        extra_context = {
            **(extra_context or {}),
            "rpc_dashboard_url": reverse(
                f"{self.admin_site.name}:django_rpc_audit_rpclog_dashboard",
                current_app=self.admin_site.name,
            ),
            "rpc_usage_url": reverse(
                f"{self.admin_site.name}:django_rpc_audit_rpclog_usage",
                current_app=self.admin_site.name,
            ),
        }
        return super().changelist_view(request, extra_context)  # type: ignore[no-any-return]

    # -- detail view ----------------------------------------------------------------------------

    def get_fieldsets(self, request: HttpRequest, obj: RPCLog | None = None) -> Any:
        call: tuple[str, ...] = (
            "status_label",
            "method",
            "timeline",
            "correlation_id_copy",
            "related_calls",
        )
        if obj is not None and obj.status in (
            RPCStatus.FAILED,
            RPCStatus.TIMEOUT,
            RPCStatus.RATE_LIMITED,
        ):
            call = (*call[:2], "error_box", *call[2:])
        if obj is not None and obj.trace_id:
            call = (*call, "trace")
        if obj is not None and obj.cost is not None:
            call = (*call, "cost")
        return [
            (None, {"fields": call}),
            (_("Caller"), {"fields": ("user_link", "caller_ip", "user_agent")}),
            (_("Payload"), {"fields": ("params_json", "response_json")}),
        ]

    @display(description=_("status"))
    def status_label(self, obj: RPCLog) -> str:
        return render_to_string(
            "unfold/helpers/label.html",
            {"text": obj.get_status_display(), "variant": STATUS_VARIANTS.get(obj.status, "")},
        )

    @display(description=_("correlation id"))
    def correlation_id_copy(self, obj: RPCLog) -> str:
        return format_html(
            '<span class="flex flex-row gap-2 items-center">'
            '<code style="user-select: all; {}" data-correlation-id>{}</code>'
            '<button type="button" class="border border-base-200 px-2 py-0.5 rounded-default '
            'text-xs hover:text-primary-600 dark:border-base-700" '
            'title="{}" data-copy="{}" '
            'onclick="navigator.clipboard.writeText(this.dataset.copy).then(() => '
            '{{ this.textContent = this.dataset.done; }})" data-done="{}">{}</button></span>',
            _MONO,
            obj.correlation_id,
            _("Copy to the clipboard"),
            obj.correlation_id,
            _("Copied"),
            _("Copy"),
        )

    @display(description=_("related calls"))
    def related_calls(self, obj: RPCLog) -> str:
        site = self.admin_site.name
        links = [
            (
                changelist_url(site, correlation_id=obj.correlation_id),
                _("Calls with this correlation id"),
            ),
            (changelist_url(site, method=obj.method), _("Calls of this method")),
        ]
        if obj.user_id is not None:
            links.append((changelist_url(site, user=obj.user_id), _("Calls by this user")))
        return format_html_join(
            " · ",
            '<a href="{}" class="text-primary-600 dark:text-primary-500">{}</a>',
            links,
        )

    @display(description=_("trace"))
    def trace(self, obj: RPCLog) -> str:
        if not obj.trace_id:
            return "-"
        url = trace_url(obj.trace_id, obj.span_id)
        external = (
            format_html(
                ' · <a href="{}" class="text-primary-600 dark:text-primary-500" target="_blank" '
                'rel="noopener noreferrer" data-trace-url>{}</a>',
                url,
                _("Open the trace"),
            )
            if url is not None
            else ""
        )
        return format_html(
            '<span class="flex flex-row flex-wrap gap-2 items-center">'
            '<code style="user-select: all; {}" data-trace-id>{}</code>'
            '<span class="text-subtle">{}</span><code style="{}" data-span-id>{}</code>'
            ' · <a href="{}" class="text-primary-600 dark:text-primary-500">{}</a>{}</span>',
            _MONO,
            obj.trace_id,
            _("span"),
            _MONO,
            obj.span_id or "-",
            changelist_url(self.admin_site.name, trace_id=obj.trace_id),
            _("Calls of this trace"),
            external,
        )

    @display(description=_("error"))
    def error_box(self, obj: RPCLog) -> str:
        return format_html(
            '<div class="bg-red-50 border border-red-200 dark:bg-red-500/20 dark:border-red-500/30 '
            'p-3 rounded-default text-red-700 dark:text-red-400 w-full" data-error-box>'
            '<div class="font-semibold">{}</div>'
            '<div style="white-space: pre-wrap; {}">{}</div></div>',
            obj.error_code or obj.get_status_display(),
            _MONO,
            obj.error_message or "-",
        )

    @display(description=_("timeline"))
    def timeline(self, obj: RPCLog) -> str:
        completed = (
            format_html("{}", obj.completed_at.isoformat(sep=" ", timespec="milliseconds"))
            if obj.completed_at
            else _("not completed")
        )
        return format_html(
            '<div class="flex flex-row flex-wrap gap-2 items-center">'
            '<span><span class="text-subtle">{}</span> {}</span>'
            '<span class="text-subtle">→</span>'
            '<span class="bg-base-100 dark:bg-base-800 font-semibold px-2 py-0.5 '
            'rounded-default">{}</span>'
            '<span class="text-subtle">→</span>'
            '<span><span class="text-subtle">{}</span> {}</span></div>',
            _("created"),
            obj.created_at.isoformat(sep=" ", timespec="milliseconds"),
            format_duration(obj.duration_ms),
            _("completed"),
            completed,
        )

    @display(description=_("params"))
    def params_json(self, obj: RPCLog) -> str:
        return highlight_json(obj.params)

    @display(description=_("response"))
    def response_json(self, obj: RPCLog) -> str:
        if obj.response is None:
            return "-"
        return highlight_json(obj.response)

    # -- dashboard ------------------------------------------------------------------------------

    def get_urls(self) -> list[URLPattern]:
        from django_rpc_audit.dashboard import dashboard_view
        from django_rpc_audit.usage_page import usage_view

        def view(request: HttpRequest) -> HttpResponse:
            return dashboard_view(request, self)

        def usage_page(request: HttpRequest) -> HttpResponse:
            return usage_view(request, self)

        # Before the model's own URLs, whose "<path:object_id>/" would swallow this one.
        return [
            path(
                "dashboard/",
                self.admin_site.admin_view(view),
                name="django_rpc_audit_rpclog_dashboard",
            ),
            path(
                "usage/",
                self.admin_site.admin_view(usage_page),
                name="django_rpc_audit_rpclog_usage",
            ),
            *super().get_urls(),
        ]


# The alerts' admin (webhook deliveries, endpoints) registers itself on import.
from django_rpc_audit.alerts import admin as _alerts_admin  # noqa: E402, F401
