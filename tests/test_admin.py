"""The read-only RPCLog admin."""

from __future__ import annotations

import pytest
from django.test import Client
from django.urls import reverse

from tests.factories import RPCLogFactory, UserFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def admin_client_() -> Client:
    client = Client()
    client.force_login(UserFactory(username="root", is_staff=True, is_superuser=True))
    return client


def test_changelist_shows_calls_with_their_user(admin_client_):
    user = UserFactory(username="alice")
    RPCLogFactory(method="send_notification", status="failed", user=user, duration_ms=12.5)
    response = admin_client_.get(reverse("admin:django_rpc_audit_rpclog_changelist"))
    assert response.status_code == 200
    content = response.content.decode()
    assert "send_notification" in content
    assert "alice" in content
    assert "12.5 ms" in content


def test_changelist_filters_by_status(admin_client_):
    RPCLogFactory(method="ok.method", status="success")
    RPCLogFactory(method="broken.method", status="failed")
    url = reverse("admin:django_rpc_audit_rpclog_changelist")
    content = admin_client_.get(url, {"status__exact": "failed"}).content.decode()
    assert "broken.method" in content
    assert "ok.method" not in content


def test_rows_cannot_be_added_or_changed(admin_client_):
    log = RPCLogFactory()
    add = admin_client_.get(reverse("admin:django_rpc_audit_rpclog_add"))
    assert add.status_code == 403
    change_url = reverse("admin:django_rpc_audit_rpclog_change", args=[log.pk])
    detail = admin_client_.get(change_url)
    assert detail.status_code == 200  # viewable ...
    posted = admin_client_.post(change_url, {"method": "tampered"})
    assert posted.status_code == 403  # ... not editable
    log.refresh_from_db()
    assert log.method != "tampered"
