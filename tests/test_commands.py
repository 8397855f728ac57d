"""Retention and the commands: prune, cleanup, reap, stats."""

from __future__ import annotations

from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import NotSupportedError, connection, transaction
from django.db.models import Subquery
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from django_rpc_audit.models import RPCLog, RPCStatus
from django_rpc_audit.querysets import OUTCOME_LOST
from tests.factories import RPCLogFactory

pytestmark = pytest.mark.django_db


def ago(**delta: float):
    return timezone.now() - timedelta(**delta)


def run(*args: str) -> str:
    out = StringIO()
    call_command(*args, stdout=out)
    return out.getvalue()


@pytest.fixture
def aged_rows():
    """5 rows of 40 days, 3 of 10 days, 2 of 1 hour; one old pending row, one fresh pending."""
    old = RPCLogFactory.create_batch(5, created_at=ago(days=40))
    middle = RPCLogFactory.create_batch(3, created_at=ago(days=10))
    fresh = RPCLogFactory.create_batch(2, created_at=ago(hours=1))
    stale_pending = RPCLogFactory(status=RPCStatus.PENDING, created_at=ago(days=40))
    live_pending = RPCLogFactory(status=RPCStatus.PENDING, created_at=ago(seconds=2))
    return old, middle, fresh, stale_pending, live_pending


def test_prune_deletes_old_rows_hour_by_hour_in_batches_of_keys(aged_rows):
    old, middle, fresh, stale_pending, live_pending = aged_rows
    with CaptureQueriesContext(connection) as queries:
        deleted = RPCLog.objects.prune(days=30, batch_size=2)
    assert deleted == 6  # five old rows and the old pending one
    remaining = set(RPCLog.objects.values_list("pk", flat=True))
    assert remaining == {row.pk for row in [*middle, *fresh, live_pending]}
    table = RPCLog._meta.db_table
    deletes = [
        q["sql"]
        for q in queries.captured_queries
        if f'DELETE FROM "{table}"' in q["sql"] or f"DELETE FROM `{table}`" in q["sql"]
    ]
    # At most batch_size rows per statement: on PostgreSQL one DELETE ... RETURNING of the
    # keys a LIMIT chooses, summed in the same statement; elsewhere the keys are locked first
    # and deleted by key.
    assert len(deletes) >= 3
    if connection.vendor == "postgresql":
        assert all("LIMIT 2" in sql and "RETURNING" in sql for sql in deletes)
    else:
        assert all(sql.count(",") <= 1 and "LIMIT" not in sql for sql in deletes)
    # Each hour commits on its own (savepoints on SQLite inside the test transaction), after
    # counting its rows in the rollups.
    hours = {row.created_at.replace(minute=0, second=0, microsecond=0) for row in old}
    assert sum(
        "SAVEPOINT" in q["sql"] and "RELEASE" in q["sql"] for q in queries.captured_queries
    ) >= len(hours)


def test_prune_never_deletes_pending_rows_younger_than_the_timeout(aged_rows, rpc_settings):
    rpc_settings(RPC_TIMEOUT=5, REAP_MARGIN_SECONDS=0)
    *_, live_pending = aged_rows
    RPCLog.objects.prune(days=0)
    assert list(RPCLog.objects.values_list("pk", flat=True)) == [live_pending.pk]


def test_prune_dry_run_counts_and_deletes_nothing(aged_rows):
    assert RPCLog.objects.prune(days=30, dry_run=True) == 6
    assert RPCLog.objects.count() == 12


def test_prune_defaults_to_retention_days(aged_rows, rpc_settings):
    rpc_settings(RETENTION_DAYS=7)
    assert RPCLog.objects.prune() == 9


def test_prune_applies_to_the_filtered_queryset(aged_rows):
    RPCLogFactory(method="other", created_at=ago(days=40))
    assert RPCLog.objects.for_method("other").prune(days=30) == 1
    assert RPCLog.objects.filter(method="system.ping", created_at__lt=ago(days=30)).count() == 6


@pytest.mark.parametrize("kwargs", [{"days": -1}, {"days": "30"}, {"batch_size": 0}])
def test_prune_refuses_bad_arguments(kwargs):
    with pytest.raises(ValueError, match="must be"):
        RPCLog.objects.prune(**{"days": 30, **kwargs})


