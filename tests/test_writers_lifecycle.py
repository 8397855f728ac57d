"""The writers at the edges of a process, in this process; across processes (exit, SIGTERM,
fork) in ``test_writers_process.py``."""

from __future__ import annotations

import signal
import socket
import threading

import pytest

from django_rpc_audit.writers import install_sigterm_flush, lifecycle

pytestmark = pytest.mark.skipif(not hasattr(signal, "pthread_kill"), reason="POSIX signals")


def test_the_sigterm_flush_comes_with_its_watch() -> None:
    """Installed over SIGTERM's default action (as the app's ``ready()`` does in a fresh
    process; other tests, such as ``call_command("rpc_logs_ingest")``, leave another handler
    in this one): the flush is SIGTERM's handler and the watch's pipe the wakeup fd."""
    previous_handler = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    watchs_fd = lifecycle._sigterm_watch._write_fd
    previous_fd = signal.set_wakeup_fd(-1)
    try:
        assert install_sigterm_flush() is True
        assert lifecycle._is_sigterm_flush(signal.getsignal(signal.SIGTERM))
        watch = lifecycle._sigterm_watch
        assert watch._write_fd != -1
        assert signal.set_wakeup_fd(watch._write_fd, warn_on_full_buffer=False) == watch._write_fd
        installed = signal.getsignal(signal.SIGTERM)
        assert install_sigterm_flush() is True  # already installed: nothing changes
        assert signal.getsignal(signal.SIGTERM) is installed
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        if previous_fd != watchs_fd:  # the watch's own pipe is replaced (and closed)
            signal.set_wakeup_fd(previous_fd, warn_on_full_buffer=False)


def test_the_sigterm_watch_leaves_another_wakeup_fd_alone() -> None:
    """An event loop's wakeup fd (asyncio's ``add_signal_handler``) is its own."""
    theirs, their_reader = socket.socketpair()
    theirs.setblocking(False)
    previous = signal.set_wakeup_fd(theirs.fileno())
    try:
        watch = lifecycle.SigtermWatch()
        assert watch.install(lambda: True) is False
        assert signal.set_wakeup_fd(theirs.fileno()) == theirs.fileno()
        watch.start()  # no pipe of its own: no thread to read it
        assert watch._thread_pid == 0
    finally:
        signal.set_wakeup_fd(previous, warn_on_full_buffer=False)
        theirs.close()
        their_reader.close()


def test_the_sigterm_watch_is_installed_from_the_main_thread_only() -> None:
    result: list[bool] = []
    watch = lifecycle.SigtermWatch()
    thread = threading.Thread(target=lambda: result.append(watch.install(lambda: True)))
    thread.start()
    thread.join()
    assert result == [False]
    assert watch._pipe_pid == 0
