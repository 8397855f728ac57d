"""Usage reports: the Python API, the command, the admin's Usage page and its CSV."""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from io import StringIO
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.urls import reverse

from django_rpc_audit.models import RPCLog, RPCRollupBucket, RPCStatus
from django_rpc_audit.rollups.maintain import roll_up
from django_rpc_audit.usage import (
    UsageLine,
    closed_until,
    cloud_events,
    month_range,
    to_csv,
    total,
    usage,
)
from tests.factories import RPCLogFactory, UserFactory, staff_client

pytestmark = pytest.mark.django_db

USAGE = "admin:django_rpc_audit_rpclog_usage"
NOVEMBER = datetime(2026, 11, 1, tzinfo=UTC)


@pytest.fixture
def november() -> dict[str, Any]:
    """Calls in November 2026 (and one each side) by alice, bob and nobody, rolled up."""
    alice, bob = UserFactory(username="alice"), UserFactory(username="bob")
    for day in (1, 15, 30):
        RPCLogFactory.create_batch(
            2,
            method="reports.generate",
            user=alice,
            username="alice",
            cost=Decimal("5.00"),
            created_at=NOVEMBER + timedelta(days=day - 1, hours=23, minutes=59),
        )
    RPCLogFactory.create_batch(
        3,
        method="notify.sms",
        user=alice,
        username="alice",
        cost=Decimal("0.01"),
        created_at=NOVEMBER + timedelta(days=2),
    )
    RPCLogFactory.create_batch(
        5,
        method="system.ping",
        user=bob,
        username="bob",
        sample_rate=0.1,
        created_at=NOVEMBER + timedelta(days=3),
    )
    RPCLogFactory(
        method="reports.generate",
        user=bob,
        username="bob",
        status=RPCStatus.FAILED,
        created_at=NOVEMBER + timedelta(days=3),
    )
    RPCLogFactory(
        method="notify.sms", cost=Decimal("0.02"), created_at=NOVEMBER + timedelta(days=4)
    )
    # Outside the month: the last hour of October, the first of December.
    RPCLogFactory(
        method="reports.generate",
        user=alice,
        username="alice",
        cost=Decimal("5"),
        created_at=NOVEMBER - timedelta(minutes=1),
    )
    RPCLogFactory(
        method="reports.generate",
        user=alice,
        username="alice",
        cost=Decimal("5"),
        created_at=datetime(2026, 12, 1, tzinfo=UTC),
    )
    roll_up()
    return {"alice": alice, "bob": bob}


def test_month_range_is_utc_months() -> None:
    assert month_range("2026-11") == (NOVEMBER, datetime(2026, 12, 1, tzinfo=UTC))
    assert month_range(date(2026, 12, 31)) == (
        datetime(2026, 12, 1, tzinfo=UTC),
        datetime(2027, 1, 1, tzinfo=UTC),
    )
    with pytest.raises(ValueError, match="YYYY-MM"):
        month_range("November")


def test_usage_per_user_per_month_is_exact(november: dict[str, Any]) -> None:
    lines = usage(*month_range("2026-11"), by=("user",))
    assert [(line.username, line.calls, line.billed_calls, line.cost) for line in lines] == [
        ("alice", 9, 9, Decimal("30.03")),
        ("", 1, 1, Decimal("0.02")),
        ("bob", 51, 0, Decimal("0")),
    ]
    assert lines[0].user_id == november["alice"].pk
    assert lines[2].failed_calls == 1
    assert total(lines).cost == Decimal("30.05")


def test_usage_per_method_per_day(november: dict[str, Any]) -> None:
    lines = usage(*month_range("2026-11"), by=("method",), period="day", billed_only=True)
    assert [(line.period, line.method, line.billed_calls, line.cost) for line in lines] == [
        (date(2026, 11, 1), "reports.generate", 2, Decimal("10.00")),
        (date(2026, 11, 3), "notify.sms", 3, Decimal("0.03")),
        (date(2026, 11, 5), "notify.sms", 1, Decimal("0.02")),
        (date(2026, 11, 15), "reports.generate", 2, Decimal("10.00")),
        (date(2026, 11, 30), "reports.generate", 2, Decimal("10.00")),
    ]
    assert all(line.username is None and line.user_id is None for line in lines)


def test_usage_narrowed_to_a_user_and_a_method(november: dict[str, Any]) -> None:
    (line,) = usage(
        *month_range("2026-11"), user=november["alice"], method="notify.sms", period="month"
    )
    assert (line.period, line.method, line.billed_calls, line.cost) == (
        date(2026, 11, 1),
        "notify.sms",
        3,
        Decimal("0.03"),
    )


