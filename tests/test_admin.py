"""The read-only RPCLog admin: changelist, filters, search, detail view, permissions, queries."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from django_rpc_audit.admin import duration_speed, format_duration, highlight_json
from django_rpc_audit.models import RPCLog, RPCStatus
from tests.factories import RPCLogFactory, UserFactory, bulk_logs, staff_client

pytestmark = pytest.mark.django_db

CHANGELIST = "admin:django_rpc_audit_rpclog_changelist"


def results(response) -> list[RPCLog]:
    return list(response.context["cl"].result_list)


def change_url(log: RPCLog) -> str:
    return reverse("admin:django_rpc_audit_rpclog_change", args=[log.pk])


# -- changelist -------------------------------------------------------------------------------


def test_changelist_shows_calls_with_their_user_linked(admin_client_):
    user = UserFactory(username="alice")
    RPCLogFactory(
        method="send_notification",
        status="failed",
        user=user,
        duration_ms=12.5,
        caller_ip="203.0.113.7",
    )
    response = admin_client_.get(reverse(CHANGELIST))
    assert response.status_code == 200
    content = response.content.decode()
    assert "send_notification" in content
    assert "12.5 ms" in content
    assert "203.0.113.7" in content
    user_url = reverse("admin:auth_user_change", args=[user.pk])
    assert f'href="{user_url}"' in content
    assert ">alice</a>" in content


def test_the_calls_of_a_deleted_user_show_and_find_their_username(admin_client_):
    """Rows keep the username the user had; the user itself is gone (the key is unset)."""
    RPCLogFactory(method="by.ghost", user=None, username="ghost")
    RPCLogFactory(method="anonymous")
    response = admin_client_.get(reverse(CHANGELIST))
    assert "ghost <span class='text-subtle'>(deleted)</span>" in response.content.decode()
    found = results(admin_client_.get(reverse(CHANGELIST), {"q": "ghost"}))
    assert [log.method for log in found] == ["by.ghost"]


def test_status_badges_are_colour_coded(admin_client_):
    for status in RPCStatus.values:
        RPCLogFactory(status=status, method=f"m.{status}")
    content = admin_client_.get(reverse(CHANGELIST)).content.decode()
    # Unfold's label colours: success green, failed red, timeout orange, pending blue,
    # rate limited in the primary colour.
    for colour, text in (
        ("bg-green-100", "Success"),
        ("bg-red-100", "Failed"),
        ("bg-orange-100", "Timeout"),
        ("bg-blue-100", "Pending"),
        ("bg-primary-100", "Rate limited"),
    ):
        assert colour in content
        assert text in content
    start = content.index("m.rate_limited")
    row = content[content.rindex("<tr", 0, start) : content.index("</tr>", start)]
    assert "bg-primary-100" in row
    assert "Rate limited" in row


@pytest.mark.parametrize(
    ("duration_ms", "speed", "colour"),
    [
        (120.0, "fast", "bg-green-100"),
        (800.0, "warn", "bg-orange-100"),
        (5000.0, "slow", "bg-red-100"),
    ],
)
def test_duration_is_colour_coded_by_the_thresholds(admin_client_, duration_ms, speed, colour):
    RPCLogFactory(duration_ms=duration_ms, status="pending")  # pending: blue status badge
    assert duration_speed(duration_ms) == speed
    content = admin_client_.get(reverse(CHANGELIST)).content.decode()
    label = format_duration(duration_ms)
    start = content.index(label)
    assert colour in content[start - 400 : start]


def test_duration_thresholds_come_from_the_settings(rpc_settings):
    assert duration_speed(800.0) == "warn"
    rpc_settings(ADMIN_DURATION_WARN_MS=1000, ADMIN_DURATION_SLOW_MS=3000)
    assert duration_speed(800.0) == "fast"
    assert duration_speed(2000.0) == "warn"
    assert duration_speed(3000.0) == "slow"
    assert duration_speed(None) == "fast"


def test_changelist_filters_by_status(admin_client_):
    RPCLogFactory(method="ok.method", status="success")
    broken = RPCLogFactory(method="broken.method", status="failed")
    url = reverse(CHANGELIST)
    assert results(admin_client_.get(url, {"status__exact": "failed"})) == [broken]


def test_changelist_filters_rate_limited_calls(admin_client_):
    RPCLogFactory(method="ok.method", status="success")
    refused = RPCLogFactory(method="reports.daily", status="rate_limited", duration_ms=None)
    url = reverse(CHANGELIST)
    content = admin_client_.get(url).content.decode()
    assert "?status__exact=rate_limited" in content  # the status filter offers it
    assert results(admin_client_.get(url, {"status__exact": "rate_limited"})) == [refused]


def test_detail_of_a_rate_limited_call_shows_why(admin_client_):
    log = RPCLogFactory(
        status="rate_limited",
        error_code="rate_limited",
        error_message="Rate limit 10/minute of 'm' reached; a call can succeed in 4.200 s.",
        duration_ms=None,
    )
    content = admin_client_.get(change_url(log)).content.decode()
    assert "data-error-box" in content
    assert "Rate limit 10/minute" in content


def test_method_filter_choices_come_from_recent_calls(admin_client_):
    old = timezone.now() - timedelta(days=30)
    RPCLogFactory(method="ancient.method", created_at=old)
    for _ in range(3):
        RPCLogFactory(method="recent.method")
    wanted = RPCLogFactory(method="other.method")
    url = reverse(CHANGELIST)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("django_rpc_audit.admin.FILTER_CHOICE_ROWS", 4)
        response = admin_client_.get(url)
    method_filter = next(f for f in response.context["cl"].filter_specs if f.title == "method")
    choices = [value for value, _ in method_filter.lookup_choices]
    assert choices == ["other.method", "recent.method"]
    assert results(admin_client_.get(url, {"method": "other.method"})) == [wanted]
    # A method outside the recent calls can still be filtered on (a link from elsewhere).
    assert [
        log.method for log in results(admin_client_.get(url, {"method": "ancient.method"}))
    ] == ["ancient.method"]


def test_user_filter(admin_client_):
    alice, bob = UserFactory(username="alice"), UserFactory(username="bob")
    mine = RPCLogFactory(user=alice)
    RPCLogFactory(user=bob)
    RPCLogFactory(user=None)
    response = admin_client_.get(reverse(CHANGELIST), {"user": alice.pk})
    assert results(response) == [mine]
    user_filter = next(f for f in response.context["cl"].filter_specs if f.title == "user")
    assert [label for _, label in user_filter.lookup_choices] == ["alice", "bob"]
    assert results(admin_client_.get(reverse(CHANGELIST), {"user": "not-a-number"})) == []


def test_date_filters(admin_client_):
    RPCLogFactory(method="last.month", created_at=timezone.now() - timedelta(days=40))
    today = RPCLogFactory(method="today")
    url = reverse(CHANGELIST)
    since = (timezone.now() - timedelta(days=7)).isoformat()
    assert results(admin_client_.get(url, {"created_at__gte": since})) == [today]
    year = today.created_at.year
    response = admin_client_.get(
        url, {"created_at__year": year, "created_at__month": today.created_at.month}
    )
    assert today in results(response)


@pytest.mark.parametrize(
    ("term", "expected"),
    [
        ("billing", "billing.charge"),
        ("carol", "by.carol"),
        ("carol@corp.example", "by.carol"),
        ("disk quota", "with.error"),
    ],
)
def test_search(admin_client_, term, expected):
    carol = UserFactory(username="carol", email="carol@corp.example")
    RPCLogFactory(method="billing.charge")
    RPCLogFactory(method="by.carol", user=carol)
    RPCLogFactory(method="with.error", status="failed", error_message="Disk quota exceeded")
    RPCLogFactory(method="unrelated")
    found = results(admin_client_.get(reverse(CHANGELIST), {"q": term}))
    assert [log.method for log in found] == [expected]


def test_search_by_correlation_id_is_exact(admin_client_):
    correlation_id = str(uuid.uuid4())
    wanted = RPCLogFactory(correlation_id=correlation_id)
    # Same id in another column: an exact correlation id lookup does not find it.
    RPCLogFactory(method="echo", error_message=f"retry of {correlation_id}")
    url = reverse(CHANGELIST)
    assert results(admin_client_.get(url, {"q": correlation_id})) == [wanted]
    with CaptureQueriesContext(connection) as queries:
        admin_client_.get(url, {"q": correlation_id.upper()})
    # The term shaped like an id becomes one indexed equality, no LIKE over the table.
    select = [q["sql"] for q in queries if "correlation_id" in q["sql"] and "ORDER BY" in q["sql"]]
    assert select
    assert all("LIKE" not in sql.upper() for sql in select)


@pytest.mark.parametrize(
    "spelling",
    [
        str.upper,
        lambda cid: cid.replace("-", ""),
        lambda cid: cid.replace("-", "").upper(),
        lambda cid: f"{{{cid}}}",
        lambda cid: f"urn:uuid:{cid}",
        lambda cid: f"  {cid.upper()}  ",
    ],
    ids=["upper", "no-dashes", "upper-no-dashes", "braces", "urn", "padded"],
)
def test_search_by_correlation_id_normalises_its_spelling(admin_client_, spelling):
    """Logs, terminals and other clients print UUIDs in other spellings: all find the call."""
    correlation_id = str(uuid.uuid4())
    wanted = RPCLogFactory(correlation_id=correlation_id)
    RPCLogFactory()
    found = results(admin_client_.get(reverse(CHANGELIST), {"q": spelling(correlation_id)}))
    assert found == [wanted]


def test_search_still_finds_a_correlation_id_stored_in_another_spelling(admin_client_):
    """Rows written before ids were normalised (manual logging) keep the spelling they had."""
    correlation_id = str(uuid.uuid4()).upper()
    wanted = RPCLogFactory(correlation_id=correlation_id)
    assert results(admin_client_.get(reverse(CHANGELIST), {"q": correlation_id})) == [wanted]


def test_the_correlation_id_filter_of_the_related_links_normalises_too(admin_client_):
    correlation_id = str(uuid.uuid4())
    wanted = RPCLogFactory(correlation_id=correlation_id)
    RPCLogFactory()
    changelist = reverse(CHANGELIST)
    for spelling in (correlation_id, correlation_id.upper(), correlation_id.replace("-", "")):
        response = admin_client_.get(changelist, {"correlation_id": spelling})
        assert response.status_code == 200
        assert results(response) == [wanted]


TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


def test_search_by_trace_id_is_exact_and_indexed(admin_client_):
    wanted = RPCLogFactory(method="traced", trace_id=TRACE_ID, span_id="00f067aa0ba902b7")
    sibling = RPCLogFactory(method="traced.too", trace_id=TRACE_ID, span_id="00f067aa0ba902b8")
    RPCLogFactory(method="other.trace", trace_id="0" * 31 + "1")
    # The id in another column is not a match: the lookup is exact.
    RPCLogFactory(method="mentions", error_message=f"see trace {TRACE_ID}")
    url = reverse(CHANGELIST)
    found = results(admin_client_.get(url, {"q": TRACE_ID}))
    assert {log.pk for log in found} == {wanted.pk, sibling.pk}
    with CaptureQueriesContext(connection) as queries:
        found = results(admin_client_.get(url, {"q": TRACE_ID.upper()}))
    assert {log.pk for log in found} == {wanted.pk, sibling.pk}
    select = [q["sql"] for q in queries if "trace_id" in q["sql"] and "ORDER BY" in q["sql"]]
    assert select
    assert all("LIKE" not in sql.upper() for sql in select)


def test_search_by_a_correlation_id_without_dashes_still_finds_it(admin_client_):
    # 32 hex digits may be a correlation id written without dashes (manual logging).
    wanted = RPCLogFactory(correlation_id=TRACE_ID)
    assert results(admin_client_.get(reverse(CHANGELIST), {"q": TRACE_ID})) == [wanted]


def test_detail_shows_the_trace_and_links_to_it(admin_client_, rpc_settings):
    rpc_settings(
        TRACE_URL_TEMPLATE='https://grafana.example.com/explore?left={"queries":[{"query":"{trace_id}"}]}'
    )
    log = RPCLogFactory(trace_id=TRACE_ID, span_id="00f067aa0ba902b7")
    RPCLogFactory(trace_id=TRACE_ID, method="sibling")

    content = admin_client_.get(change_url(log)).content.decode()

    assert f"data-trace-id>{TRACE_ID}</code>" in content
    assert "data-span-id>00f067aa0ba902b7</code>" in content
    # The template's own braces stay; only the placeholder is replaced; the URL is escaped.
    assert (
        'href="https://grafana.example.com/explore?left={&quot;queries&quot;:[{&quot;query'
        f'&quot;:&quot;{TRACE_ID}&quot;}}]}}"'
    ) in content
    trace_calls = f"{reverse(CHANGELIST)}?trace_id={TRACE_ID}"
    assert trace_calls in content
    assert len(results(admin_client_.get(trace_calls))) == 2


def test_detail_without_a_template_or_a_trace(admin_client_):
    traced = RPCLogFactory(trace_id=TRACE_ID, span_id="00f067aa0ba902b7")
    content = admin_client_.get(change_url(traced)).content.decode()
    assert "data-trace-id" in content
    assert "data-trace-url" not in content  # TRACE_URL_TEMPLATE is not set
    untraced = RPCLogFactory()
    assert "data-trace-id" not in admin_client_.get(change_url(untraced)).content.decode()


def test_changelist_query_count_does_not_grow_with_rows(admin_client_):
    url = reverse(CHANGELIST)
    users = [UserFactory(username=f"bulk{i}") for i in range(5)]

    def page_queries() -> list[str]:
        with CaptureQueriesContext(connection) as queries:
            response = admin_client_.get(url)
        assert response.status_code == 200
        return [q["sql"] for q in queries]

    bulk_logs(10, users, methods=7)
    small = page_queries()
    bulk_logs(990, users, methods=7)
    large = page_queries()
    assert len(small) == len(large)
    assert len(results(admin_client_.get(url))) == 50
    # The page never counts the table, and the user comes in the same query as the rows.
    assert not [sql for sql in large if "COUNT(" in sql.upper()]
    # Not even when asked for facet counts.
    with CaptureQueriesContext(connection) as queries:
        admin_client_.get(url, {"_facets": "True"})
    assert not [q["sql"] for q in queries if "COUNT(" in q["sql"].upper()]
    quote = connection.ops.quote_name
    user_table = f"FROM {quote('auth_user')} WHERE {quote('auth_user')}.{quote('id')} ="
    user_lookups = [sql for sql in large if user_table in sql]
    assert len(user_lookups) == 1  # the logged-in user, not one per row


def test_next_page_without_count(admin_client_):
    now = timezone.now()
    RPCLog.objects.bulk_create(
        RPCLog(
            correlation_id=str(i), method=f"page.m{i:03d}", created_at=now - timedelta(seconds=i)
        )
        for i in range(60)
    )
    url = reverse(CHANGELIST)
    second = results(admin_client_.get(url, {"p": 2}))
    assert [log.method for log in second] == [f"page.m{i:03d}" for i in range(50, 60)]


# -- permissions ------------------------------------------------------------------------------


def test_rows_cannot_be_added_or_changed(admin_client_):
    log = RPCLogFactory()
    add = admin_client_.get(reverse("admin:django_rpc_audit_rpclog_add"))
    assert add.status_code == 403
    detail = admin_client_.get(change_url(log))
    assert detail.status_code == 200  # viewable ...
    posted = admin_client_.post(change_url(log), {"method": "tampered"})
    assert posted.status_code == 403  # ... not editable
    log.refresh_from_db()
    assert log.method != "tampered"


def test_only_users_with_the_delete_permission_can_delete():
    log = RPCLogFactory()
    delete_url = reverse("admin:django_rpc_audit_rpclog_delete", args=[log.pk])
    viewer = staff_client("view_rpclog")
    assert viewer.post(delete_url, {"post": "yes"}).status_code == 403
    assert RPCLog.objects.filter(pk=log.pk).exists()
    deleter = staff_client("view_rpclog", "delete_rpclog")
    assert deleter.post(delete_url, {"post": "yes"}).status_code == 302
    assert not RPCLog.objects.filter(pk=log.pk).exists()


def test_changelist_needs_staff_and_view_permission():
    url = reverse(CHANGELIST)
    anonymous = Client().get(url)
    assert anonymous.status_code == 302
    assert reverse("admin:login") in anonymous["Location"]
    assert staff_client().get(url).status_code == 403
    assert staff_client("view_rpclog").get(url).status_code == 200


# -- detail view ------------------------------------------------------------------------------


def test_detail_escapes_params_and_response(admin_client_):
    log = RPCLogFactory(
        params={"comment": "<script>alert(1)</script>", "n": 3},
        response={"html": "<img src=x onerror=alert(2)>"},
    )
    content = admin_client_.get(change_url(log)).content.decode()
    assert "<script>alert(1)</script>" not in content
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in content
    assert "<img src=x" not in content
    assert "&lt;img src=x onerror=alert(2)&gt;" in content
    # Highlighted: the key, the string and the number each in their colour.
    assert (
        '<span class="text-primary-600 dark:text-primary-500">&quot;comment&quot;</span>' in content
    )
    assert '<span class="text-blue-700 dark:text-blue-400">3</span>' in content


def test_highlight_json_escapes_every_token():
    html = highlight_json({"<b>": ["</pre><script>x</script>", True, None, -1.5e3]})
    assert "<script>" not in html
    assert "<b>" not in html
    assert html.count("</pre>") == 1  # the value cannot close the block early
    assert html.endswith("</pre>")
    assert "&lt;/pre&gt;&lt;script&gt;x&lt;/script&gt;" in html
    assert '<span class="text-orange-700 dark:text-orange-400">true</span>' in html
    assert '<span class="text-orange-700 dark:text-orange-400">null</span>' in html
    assert '<span class="text-blue-700 dark:text-blue-400">-1500.0</span>' in html


def test_highlight_json_cuts_huge_values():
    html = highlight_json({"blob": "x" * 200_000})
    assert len(html) < 110_000
    assert "cut at 100,000 characters" in html


def test_detail_of_a_failed_call(admin_client_):
    user = UserFactory(username="dave")
    log = RPCLogFactory(
        status="failed",
        error_code="REMOTE_ERROR",
        error_message="boom <b>bad</b>",
        user=user,
        duration_ms=1500.0,
        created_at=timezone.now() - timedelta(seconds=2),
    )
    content = admin_client_.get(change_url(log)).content.decode()
    assert "data-error-box" in content
    assert "REMOTE_ERROR" in content
    assert "boom &lt;b&gt;bad&lt;/b&gt;" in content
    assert "1.50 s" in content  # the timeline's duration
    assert log.created_at.isoformat(sep=" ", timespec="milliseconds") in content
    assert f'data-copy="{log.correlation_id}"' in content
    assert reverse("admin:auth_user_change", args=[user.pk]) in content
    changelist = reverse(CHANGELIST)
    assert f"{changelist}?correlation_id={log.correlation_id}" in content
    assert f"{changelist}?user={user.pk}" in content


def test_detail_of_a_successful_call_has_no_error_box(admin_client_):
    log = RPCLogFactory(status="success", response={"ok": True})
    content = admin_client_.get(change_url(log)).content.decode()
    assert "data-error-box" not in content
    assert "Calls by this user" not in content  # no user


def test_related_links_find_the_related_calls(admin_client_):
    user = UserFactory(username="erin")
    first = RPCLogFactory(correlation_id="shared-id", user=user, method="a")
    second = RPCLogFactory(correlation_id="shared-id", method="b")
    RPCLogFactory(correlation_id="other-id", user=user, method="c")
    changelist = reverse(CHANGELIST)
    same_id = results(admin_client_.get(f"{changelist}?correlation_id=shared-id"))
    assert {log.pk for log in same_id} == {first.pk, second.pk}
    by_user = results(admin_client_.get(f"{changelist}?user={user.pk}"))
    assert {log.method for log in by_user} == {"a", "c"}


# -- date hierarchy -----------------------------------------------------------------------------


def test_date_hierarchy_lists_the_periods_between_first_and_last_call():
    from datetime import datetime

    from django_rpc_audit.admin import ChangeListQuerySet

    utc = timezone.get_current_timezone()
    for when in (datetime(2025, 11, 30, 23, tzinfo=utc), datetime(2026, 2, 2, 8, tzinfo=utc)):
        RPCLogFactory(created_at=when)
    queryset = ChangeListQuerySet(model=RPCLog)
    assert [d.year for d in queryset.datetimes("created_at", "year")] == [2025, 2026]
    assert [(d.year, d.month) for d in queryset.datetimes("created_at", "month")] == [
        (2025, 11),
        (2025, 12),
        (2026, 1),
        (2026, 2),
    ]
    days = queryset.filter(created_at__month=2).datetimes("created_at", "day")
    assert [(d.month, d.day) for d in days] == [(2, 2)]
    assert ChangeListQuerySet(model=RPCLog).none().datetimes("created_at", "day") == []
    descending = queryset.datetimes("created_at", "year", order="DESC")
    assert [d.year for d in descending] == [2026, 2025]


def test_date_hierarchy_reads_no_distinct_dates(admin_client_):
    # Two calls on one day: the hierarchy opens at that month's days.
    now = timezone.localtime().replace(hour=12)
    RPCLogFactory(created_at=now - timedelta(hours=1))
    RPCLogFactory(created_at=now)
    with CaptureQueriesContext(connection) as queries:
        response = admin_client_.get(reverse(CHANGELIST))
    assert not [q["sql"] for q in queries if "DISTINCT" in q["sql"].upper()]
    content = response.content.decode()
    assert f"created_at__day={now.day}" in content


# -- settings -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "key"),
    [
        ({"ADMIN_DURATION_WARN_MS": 0}, "ADMIN_DURATION_WARN_MS"),
        ({"ADMIN_DURATION_SLOW_MS": "fast"}, "ADMIN_DURATION_SLOW_MS"),
        ({"ADMIN_DURATION_WARN_MS": True}, "ADMIN_DURATION_WARN_MS"),
        (
            {"ADMIN_DURATION_WARN_MS": 3000, "ADMIN_DURATION_SLOW_MS": 2000},
            "ADMIN_DURATION_WARN_MS",
        ),
        ({"ADMIN_DASHBOARD_REFRESH_SECONDS": -1}, "ADMIN_DASHBOARD_REFRESH_SECONDS"),
        ({"ADMIN_DASHBOARD_REFRESH_SECONDS": 2.5}, "ADMIN_DASHBOARD_REFRESH_SECONDS"),
    ],
)
def test_invalid_admin_settings_name_their_key(values, key):
    from django.core.exceptions import ImproperlyConfigured

    from django_rpc_audit.conf import DjangoCfgRPCConfig

    with pytest.raises(ImproperlyConfigured, match=key):
        DjangoCfgRPCConfig.from_mapping(values)


def test_admin_settings_from_the_environment(rpc_env):
    from django_rpc_audit.conf import get_config

    rpc_env("ADMIN_DURATION_WARN_MS", "250")
    rpc_env("ADMIN_DASHBOARD_REFRESH_SECONDS", "0")
    config = get_config()
    assert config.admin_duration_warn_ms == 250.0
    assert config.admin_dashboard_refresh_seconds == 0
    assert duration_speed(300.0) == "warn"


def test_date_range_filter_when_unfold_filters_are_installed(rf, monkeypatch):
    from django.apps import apps
    from django.contrib.admin import DateFieldListFilter, site
    from unfold.contrib.filters.admin import RangeDateTimeFilter

    model_admin = site._registry[RPCLog]
    request = rf.get("/")
    assert ("created_at", DateFieldListFilter) in model_admin.get_list_filter(request)
    installed = apps.is_installed
    monkeypatch.setattr(
        apps, "is_installed", lambda name: name == "unfold.contrib.filters" or installed(name)
    )
    assert ("created_at", RangeDateTimeFilter) in model_admin.get_list_filter(request)