def test_cleanup_command_prints_counts(aged_rows):
    assert run("rpc_logs_cleanup", "--days", "30", "--dry-run") == (
        "Would delete 6 RPC log row(s) older than 30 day(s).\n"
    )
    assert RPCLog.objects.count() == 12
    assert run("rpc_logs_cleanup", "--days", "30", "--batch-size", "2") == (
        "Deleted 6 RPC log row(s) older than 30 day(s).\n"
    )
    assert RPCLog.objects.count() == 6


def test_cleanup_command_uses_retention_days_by_default(aged_rows, rpc_settings):
    rpc_settings(RETENTION_DAYS=7)
    assert run("rpc_logs_cleanup") == "Deleted 9 RPC log row(s) older than 7 day(s).\n"


@pytest.mark.parametrize(
    "args",
    [("--days", "-3"), ("--days", "soon"), ("--batch-size", "0"), ("--batch-size", "1.5")],
)
def test_cleanup_command_rejects_bad_input(args, aged_rows):
    with pytest.raises(CommandError):
        call_command("rpc_logs_cleanup", *args, stdout=StringIO())
    assert RPCLog.objects.count() == 12


def test_cleanup_command_exits_non_zero_from_the_shell(capsys):
    from django.core.management import ManagementUtility

    with pytest.raises(SystemExit) as excinfo:
        ManagementUtility(["manage.py", "rpc_logs_cleanup", "--days", "-1"]).execute()
    assert excinfo.value.code != 0
    assert "--days" in capsys.readouterr().err


def test_reap_marks_stale_pending_rows_as_lost(rpc_settings):
    rpc_settings(RPC_TIMEOUT=30, REAP_MARGIN_SECONDS=60)
    stale = RPCLogFactory(status=RPCStatus.PENDING, created_at=ago(seconds=120), completed_at=None)
    young = RPCLogFactory(status=RPCStatus.PENDING, created_at=ago(seconds=60), completed_at=None)
    done = RPCLogFactory(status=RPCStatus.SUCCESS, created_at=ago(days=1))

    assert RPCLog.objects.stale().get() == stale
    assert RPCLog.objects.reap(dry_run=True) == 1
    assert RPCLog.objects.reap() == 1
    stale.refresh_from_db()
    assert (stale.status, stale.error_code) == (RPCStatus.TIMEOUT, OUTCOME_LOST)
    assert "never reported an outcome" in stale.error_message
    assert stale.completed_at is not None
    young.refresh_from_db()
    done.refresh_from_db()
    assert (young.status, done.status) == (RPCStatus.PENDING, RPCStatus.SUCCESS)
    assert RPCLog.objects.reap() == 0  # nothing stale is left


def test_reap_command(rpc_settings):
    rpc_settings(RPC_TIMEOUT=30, REAP_MARGIN_SECONDS=60)
    RPCLogFactory(status=RPCStatus.PENDING, created_at=ago(seconds=200))
    RPCLogFactory(status=RPCStatus.PENDING, created_at=ago(seconds=60))
    assert run("rpc_logs_reap", "--timeout", "300", "--dry-run") == (
        "Would mark 0 RPC log row(s) pending for over 360 s as timed out.\n"
    )
    assert run("rpc_logs_reap") == "Marked 1 RPC log row(s) pending for over 90 s as timed out.\n"
    assert RPCLog.objects.pending().count() == 1
    with pytest.raises(CommandError):
        call_command("rpc_logs_reap", "--timeout", "-5", stdout=StringIO())