def test_usage_refuses_what_it_cannot_report() -> None:
    start, end = month_range("2026-11")
    with pytest.raises(ValueError, match="'user' and/or 'method'"):
        usage(start, end, by=("ip",))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="period"):
        usage(start, end, period="week")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="before start"):
        usage(end, start)


def test_csv_keeps_every_place_and_defuses_formulas() -> None:
    line = UsageLine(
        period=date(2026, 11, 1),
        user_id=7,
        username="=HYPERLINK()",
        method="m",
        calls=3,
        failed_calls=0,
        billed_calls=3,
        cost=Decimal("0.000125"),
    )
    rows = list(csv.reader(io.StringIO(to_csv([line]))))
    assert rows == [
        [
            "period",
            "user_id",
            "username",
            "method",
            "calls",
            "failed_calls",
            "billed_calls",
            "cost",
        ],
        ["2026-11-01", "7", "'=HYPERLINK()", "m", "3", "0", "3", "0.000125"],
    ]


def run(*args: str, **options: Any) -> str:
    out = StringIO()
    call_command(*args, stdout=out, **options)
    return out.getvalue()


def test_the_command_prints_a_month_as_csv(november: dict[str, Any]) -> None:
    rows = list(
        csv.DictReader(
            io.StringIO(run("rpc_usage_report", "--month", "2026-11", "--format", "csv"))
        )
    )
    by_key = {(row["username"], row["method"]): row for row in rows}
    assert by_key[("alice", "reports.generate")]["cost"] == "30.000000"
    assert by_key[("alice", "notify.sms")]["billed_calls"] == "3"
    assert by_key[("bob", "system.ping")]["calls"] == "50"
    assert sum(Decimal(row["cost"]) for row in rows) == Decimal("30.05")


def test_the_command_prints_a_table_with_a_total(november: dict[str, Any]) -> None:
    out = run("rpc_usage_report", "--month", "2026-11", "--by", "user")
    lines = out.splitlines()
    assert lines[0].split() == ["User", "Calls", "Failed", "Billed", "Cost"]
    assert lines[2].split() == ["alice", "9", "0", "9", "30.030000"]
    assert lines[-1].split() == ["Total", "61", "1", "10", "30.050000"]
    assert run("rpc_usage_report", "--month", "2025-01") == (
        "No usage in 2025-01 (as of the last rpc_rollup run).\n"
    )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"month": "2026-13"}, "--month"),
        ({"month": "2026-11", "format": "xml"}, "--format"),
        ({"month": "2026-11", "by": "ip"}, "--by"),
        ({"month": "2026-11", "per": "week"}, "--per"),
        ({"month": "2026-11", "method": ""}, "--method"),
    ],
)
def test_the_command_refuses_bad_options(options: dict[str, Any], message: str) -> None:
    with pytest.raises(CommandError, match=message):
        call_command("rpc_usage_report", **options)


# -- the admin page -----------------------------------------------------------------------------


def test_the_usage_page_lists_users_with_totals_and_links_to_their_calls(
    november: dict[str, Any], admin_client_: Any
) -> None:
    response = admin_client_.get(reverse(USAGE), {"month": "2026-11"})
    assert response.status_code == 200
    rows = response.context["rows"]
    assert [row["line"].username for row in rows] == ["alice", "", "bob"]
    assert response.context["total"].cost == Decimal("30.05")
    content = response.content.decode()
    assert 'data-table="usage"' in content
    assert "30.050000" in content
    # Drill-down: the changelist of alice's calls that month, and it lists them.
    query = parse_qs(urlsplit(rows[0]["billed_url"]).query)
    assert query["user"] == [str(november["alice"].pk)]
    assert query["cost__isnull"] == ["False"]
    changelist = admin_client_.get(rows[0]["billed_url"])
    assert changelist.status_code == 200
    assert changelist.context["cl"].queryset.count() == 9
    # One user's methods.
    methods = admin_client_.get(rows[0]["methods_url"])
    assert [row["line"].method for row in methods.context["rows"]] == [
        "reports.generate",
        "notify.sms",
    ]
    anonymous = admin_client_.get(rows[1]["methods_url"])
    assert [row["line"].cost for row in anonymous.context["rows"]] == [Decimal("0.02")]


def test_the_usage_page_exports_csv(november: dict[str, Any], admin_client_: Any) -> None:
    response = admin_client_.get(reverse(USAGE), {"month": "2026-11", "format": "csv"})
    assert response["Content-Type"].startswith("text/csv")
    assert 'filename="rpc-usage-2026-11.csv"' in response["Content-Disposition"]
    rows = list(csv.DictReader(io.StringIO(response.content.decode())))
    assert {row["username"]: row["cost"] for row in rows} == {
        "alice": "30.030000",
        "": "0.020000",
        "bob": "0.000000",
    }


