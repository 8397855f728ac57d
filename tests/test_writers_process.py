"""The buffered writer across process boundaries: flush at exit, on SIGTERM, and after fork.

SIGTERM is sent to real servers: gunicorn (sync workers, ``--preload``) and uvicorn (async
views, so the calls go through ``acall()``).

Each test runs ``tests/writer_process.py`` in a child process (or under gunicorn) with a flush
interval of an hour, so the rows can only come from the shutdown flush. The child uses a
SQLite file on the SQLite run (its own thread writing to it, which the in-memory test database
cannot show) and the test database itself on the PostgreSQL and MariaDB runs.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent

ChildRunner = Callable[..., list[dict[str, Any]]]


def run_child(
    env: dict[str, str], scenario: str, count: int = 0, exit_code: int = 0, timeout: float = 120
) -> list[dict[str, Any]]:
    result = subprocess.run(
        [sys.executable, "-m", "tests.writer_process", scenario, str(count)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert result.returncode == exit_code, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


@pytest.mark.django_db(transaction=True)
def test_rows_are_written_at_normal_interpreter_exit(child_env: dict[str, str]) -> None:
    (before_exit,) = run_child(child_env, "exit", 250)
    assert before_exit == {"buffered": 250, "written": 0}  # nothing written before the exit
    (report,) = run_child(child_env, "report")
    assert report["count"] == 250
    assert report["by_who"]["exit"] == 250
    assert report["statuses"] == ["success"]


@pytest.mark.django_db(transaction=True)
def test_rows_are_written_when_sigterm_kills_a_bare_process(child_env: dict[str, str]) -> None:
    (before,) = run_child(child_env, "sigterm", 120, exit_code=-signal.SIGTERM)
    assert before == {"buffered": 120, "written": 0}
    (report,) = run_child(child_env, "report")
    assert report["by_who"]["exit"] == 120


@pytest.mark.django_db(transaction=True)
def test_sigterm_inside_the_writer_never_deadlocks(child_env: dict[str, str]) -> None:
    """The handler runs on the main thread between two bytecodes of whatever SIGTERM
    interrupted, possibly the writer holding its (non-reentrant) lock: flushing there used to
    wait for that lock forever. Now the flush runs in a helper thread and the wait ends after
    ``BUFFER_SHUTDOWN_TIMEOUT``; the process dies of SIGTERM as it should."""
    env = {**child_env, "DJANGO_CFG_RPC__BUFFER_SHUTDOWN_TIMEOUT": "0.5"}
    (before,) = run_child(env, "sigterm-inside-the-writer", 20, exit_code=-signal.SIGTERM)
    assert before == {"buffered": 20}


@pytest.mark.django_db(transaction=True)
def test_sigterm_the_main_thread_never_sees_still_flushes_and_ends_the_process(
    child_env: dict[str, str],
) -> None:
    """SIGTERM noted by CPython while the main thread waits where the signal did not
    interrupt it (here: the signal went to another thread; in a ``Pool`` worker: it came just
    before the wait). The Python handler would wait for the main thread forever, and so would
    the process, where SIGTERM's default action ends it: the watch sends SIGTERM again."""
    (before,) = run_child(
        child_env, "sigterm-the-main-thread-never-sees", 20, exit_code=-signal.SIGTERM, timeout=30
    )
    assert before == {"buffered": 20, "written": 0}
    (report,) = run_child(child_env, "report")
    assert report["by_who"]["exit"] == 20


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("start_method", ["fork", "forkserver"])
def test_a_multiprocessing_child_that_misses_its_sigterm_still_ends(
    child_env: dict[str, str], start_method: str
) -> None:
    """The same in a ``multiprocessing`` child: a forked one sets a wakeup pipe of its own; a
    forkserver's child sets one at its first call (its server resets the wakeup fd)."""
    before, after = run_child(child_env, f"mp-{start_method}:unseen-sigterm", 10, timeout=60)
    assert before == {"buffered": 10, "written": 0}
    assert after == {"exitcodes": [-signal.SIGTERM]}  # [None]: still waiting after 30 s
    (report,) = run_child(child_env, "report")
    assert report["by_who"]["exit"] == 10


@pytest.mark.django_db(transaction=True)
def test_the_sigterm_watch_never_repeats_a_signal_the_handler_has_seen(
    child_env: dict[str, str],
) -> None:
    """The handler SIGTERM had before ours (a server's) runs once per SIGTERM, and the process
    lives on for several of the watch's intervals after it."""
    (after,) = run_child(child_env, "sigterm-handled-once", 20)
    assert after == {"handled": 1, "buffered": 0}
    (report,) = run_child(child_env, "report")
    assert report["by_who"]["exit"] == 20


@pytest.mark.django_db(transaction=True)
def test_a_sigterm_that_stopped_a_command_is_not_sent_again(child_env: dict[str, str]) -> None:
    """A command stopped by SIGTERM puts the flush handler back at once; the watch had read
    that SIGTERM and, the flush handler being SIGTERM's again half a second later, sent it
    again: the process flushed and died (exit status -SIGTERM instead of 0). The same for a
    SIGTERM that another handler took for a moment."""
    (after,) = run_child(child_env, "sigterm-stops-a-command", 20)
    assert after == {
        "stopped": True,
        "other_handled": 1,
        "flush_handler_back": True,
        "buffered": 20,
    }


