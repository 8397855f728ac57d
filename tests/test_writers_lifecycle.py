"""The writers at the edges of a process, in this process; across processes (exit, SIGTERM,
fork) in ``test_writers_process.py``."""

from __future__ import annotations

import signal
import socket
import threading

import pytest

from django_rpc_audit.writers import install_sigterm_flush, lifecycle

pytestmark = pytest.mark.skipif(not hasattr(signal, "pthread_kill"), reason="POSIX signals")


def test_the_app_sets_the_sigterm_flush_and_its_watch() -> None:
    assert lifecycle._is_sigterm_flush(signal.getsignal(signal.SIGTERM))
    assert install_sigterm_flush() is True  # already installed: nothing changes
    watch = lifecycle._sigterm_watch
    current = signal.set_wakeup_fd(watch._write_fd, warn_on_full_buffer=False)
    assert current == watch._write_fd != -1


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