def test_stats_command_prints_the_table():
    RPCLogFactory.create_batch(3, method="send_notification", duration_ms=10.0)
    RPCLogFactory(method="send_notification", status=RPCStatus.FAILED, duration_ms=30.0)
    RPCLogFactory(method="send_notification", status=RPCStatus.RATE_LIMITED, duration_ms=None)
    RPCLogFactory(method="system.ping", status=RPCStatus.TIMEOUT, duration_ms=5000.0)
    RPCLogFactory(method="system.ping", created_at=ago(hours=30))
    lines = run("rpc_logs_stats").splitlines()
    assert lines[0].split() == [
        "Method",
        "Calls",
        "OK",
        "Failed",
        "Timeout",
        "Limited",
        "Avg",
        "ms",
        "p95",
        "ms",
    ]
    assert lines[2].split() == ["send_notification", "5", "3", "1", "0", "1", "15.0", "27.0"]
    assert lines[3].split() == ["system.ping", "1", "0", "0", "1", "0", "5000.0", "5000.0"]
    assert lines[-1] == "6 call(s) in the last 24 hour(s)."
    assert run("rpc_logs_stats", "--hours", "48", "--method", "system.ping").splitlines()[
        2
    ].split()[:2] == [
        "system.ping",
        "2",
    ]
    assert run("rpc_logs_stats", "--method", "nope") == "No RPC calls in the last 24 hour(s).\n"
    with pytest.raises(CommandError):
        call_command("rpc_logs_stats", "--hours", "0", stdout=StringIO())


def test_stats_command_says_when_counts_are_estimated():
    RPCLogFactory.create_batch(2, method="system.ping", sample_rate=0.1)
    out = run("rpc_logs_stats")
    assert out.splitlines()[2].split()[:3] == ["system.ping", "20", "20"]
    assert (
        out.splitlines()[-1]
        == "20 call(s) in the last 24 hour(s) (estimated: sampled rows are scaled up)."
    )


def test_prune_in_batches_handles_rows_sharing_a_timestamp():
    moment = ago(days=40)
    RPCLogFactory.create_batch(7, created_at=moment)
    RPCLogFactory.create_batch(3, created_at=moment + timedelta(seconds=1))
    keep = RPCLogFactory(created_at=ago(days=1))
    assert RPCLog.objects.prune(days=30, batch_size=2) == 10
    assert list(RPCLog.objects.all()) == [keep]


@pytest.mark.skipif(connection.vendor != "mysql", reason="MySQL and MariaDB's own batches")
def test_prune_fetches_the_keys_first_where_limit_in_a_subquery_is_refused(aged_rows):
    # MySQL and MariaDB refuse "IN (SELECT ... LIMIT n)", the one-statement batch:
    oldest = RPCLog.objects.order_by("created_at").values("pk")[:4]
    with pytest.raises(NotSupportedError, match="LIMIT"), transaction.atomic():
        RPCLog.objects.filter(pk__in=Subquery(oldest)).delete()
    # prune reads (and locks) each hour's keys first, then deletes them by key.
    with CaptureQueriesContext(connection) as queries:
        assert RPCLog.objects.prune(days=30, batch_size=4) == 6
    statements = [q["sql"] for q in queries.captured_queries]
    table = RPCLog._meta.db_table
    deletes = [sql for sql in statements if sql.startswith("DELETE") and table in sql]
    assert deletes
    assert not any("LIMIT" in sql for sql in deletes)
    assert any(sql.startswith("SELECT") and "FOR UPDATE" in sql for sql in statements)
    assert RPCLog.objects.count() == 6


# -- numbers: from the shell and from call_command, huge, infinite, or of another type ---------


@pytest.mark.parametrize(
    ("command", "options", "printed"),
    [
        ("rpc_logs_stats", {"hours": 24}, "in the last 24 hour(s)"),
        ("rpc_logs_stats", {"hours": 1.5}, "in the last 1.5 hour(s)"),
        ("rpc_logs_stats", {"hours": "48"}, "in the last 48 hour(s)"),
        ("rpc_logs_cleanup", {"days": 30}, "older than 30 day(s)"),
        ("rpc_logs_cleanup", {"days": "30", "batch_size": "100"}, "older than 30 day(s)"),
        ("rpc_logs_reap", {"timeout": 300}, "pending for over 360 s"),
        ("rpc_logs_reap", {"timeout": "300"}, "pending for over 360 s"),
    ],
)
def test_commands_take_numbers_as_schedulers_pass_them(rpc_settings, command, options, printed):
    """``call_command(..., hours=24)`` skips argparse: ints (Python 3.11 has no
    ``int.is_integer``) and strings must work as on the command line."""
    rpc_settings(REAP_MARGIN_SECONDS=60)
    RPCLogFactory(method="system.ping", created_at=ago(hours=1))
    out = StringIO()
    call_command(command, **options, stdout=out)
    assert printed in out.getvalue()


