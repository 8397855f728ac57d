"""The admin and the dashboard in a real headless Chromium (Debian's ``chromium``, via Playwright).

Logs in, opens the changelist, filters it by ``failed``, opens a row, opens the dashboard and
checks that its chart is drawn. A screenshot of each page goes to ``artifacts/screenshots/``
for a reviewer to look at, and those of the changelist, a row and the dashboard also to
``docs/assets/screenshots/``, which README and the documentation show: every run refreshes
them, so they always show the current UI (commit them when the UI changed). Skipped when
Chromium or Playwright is missing (failed with ``RPC_AUDIT_STRICT=1``, as ``scripts/test``
sets).
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.db import connections
from django.utils import timezone

from tests.conftest import unavailable
from tests.factories import RPCLogFactory, UserFactory

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
ROOT = Path(__file__).resolve().parent.parent
SCREENSHOTS = ROOT / "artifacts" / "screenshots"
#: Committed: README and the docs show these.
DOCS_SCREENSHOTS = ROOT / "docs" / "assets" / "screenshots"
# The machine's network may be closed: keep Chromium from calling home on its own.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = pytest.mark.browser


@pytest.fixture
def allow_sync_orm_under_playwright(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let this test's own ORM calls run while Playwright's event loop is running.

    Playwright's sync API keeps an asyncio loop running in the test's thread, so Django's
    async-safety guard takes the test's (synchronous, single-threaded) database calls for calls
    made from async code and refuses them. They are not: the live server answers the browser in
    its own thread. The variable is set for these tests only and removed afterwards.
    """
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")


@pytest.fixture
def browser_page(allow_sync_orm_under_playwright: None) -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        unavailable("Playwright is not installed (pip install playwright)")
    if not (Path(CHROMIUM).exists() or shutil.which(CHROMIUM)):
        unavailable(f"Chromium is not installed at {CHROMIUM} (apt-get install chromium)")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
        )
        page = browser.new_page(viewport={"width": 1440, "height": 1000})
        page.set_default_timeout(20_000)
        try:
            yield page
        finally:
            # Inside sync_playwright() the test runs in a greenlet with contextvars of its own,
            # so Django (whose connections are per context) gave its ORM calls a connection of
            # their own, which the test database teardown would not see. Close it here.
            connections.close_all()
            browser.close()


def screenshot(page: Any, name: str, *, docs: str | None = None, fit: bool = False) -> None:
    """Save the page to ``artifacts/screenshots/<name>.png`` and, given ``docs``, to the docs.

    The docs' copy is the browser window: with ``fit``, first made as tall as the page (a
    full-page capture would leave Unfold's sidebar, or its sticky footer, at the first
    window's height).
    """
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)
    if docs is None:
        return
    DOCS_SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    size = page.viewport_size
    if fit:
        height = page.evaluate("() => document.documentElement.scrollHeight")
        page.set_viewport_size({"width": size["width"], "height": height})
    try:
        image = page.screenshot()
    finally:
        page.set_viewport_size(size)
    # Written whole, then renamed: the docs' test (perhaps in a run beside this one) never
    # reads a half-written file.
    target = DOCS_SCREENSHOTS / f"{docs}.png"
    partial = target.with_name(f".{docs}.{os.getpid()}.png")
    partial.write_bytes(image)
    os.replace(partial, target)


def finished_call(**fields: Any) -> Any:
    """A logged call that completed ``duration_ms`` after it was created (the row's timeline)."""
    completed_at = fields["created_at"] + timedelta(milliseconds=fields["duration_ms"])
    return RPCLogFactory(completed_at=completed_at, **fields)


