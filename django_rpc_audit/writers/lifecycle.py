"""The buffered writers at the edges of a process: fork, exit and ``SIGTERM``.

- A forked child starts afresh: none of the parent's threads, none of its buffer.
- At exit every writer writes what it holds: ``atexit``, and a finalizer in the
  ``multiprocessing`` children, which end through ``os._exit``.
- On ``SIGTERM`` a handler writes it, then does what ``SIGTERM`` did before
  (:func:`install_sigterm_flush`); a watch makes sure that handler runs (:class:`SigtermWatch`).
- The writers' threads leave the stop signals to the main thread, where Python handles them.
"""

from __future__ import annotations

import _thread
import atexit
import contextlib
import os
import select
import signal
import threading
import time
import weakref
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING

from django_rpc_audit.conf import get_config

if TYPE_CHECKING:
    from django_rpc_audit.writers.buffered import BufferedLogWriter

#: Signals a process is asked to stop or act with, which Python handles in its main thread.
_MAIN_THREAD_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2")

#: Seconds between writes once SIGTERM has come: what finishes meanwhile is written at once.
_DRAINING_FLUSH_INTERVAL = 0.01

#: Seconds the watch gives the main thread to start the SIGTERM handler before it sends the
#: main thread the signal again.
_SIGTERM_NUDGE_INTERVAL = 0.5

_live_writers: weakref.WeakSet[BufferedLogWriter] = weakref.WeakSet()


def track(writer: BufferedLogWriter) -> None:
    """Count ``writer`` among those written at exit and on ``SIGTERM``, and reset after fork."""
    _live_writers.add(writer)


def shutdown_timeout() -> float:
    try:
        return get_config().buffer_shutdown_timeout
    except Exception:
        return 10.0  # the setting's default, when the settings themselves are broken


def leave_signals_to_the_main_thread() -> None:
    """Block the stop signals in the calling (background) thread, so the kernel hands them to
    the main thread. Python runs its handlers (the ``SIGTERM`` flush) in the main thread, and
    only once that thread runs Python code again: a signal delivered to another thread does
    not interrupt a main thread blocked in a system call (a lock or semaphore wait), which may
    then never notice it."""
    if not hasattr(signal, "pthread_sigmask"):  # Windows
        return
    stop = {getattr(signal, name) for name in _MAIN_THREAD_SIGNALS if hasattr(signal, name)}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop)