@pytest.mark.parametrize(
    "args",
    [
        ("rpc_logs_cleanup", "--days", "1e7"),
        ("rpc_logs_cleanup", "--days", "inf"),
        ("rpc_logs_cleanup", "--days", "nan"),
        ("rpc_logs_reap", "--timeout", "1e12"),
        ("rpc_logs_reap", "--timeout", "inf"),
        ("rpc_logs_stats", "--hours", "1e12"),
        ("rpc_logs_stats", "--hours", "inf"),
    ],
)
def test_huge_and_infinite_numbers_are_command_errors(aged_rows, args):
    with pytest.raises(CommandError) as excinfo:
        call_command(*args, stdout=StringIO())
    assert args[1] in str(excinfo.value) or "too large" in str(excinfo.value)
    assert RPCLog.objects.count() == 12
    assert RPCLog.objects.pending().count() == 2


@pytest.mark.parametrize(
    ("command", "options"),
    [
        ("rpc_logs_cleanup", {"days": float("inf")}),
        ("rpc_logs_cleanup", {"days": 10**9}),
        ("rpc_logs_cleanup", {"days": -1}),
        ("rpc_logs_cleanup", {"days": True}),
        ("rpc_logs_cleanup", {"batch_size": 0}),
        ("rpc_logs_reap", {"timeout": 1e12}),
        ("rpc_logs_reap", {"timeout": "soon"}),
        ("rpc_logs_stats", {"hours": -1}),
        ("rpc_logs_stats", {"hours": "x"}),
        ("rpc_logs_stats", {"hours": float("nan")}),
    ],
)
def test_bad_numbers_from_call_command_are_command_errors(aged_rows, command, options):
    with pytest.raises(CommandError):
        call_command(command, **options, stdout=StringIO())
    assert RPCLog.objects.count() == 12
    assert RPCLog.objects.pending().count() == 2


def test_the_longest_durations_the_settings_allow_never_overflow(rpc_settings):
    """``RPC_TIMEOUT`` and ``REAP_MARGIN_SECONDS`` are capped (``MAX_WAIT_SECONDS``); at the cap
    the reaper and the cleanup still compute their windows (a larger value is refused by the
    settings themselves, see test_conf.py)."""
    from django_rpc_audit.conf import MAX_WAIT_SECONDS

    rpc_settings(RPC_TIMEOUT=MAX_WAIT_SECONDS, REAP_MARGIN_SECONDS=MAX_WAIT_SECONDS)
    RPCLogFactory(status=RPCStatus.PENDING, created_at=ago(days=30))
    assert run("rpc_logs_reap").startswith("Marked 1 RPC log row(s)")
    assert run("rpc_logs_cleanup", "--days", "1").startswith("Deleted 1 RPC log row(s)")


def test_a_huge_number_from_the_shell_exits_non_zero_without_a_traceback(capsys):
    from django.core.management import ManagementUtility

    with pytest.raises(SystemExit) as excinfo:
        ManagementUtility(["manage.py", "rpc_logs_cleanup", "--days", "1e7"]).execute()
    assert excinfo.value.code != 0
    err = capsys.readouterr().err
    assert "CommandError" in err
    assert "Traceback" not in err
    assert "OverflowError" not in err


@pytest.mark.parametrize(
    "call",
    [
        lambda: RPCLog.objects.prune(days=float("inf")),
        lambda: RPCLog.objects.prune(days=1e7),
        lambda: RPCLog.objects.recent(hours=1e12),
        lambda: RPCLog.objects.recent(hours=float("nan")),
        lambda: RPCLog.objects.stale(timeout=1e12),
        lambda: RPCLog.objects.reap(timeout=float("inf")),
    ],
)
def test_querysets_refuse_windows_beyond_the_calendar_with_value_error(call):
    with pytest.raises(ValueError, match="must be|too large"):
        call()


@pytest.mark.parametrize(
    "max_seconds", ["inf", "nan", "-1", "0", "1e12", "soon", float("inf"), 1e12, -1, True]
)
def test_the_webhook_worker_refuses_a_bad_max_seconds_with_a_command_error(max_seconds):
    """``--max-seconds inf`` or ``1e12`` ended in a timer thread's OverflowError (the worker
    then ran unbounded); from ``call_command`` a string was a ``TypeError``."""
    with pytest.raises(CommandError, match="--max-seconds"):
        call_command("rpc_webhooks_deliver", "--once", max_seconds=max_seconds, stdout=StringIO())