@pytest.mark.django_db(transaction=True)
def test_admin_and_dashboard_in_a_browser(live_server, browser_page):
    page = browser_page
    UserFactory(username="admin", is_staff=True, is_superuser=True)  # password "password"
    alice = UserFactory(username="alice")
    # A few users and methods, so that the screenshots the docs show look like a real site.
    users = [alice, UserFactory(username="bob"), UserFactory(username="carol")]
    methods = ["notifications.send", "users.sync", "notifications.send", "reports.export"]
    now = timezone.now()
    for minute in range(0, 55, 2):
        finished_call(
            method=methods[minute // 2 % len(methods)],
            user=users[minute // 2 % len(users)],
            duration_ms=20.0 + minute * 3,
            params={"to": "alice@example.com", "subject": f"Report {minute}"},
            created_at=now - timedelta(minutes=minute),
        )
    finished_call(
        method="billing.charge",
        status="failed",
        user=alice,
        error_code="REMOTE_ERROR",
        error_message="Card declined <b>insufficient funds</b>",
        params={"amount": 4200, "note": "<script>alert(1)</script>"},
        response=None,
        duration_ms=812.0,
        created_at=now - timedelta(minutes=3),
    )
    finished_call(
        method="inventory.reserve",
        status="timeout",
        error_code="TIMEOUT",
        error_message="No reply within 2.0 s",
        response=None,
        duration_ms=2004.0,
        created_at=now - timedelta(minutes=7),
    )
    alerts: list[str] = []
    page.on("dialog", lambda dialog: (alerts.append(dialog.message), dialog.dismiss()))

    # Log in.
    page.goto(f"{live_server.url}/admin/login/?next=/admin/django_rpc_audit/rpclog/")
    screenshot(page, "01-login")
    page.fill("input[name=username]", "admin")
    page.fill("input[name=password]", "password")
    page.click("button[type=submit], input[type=submit]")
    page.wait_for_url("**/admin/django_rpc_audit/rpclog/")

    # The changelist.
    assert page.locator("#result_list tbody tr").count() == 30
    assert page.get_by_text("notifications.send").first.is_visible()
    screenshot(page, "02-changelist", docs="admin-changelist")

    # Filtered by failed, from the filter sheet.
    page.locator('a[x-on\\:click="filterOpen = true"]').click()
    filters = page.locator("#changelist-filter")
    filters.get_by_role("link", name="Failed", exact=True).wait_for()
    screenshot(page, "03-filters")
    filters.get_by_role("link", name="Failed", exact=True).click()
    page.wait_for_url(re.compile(r"status__exact=failed"))
    rows = page.locator("#result_list tbody tr")
    assert rows.count() == 1
    assert "billing.charge" in rows.first.inner_text()
    screenshot(page, "04-changelist-failed")

    # One row.
    rows.first.get_by_role("link", name="billing.charge").click()
    page.wait_for_url(re.compile(r"/change/"))
    error_box = page.locator("[data-error-box]")
    assert error_box.is_visible()
    assert "Card declined <b>insufficient funds</b>" in error_box.inner_text()
    params = page.locator("pre[data-json]").first
    assert "<script>alert(1)</script>" in params.inner_text()  # shown as text ...
    assert alerts == []  # ... never run
    screenshot(page, "05-detail", docs="admin-detail")

    # The dashboard, from the changelist's button.
    page.goto(f"{live_server.url}/admin/django_rpc_audit/rpclog/")
    page.click("[data-rpc-dashboard-link]")
    page.wait_for_url(re.compile(r"/dashboard/"))
    page.wait_for_function(
        "() => window.Chart && Chart.getChart(document.getElementById('rpc-calls-chart'))"
    )
    drawn = page.evaluate(
        """() => {
            const canvas = document.getElementById('rpc-calls-chart');
            const pixels = canvas.getContext('2d')
                .getImageData(0, 0, canvas.width, canvas.height).data;
            let painted = 0;
            for (let i = 3; i < pixels.length; i += 4) if (pixels[i] > 0) painted++;
            const chart = Chart.getChart(canvas);
            return {
                painted,
                width: canvas.width,
                points: chart.data.datasets
                    .flatMap((dataset) => dataset.data).reduce((a, b) => a + b, 0),
            };
        }"""
    )
    assert drawn["width"] > 300
    assert drawn["painted"] > 500
    assert drawn["points"] == 30
    assert page.locator("[data-kpi=total]").inner_text().split()[2] == "30"
    assert "billing.charge" in page.locator("[data-table=recent-failures]").inner_text()
    screenshot(page, "06-dashboard", docs="dashboard", fit=True)

    # It refreshes itself: a new failure shows up without a reload.
    RPCLogFactory(method="search.query", status="failed", error_code="BOOM")
    page.wait_for_function(
        "() => document.querySelector('[data-table=recent-failures]')"
        ".innerText.includes('search.query')",
        timeout=20_000,
    )
    assert page.evaluate("() => !!Chart.getChart(document.getElementById('rpc-calls-chart'))")
