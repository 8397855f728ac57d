"""RPCLog model and migrations."""

from __future__ import annotations

from io import StringIO

import pytest
from django.core.management import call_command
from django.utils import timezone

from django_rpc_audit.models import RPCLog, RPCStatus
from tests.factories import RPCLogFactory, UserFactory


@pytest.mark.django_db
def test_migrations_match_the_models():
    out = StringIO()
    call_command("makemigrations", "django_rpc_audit", "--check", "--dry-run", stdout=out)
    assert "No changes detected" in out.getvalue()


def test_no_index_is_a_prefix_of_another():
    meta = RPCLog._meta
    index_fields = [tuple(index.fields) for index in meta.indexes]
    indexed_columns = [
        (field.name,) for field in meta.fields if field.db_index and not field.primary_key
    ]
    all_indexes = index_fields + indexed_columns
    for a in all_indexes:
        for b in all_indexes:
            if a is not b and a != b:
                assert b[: len(a)] != a, f"index {a} duplicates the prefix of {b}"
    assert len(set(all_indexes)) == len(all_indexes)


@pytest.mark.django_db
def test_deleting_a_user_keeps_their_rows():
    user = UserFactory()
    log = RPCLogFactory(user=user)
    user.delete()
    log.refresh_from_db()
    assert log.user is None


@pytest.mark.django_db
def test_duration_keeps_sub_millisecond_precision():
    log = RPCLogFactory(duration_ms=0.123456)
    log.refresh_from_db()
    assert log.duration_ms == pytest.approx(0.123456)


def test_str_and_finished():
    log = RPCLog(method="m", status=RPCStatus.PENDING, correlation_id="c")
    assert str(log) == "m [pending] c"
    assert log.is_finished is False


@pytest.mark.django_db
def test_rows_written_without_sample_rate_get_the_database_default():
    """Code that predates the column (an older release mid-deploy, raw SQL) can still insert."""
    from django.db import connection

    table = connection.ops.quote_name(RPCLog._meta.db_table)
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {table} (id, correlation_id, method, params, status, error_code, "  # noqa: S608
            "error_message, user_agent, created_at) VALUES (%s, %s, %s, %s, %s, '', '', '', %s)",
            [
                "0b8d7c1e5f3a4e2b9c6d8e7f1a2b3c4d",
                "c-raw",
                "raw.insert",
                "{}",
                RPCStatus.SUCCESS,
                timezone.now(),
            ],
        )
    assert RPCLog.objects.get(correlation_id="c-raw").sample_rate == 1.0