@pytest.fixture
def webhook_endpoint(rpc_settings):
    """One webhook endpoint, which nothing will be sent to."""
    import base64

    rpc_settings(
        WEBHOOKS=[
            {
                "NAME": "ops",
                "URL": "http://127.0.0.1:9/hook",
                "SECRET": "whsec_" + base64.b64encode(b"k" * 32).decode(),
            }
        ]
    )


def test_the_webhook_worker_takes_max_seconds_as_call_command_passes_it(webhook_endpoint):
    out = StringIO()
    call_command("rpc_webhooks_deliver", "--once", max_seconds="30", stdout=out)
    assert "Delivered 0" in out.getvalue()


# -- stopping the long-running commands -------------------------------------------------------


@pytest.fixture
def recorded_sigterm():
    """A SIGTERM handler of the test's own, recording the signals it gets; the process's own
    handler is back afterwards."""
    import signal

    received: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    try:
        yield received
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_stop_on_signals_stops_on_sigterm_and_sigint_then_puts_the_handlers_back(
    recorded_sigterm,
):
    import os
    import signal

    from django_rpc_audit.management.stopping import stop_on_signals

    sigterm_before = signal.getsignal(signal.SIGTERM)
    sigint_before = signal.getsignal(signal.SIGINT)
    stops = []
    with stop_on_signals(lambda: stops.append(True)) as installed:
        assert installed
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)
        signal.pthread_sigmask(signal.SIG_BLOCK, [])  # a bytecode boundary: the handlers ran
    assert stops == [True, True]
    assert recorded_sigterm == []  # the command's, not the process's handler
    assert signal.getsignal(signal.SIGTERM) is sigterm_before
    assert signal.getsignal(signal.SIGINT) is sigint_before


def test_stop_on_signals_puts_the_handlers_back_when_the_block_raises(recorded_sigterm):
    import signal

    from django_rpc_audit.management.stopping import stop_on_signals

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(RuntimeError), stop_on_signals(lambda: None):
        raise RuntimeError("the loop failed")
    assert signal.getsignal(signal.SIGTERM) is before


def test_stop_on_signals_in_another_thread_changes_nothing():
    """Only the main thread may install a handler (``ValueError`` elsewhere)."""
    import signal
    import threading

    from django_rpc_audit.management.stopping import stop_on_signals

    before = signal.getsignal(signal.SIGTERM)
    seen: list[object] = []

    def run() -> None:
        with stop_on_signals(lambda: None) as installed:
            seen.append((installed, signal.getsignal(signal.SIGTERM)))

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert seen == [(False, before)]


def test_the_webhook_worker_stops_on_sigterm_and_leaves_the_process_handler(
    webhook_endpoint, recorded_sigterm
):
    """SIGTERM ends the loop (not ``--max-seconds``); the handler the process had before is
    its SIGTERM handler again afterwards (it stayed the stopped worker's)."""
    import os
    import signal
    import threading
    import time

    before = signal.getsignal(signal.SIGTERM)
    timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    started = time.monotonic()
    out = StringIO()
    call_command("rpc_webhooks_deliver", max_seconds=10, stdout=out)
    timer.join()
    assert time.monotonic() - started < 5
    assert "Stopped after" in out.getvalue()
    assert recorded_sigterm == []
    assert signal.getsignal(signal.SIGTERM) is before


def test_the_webhook_worker_runs_from_call_command_in_another_thread(webhook_endpoint):
    """It raised ``ValueError: signal only works in main thread`` there."""
    import threading

    outcome: list[object] = []

    def run() -> None:
        out = StringIO()
        try:
            call_command("rpc_webhooks_deliver", max_seconds=0.2, stdout=out)
        except Exception as exc:
            outcome.append(exc)
        else:
            outcome.append(out.getvalue())
        finally:
            from django.db import connection

            connection.close()

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(10)
    assert len(outcome) == 1
    assert isinstance(outcome[0], str), outcome
    assert "Stopped after" in outcome[0]