class SigtermWatch:
    """Makes sure the ``SIGTERM`` handler runs once ``SIGTERM`` has come.

    CPython's own handler, in C, only notes a signal; the Python handler runs when the main
    thread next runs Python code. A main thread that the signal did not interrupt in a wait
    (it came just before the wait began, or to another thread) waits on, maybe forever: a
    ``multiprocessing.Pool`` worker that ``terminate()`` signals while it waits for work, on
    the queue's lock which the pool holds and never gives back. With ``SIGTERM``'s default
    action the kernel would have ended the worker; with a Python handler, the pool waits for it
    forever.

    The C handler also writes the signal's number to the wakeup file descriptor
    (:func:`signal.set_wakeup_fd`) at once. The watch sets a pipe of its own there, unless
    something else (an event loop) has set one, and a thread reads it: a ``SIGTERM`` whose
    handler has not started after ``_SIGTERM_NUDGE_INTERVAL`` is sent again, to the main
    thread alone, which interrupts its wait, so Python runs the handler. The handler calls
    :meth:`handler_started` first, which takes what the watch has not read yet under the
    watch's lock: a ``SIGTERM`` the handler has seen is never sent again.

    One pipe per process: a forked child sets a new one (:meth:`after_fork_in_child`), or its
    signals would reach the parent's watch.
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._read_fd = -1
        self._write_fd = -1
        self._pipe_pid = 0  # the process whose pipe is the wakeup fd; 0: none
        self._thread_pid = 0  # the process whose thread reads the pipe
        self._since: float | None = None  # when the SIGTERM not yet handled was read
        self._is_ours: Callable[[], bool] = lambda: False

    def install(self, is_ours: Callable[[], bool]) -> bool:
        """Set the watch's pipe as the wakeup fd; from the main thread. ``is_ours`` says
        whether the handler the watch is for is still ``SIGTERM``'s (a server may replace it).
        False if another wakeup fd is set, or not the main thread."""
        self._is_ours = is_ours
        return self._set_pipe()

    def _set_pipe(self) -> bool:
        read_fd, write_fd = os.pipe()
        os.set_blocking(read_fd, False)
        os.set_blocking(write_fd, False)  # the C handler must never block on a full pipe
        try:
            previous = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        except ValueError:  # not the main thread: nothing changed
            os.close(read_fd)
            os.close(write_fd)
            return False
        old_fds: tuple[int, ...] = (self._read_fd, self._write_fd)
        if previous in (-1, self._write_fd):
            self._read_fd, self._write_fd, self._pipe_pid = read_fd, write_fd, os.getpid()
        else:
            signal.set_wakeup_fd(previous)  # someone else's (an event loop's): theirs it stays
            old_fds = (read_fd, write_fd, *old_fds)
            self._read_fd = self._write_fd = -1
            self._pipe_pid = 0
        self._since = None
        self._thread_pid = 0  # a thread for the new pipe (the old one's sees the change)
        # No longer the wakeup fd (its thread, if any, sees the change and ends).
        for fd in old_fds:
            if fd != -1:
                with contextlib.suppress(OSError):
                    os.close(fd)
        return self._pipe_pid != 0

    def start(self) -> None:
        """Start the thread that reads the pipe, once per process: with the first writer
        thread, since only a writer holds anything to flush.

        A ``multiprocessing`` child sets its pipe again here, from its main thread, if the
        handler is still ``SIGTERM``'s and no other wakeup fd is set: a ``forkserver``'s
        child, whose server resets the wakeup fd after forking it (after the fork hook set
        the child's pipe). Only there: finding out whether another wakeup fd is set means
        setting ours and putting theirs back, and a signal that came in between would be told
        to our pipe instead of theirs (an event loop's, which runs its signal callbacks from
        what it reads)."""
        pid = os.getpid()
        with self._lock:
            if self._thread_pid == pid:
                return
            if (
                threading.current_thread() is threading.main_thread()
                and _in_a_multiprocessing_child()
                and self._is_ours()
            ):
                self._set_pipe()
            if self._pipe_pid != pid:
                return
            self._thread_pid = pid
            read_fd = self._read_fd
        try:
            threading.Thread(
                target=self._run,
                args=(read_fd,),
                name="django-rpc-audit-sigterm-watch",
                daemon=True,
            ).start()
        except RuntimeError:  # no new threads at interpreter shutdown
            self._thread_pid = 0

    def handler_started(self) -> None:
        """The ``SIGTERM`` handler is running: what the watch holds, or has yet to read, is
        handled. Called first by the handler, on the main thread."""
        # An RLock, with a timeout: the handler may interrupt itself (a second SIGTERM).
        if not self._lock.acquire(timeout=1.0):
            return
        try:
            if self._pipe_pid == os.getpid():
                self._read()
            self._since = None
        finally:
            self._lock.release()

    def after_fork_in_child(self) -> None:
        """In a forked child: a lock of its own, and a pipe of its own if the parent's was
        the wakeup fd; its thread starts with the child's first writer thread."""
        self._lock = threading.RLock()
        self._since = None
        if self._pipe_pid and self._pipe_pid != os.getpid():
            # Inherited: the parent's watch reads that pipe. Set a new one (the thread that
            # forked is this child's main thread).
            self._set_pipe()

    def _read(self) -> bool:
        """Read what the pipe holds, under the lock; True if a ``SIGTERM`` was in it."""
        came = False
        while True:
            try:
                data = os.read(self._read_fd, 4096)
            except OSError:  # empty (BlockingIOError), or closed
                return came
            if not data:
                return came
            came = came or signal.SIGTERM in data

    def _run(self, read_fd: int) -> None:
        leave_signals_to_the_main_thread()
        readable = select.poll()  # not select(): any descriptor number
        readable.register(read_fd, select.POLLIN)
        while True:
            since = self._since
            wait = None if since is None else since + _SIGTERM_NUDGE_INTERVAL - time.monotonic()
            readable.poll(None if wait is None else max(wait * 1000, 0.0))
            with self._lock:
                if read_fd != self._read_fd:
                    return  # replaced
                # Only a SIGTERM that the flush handler is to handle is watched: one that
                # another handler took (a command's, a server's) must not be sent again once
                # the flush handler is SIGTERM's again.
                if self._read() and self._since is None and self._ours():
                    self._since = time.monotonic()
                elif (
                    self._since is not None
                    and time.monotonic() - self._since >= _SIGTERM_NUDGE_INTERVAL
                ):
                    self._nudge()

    def _ours(self) -> bool:
        try:
            return self._is_ours()
        except Exception:
            return False

    def _nudge(self) -> None:
        """Under the lock: send ``SIGTERM`` to the main thread alone, while it is the handler's."""
        main = threading.main_thread().ident
        if not self._ours() or main is None:
            self._since = None  # another handler's signal, or no main thread left
            return
        with contextlib.suppress(OSError, ValueError):
            signal.pthread_kill(main, signal.SIGTERM)
        self._since = time.monotonic()


def _in_a_multiprocessing_child() -> bool:
    import multiprocessing

    return multiprocessing.parent_process() is not None


_sigterm_watch = SigtermWatch()


def _before_fork() -> None:
    for writer in list(_live_writers):
        writer._before_fork()


def _after_fork_in_parent() -> None:
    for writer in list(_live_writers):
        writer._after_fork_in_parent()


def _after_fork_in_child() -> None:
    _sigterm_watch.after_fork_in_child()
    for writer in list(_live_writers):
        writer._after_fork_in_child()


if hasattr(os, "register_at_fork"):  # not on Windows
    os.register_at_fork(
        before=_before_fork,
        after_in_parent=_after_fork_in_parent,
        after_in_child=_after_fork_in_child,
    )

_atexit_registered = False
_finalizer_pid: int | None = None


def prepare_process() -> None:
    """What a process needs once a writer's thread starts in it: the exit flush, and the
    thread watching for ``SIGTERM``.

    The exit flush runs through ``atexit`` at interpreter exit. A ``multiprocessing`` child
    (fork and forkserver: a ``Process``, a ``Pool`` worker) ends through ``os._exit``, which
    runs no ``atexit`` handler; it runs multiprocessing's own finalizers first, so each child
    registers one.
    """
    global _atexit_registered, _finalizer_pid
    if not _atexit_registered:
        _atexit_registered = True  # inherited by forked children, as the handler itself is
        atexit.register(_close_all_at_exit)
    pid = os.getpid()
    if _finalizer_pid != pid:
        _finalizer_pid = pid
        if _in_a_multiprocessing_child():
            import multiprocessing.util

            # Priority >= 0: run before the child waits for its own children and exits.
            multiprocessing.util.Finalize(None, _close_all_at_exit, exitpriority=10)
    _sigterm_watch.start()


#: True once this process runs its exit flush: a SIGTERM meanwhile lets it finish.
_exiting = False


def _close_all_at_exit() -> None:
    global _exiting
    _exiting = True
    timeout = shutdown_timeout()
    for writer in list(_live_writers):
        if writer._thread is not None:
            writer.close(timeout)


def _flush_all_for_sigterm(timeout: float) -> None:
    """Flush every writer from a helper thread; the main thread waits at most ``timeout``.

    Not on the main thread itself: the handler runs there, between two bytecodes of whatever
    it interrupted, possibly inside the writer holding a lock the flush needs (a non-reentrant
    lock: a deadlock). From a helper thread, the worst case is the wait running out.
    """

    def flush_all() -> None:
        try:
            for writer in list(_live_writers):
                if writer._thread is not None:
                    writer.flush_interval = min(writer.flush_interval, _DRAINING_FLUSH_INTERVAL)
                    writer.flush(timeout)
        finally:
            done.release()

    done = _thread.allocate_lock()  # a lock nobody else ever holds
    done.acquire()
    try:
        # The low-level thread: threading.Thread.start() takes threading's own locks.
        _thread.start_new_thread(flush_all, ())
    except RuntimeError:  # no new threads at interpreter shutdown
        done.release()
        return
    done.acquire(timeout=timeout + 1.0)


def install_sigterm_flush() -> bool:
    """On ``SIGTERM``, write what the writers hold, then do what ``SIGTERM`` did before.

    Called by the app's ``ready()`` in the main thread. Servers that exit normally on
    ``SIGTERM`` (gunicorn workers) are covered by the exit flush already; uvicorn shuts down
    gracefully and then re-raises ``SIGTERM`` with the default action, which kills the process
    without exit handlers, and a bare process dies the same way. The previous handler (the
    server's, when it installed one first) still runs afterwards, and the writers keep writing
    every few milliseconds while the server finishes its requests. The writing is done by a
    helper thread the handler waits for (at most ``BUFFER_SHUTDOWN_TIMEOUT``), never by the
    interrupted main thread itself; a ``SIGTERM`` during the exit flush lets that flush finish.
    A :class:`SigtermWatch` makes sure the handler runs even when the signal did not interrupt
    the main thread's wait. False if not installed (not the main thread, or no ``SIGTERM`` on
    this platform).
    """
    if not hasattr(signal, "SIGTERM") or threading.current_thread() is not threading.main_thread():
        return False
    previous = signal.getsignal(signal.SIGTERM)
    if _is_sigterm_flush(previous):
        return True  # already installed

    def flush_on_sigterm(signum: int, frame: FrameType | None) -> None:
        _sigterm_watch.handler_started()
        if _exiting:
            # The exit flush is running (atexit, or a multiprocessing child's finalizer, as
            # when Pool.terminate() SIGTERMs a worker that is leaving anyway): let it end.
            return
        _flush_all_for_sigterm(shutdown_timeout())
        if callable(previous):
            previous(signum, frame)
        elif previous in (signal.SIG_DFL, None):
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)

    flush_on_sigterm._rpc_audit_flush = True  # type: ignore[attr-defined]
    signal.signal(signal.SIGTERM, flush_on_sigterm)
    if hasattr(signal, "pthread_kill"):  # not on Windows
        _sigterm_watch.install(lambda: _is_sigterm_flush(signal.getsignal(signal.SIGTERM)))
    return True


def sigterm_handled() -> None:
    """Tell the watch that a ``SIGTERM`` handler of the package's other than the flush has run
    (a command's stop, :func:`~django_rpc_audit.management.stopping.stop_on_signals`), so that
    it never sends that ``SIGTERM`` again once the flush handler is back. From that handler,
    on the main thread."""
    _sigterm_watch.handler_started()


def _is_sigterm_flush(handler: object) -> bool:
    return bool(getattr(handler, "_rpc_audit_flush", False))