def test_the_usage_page_outlives_the_rows(november: dict[str, Any], admin_client_: Any) -> None:
    before = admin_client_.get(reverse(USAGE), {"month": "2026-11", "format": "csv"}).content
    RPCLog.objects.prune(days=0)
    assert not RPCLog.objects.exists()
    after = admin_client_.get(reverse(USAGE), {"month": "2026-11", "format": "csv"}).content
    assert after == before


def test_the_usage_page_needs_the_view_permission(november: dict[str, Any]) -> None:
    assert staff_client().get(reverse(USAGE)).status_code == 403
    assert staff_client("view_rpclog").get(reverse(USAGE)).status_code == 200


def test_the_usage_page_reads_the_rollups_with_a_bounded_number_of_queries(
    november: dict[str, Any], admin_client_: Any, django_assert_max_num_queries: Any
) -> None:
    admin_client_.get(reverse(USAGE), {"month": "2026-11"})
    with django_assert_max_num_queries(6):
        admin_client_.get(reverse(USAGE), {"month": "2026-11"})


@pytest.mark.parametrize(
    "params", [{"month": "2026-99"}, {"user": "not-a-key"}, {"month": "x", "user": "1e9"}]
)
def test_the_usage_page_ignores_parameters_it_cannot_use(
    november: dict[str, Any], admin_client_: Any, params: dict[str, str]
) -> None:
    response = admin_client_.get(reverse(USAGE), params)
    assert response.status_code == 200
    assert response.context["one_user"] is False


# -- CloudEvents ------------------------------------------------------------------------------


def test_closed_days_export_as_cloudevents_with_fixed_ids(november: dict[str, Any]) -> None:
    events = cloud_events(*month_range("2026-11"), source="billing-test")
    assert {event["specversion"] for event in events} == {"1.0"}
    assert sum(Decimal(event["data"]["cost"]) for event in events) == Decimal("30.05")
    assert sum(event["data"]["cost_micros"] for event in events) == 30_050_000
    first = events[0]
    assert first["time"] == "2026-11-01T00:00:00Z"
    assert first["subject"] == "alice"
    assert first["data"]["method"] == "reports.generate"
    assert first["data"]["billed_calls"] == 2
    assert {event["subject"] for event in events} == {"alice", "bob", "anonymous"}
    # The same day, user and method: the same id, so a deduplicating consumer takes it once.
    again = cloud_events(*month_range("2026-11"), source="billing-test")
    assert [event["id"] for event in again] == [event["id"] for event in events]
    assert len({event["id"] for event in events}) == len(events)
    other = cloud_events(*month_range("2026-11"), source="elsewhere")
    assert not {event["id"] for event in other} & {event["id"] for event in events}


def test_days_not_settled_are_not_exported(november: dict[str, Any]) -> None:
    RPCRollupBucket.objects.filter(start__gte=NOVEMBER + timedelta(days=10)).update(settled=False)
    # The last settled hour is Nov 5, 00:00: that day is not whole yet.
    assert closed_until() == datetime(2026, 11, 5, tzinfo=UTC)
    days = {event["time"][:10] for event in cloud_events(*month_range("2026-11"))}
    assert days == {"2026-11-01", "2026-11-03", "2026-11-04"}
    RPCRollupBucket.objects.update(settled=False)
    assert cloud_events(*month_range("2026-11")) == []


def test_the_command_prints_cloudevents_as_json_lines(november: dict[str, Any]) -> None:
    out = run("rpc_usage_report", "--month", "2026-11", "--format", "cloudevents")
    events = [json.loads(line) for line in out.splitlines()]
    assert events == json.loads(json.dumps(cloud_events(*month_range("2026-11"))))
    with pytest.raises(CommandError, match="--source"):
        call_command("rpc_usage_report", month="2026-11", format="cloudevents", source="")


def test_a_call_with_a_cost_shows_it_on_its_page(admin_client_: Any) -> None:
    billed = RPCLogFactory(method="reports.generate", cost=Decimal("5.25"))
    free = RPCLogFactory(method="system.ping")

    def page(log: RPCLog) -> str:
        url = reverse("admin:django_rpc_audit_rpclog_change", args=[log.pk])
        response = admin_client_.get(url)
        assert response.status_code == 200
        return response.content.decode()

    assert "5.250000" in page(billed)
    assert ">Cost</label>" in page(billed)
    assert ">Cost</label>" not in page(free)


def test_the_changelist_links_to_the_usage_page(admin_client_: Any) -> None:
    content = admin_client_.get(reverse("admin:django_rpc_audit_rpclog_changelist")).content
    assert b"data-rpc-usage-link" in content
    assert reverse(USAGE).encode() in content