@pytest.mark.django_db(transaction=True)
def test_a_forked_childs_sigterm_never_reaches_the_parent(child_env: dict[str, str]) -> None:
    """The signals' wakeup pipe is inherited at fork: a child that kept it would tell the
    parent's watch of its own SIGTERM, and the watch would send the parent one."""
    child, parent = run_child(child_env, "sigterm-in-a-forked-child", 20)
    assert child == {"who": "child", "handled": 1, "buffered": 0}
    assert parent == {"who": "parent", "child_status": 0, "handled": 0}
    (report,) = run_child(child_env, "report")
    assert report["by_who"]["child"] == 10


@pytest.mark.django_db(transaction=True)
def test_a_forked_child_writes_only_its_own_calls_with_its_own_thread(
    child_env: dict[str, str],
) -> None:
    """``gunicorn --preload`` in miniature: the parent buffered 30 calls, then forked."""
    child, parent = run_child(child_env, "fork", 30)
    assert child["who"] == "child"
    assert child["inherited"] == 0  # the parent's buffer was not carried over
    assert child["flushed"] is True
    assert child["written"] == 10  # its own calls only: nothing of the parent's twice
    assert child["own_thread"] is True
    assert parent == {"who": "parent", "child_status": 0, "buffered": 30}
    (report,) = run_child(child_env, "report")
    assert report["by_who"] == {"parent": 30, "child": 10, "exit": 0, "web": 0}
    assert report["count"] == 40


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    "how",
    [
        "fork:process",
        "fork:pool",
        "fork:with-pool",
        # Python 3.14's default on Linux; its children end through os._exit too. (spawn
        # children end through sys.exit, so atexit runs: nothing to prove there.)
        "forkserver:process",
    ],
)
def test_calls_made_in_multiprocessing_children_leave_their_rows(
    child_env: dict[str, str], how: str
) -> None:
    """README: multiprocessing is supported. Children end through ``os._exit`` (fork and
    forkserver), which skips ``atexit``; ``with Pool`` terminates its workers with SIGTERM."""
    (summary,) = run_child(child_env, f"mp-{how}", 50)
    assert summary in ({"exitcodes": [0]}, {"children": summary.get("children")})
    (report,) = run_child(child_env, "report")
    assert report["by_who"]["child"] == 50
    assert report["statuses"] == ["success"]


@pytest.mark.django_db(transaction=True)
def test_pool_workers_terminated_in_a_task_leave_their_rows(child_env: dict[str, str]) -> None:
    """``Pool.terminate()`` (what ``with Pool`` does) SIGTERMs workers busy in a task: the
    SIGTERM flush, inherited from the parent, writes what each had called so far."""
    (summary,) = run_child(child_env, "mp-fork:terminate-busy", 8)
    assert summary == {"children": 4}
    (report,) = run_child(child_env, "report")
    assert report["by_who"]["child"] == 4


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, server: subprocess.Popen[str], timeout: float = 30.0) -> None:
    """Wait until ``server`` accepts connections on ``port``; fail if it exits first."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            assert server.poll() is None, server.communicate()[0]
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.1)


def serve_then_sigterm(
    command: list[str], env: dict[str, str], port: int, path: str, exit_code: int = 0
) -> str:
    """Start a server, make 40 requests to ``path``, SIGTERM it; return its output."""
    server = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        wait_for_port(port, server)
        for n in range(40):
            url = f"http://127.0.0.1:{port}{path}?who=web&n={n}"
            with urllib.request.urlopen(url, timeout=10) as response:
                assert response.status == 200
        (report,) = run_child(env, "report")
        assert report["count"] == 0  # an hour's flush interval: all still buffered
        server.send_signal(signal.SIGTERM)
        output, _ = server.communicate(timeout=60)
    finally:
        if server.poll() is None:
            server.kill()
            server.communicate()
    assert server.returncode == exit_code, output
    return output


@pytest.mark.django_db(transaction=True)
def test_gunicorn_workers_write_their_rows_on_sigterm(child_env: dict[str, str]) -> None:
    """SIGTERM to gunicorn (``--preload``, two workers): each worker flushes as it exits."""
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "gunicorn",
        "tests.writer_process:application",
        "--preload",
        "--workers=2",
        f"--bind=127.0.0.1:{port}",
        "--graceful-timeout=30",
    ]
    serve_then_sigterm(command, child_env, port, "/sync/call/")
    (report,) = run_child(child_env, "report")
    assert report["by_who"]["web"] == 40
    assert report["statuses"] == ["success"]


@pytest.mark.django_db(transaction=True)
def test_uvicorn_writes_its_rows_on_sigterm(child_env: dict[str, str]) -> None:
    """SIGTERM to uvicorn serving async views (``acall()``): the rows are written at exit."""
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "uvicorn",
        "tests.writer_process:asgi_application",
        f"--port={port}",
        "--host=127.0.0.1",
        "--lifespan=off",
    ]
    # uvicorn shuts down gracefully, then re-raises SIGTERM with its default action: the
    # process ends killed by the signal, without exit handlers; the SIGTERM flush wrote the rows.
    serve_then_sigterm(command, child_env, port, "/async/call/", exit_code=-signal.SIGTERM)
    (report,) = run_child(child_env, "report")
    assert report["by_who"]["web"] == 40
    assert report["statuses"] == ["success"]
