"""The delivery thread: delivers alerts in the background of every process that logs calls.

Started by the first batch of log rows a process writes while ``WEBHOOKS`` is set (never at
import, so a ``--preload``-ed master forks no thread), woken when alerts are committed, and
otherwise polling every ``WEBHOOK_POLL_INTERVAL`` seconds for due retries, digests, and rows
left by processes that died. Each process's thread claims rows with ``SKIP LOCKED``, so they
share the work. The ``rpc_webhooks_deliver`` command runs the same loop in the foreground.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable

from django.db import connections

from django_rpc_audit.conf import get_config

logger = logging.getLogger(__name__)

#: Longest pause between passes while the database or an endpoint keeps failing.
MAX_ERROR_DELAY = 30.0


def run_loop(
    stop: threading.Event, wake: threading.Event, *, on_pass: Callable[[object], None] | None = None
) -> None:
    """Deliver until ``stop`` is set: passes back to back while there is work, else wait for
    ``wake`` or the poll interval."""
    from django_rpc_audit.alerts.delivery import BATCH_SIZE, deliver_due

    error_delay = 0.0
    while not stop.is_set():
        try:
            report = deliver_due()
        except Exception:
            error_delay = min(max(1.0, error_delay * 2), MAX_ERROR_DELAY)
            logger.exception("Webhook delivery pass failed; next in %.0f s.", error_delay)
            connections.close_all()  # a broken connection is reopened on the next pass
            stop.wait(error_delay)
            continue
        error_delay = 0.0
        if on_pass is not None:
            on_pass(report)
        if report.claimed >= BATCH_SIZE:
            continue  # more may be due right now
        wake.wait(get_config().webhook_poll_interval)
        wake.clear()


class DeliveryWorker:
    """One process's background delivery thread."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.stop = threading.Event()
        self.wake = threading.Event()
        self.thread = threading.Thread(
            target=self._run, name="django-rpc-audit-webhooks", daemon=True
        )

    def _run(self) -> None:
        try:
            run_loop(self.stop, self.wake)
        finally:
            connections.close_all()


_worker: DeliveryWorker | None = None
_lock = threading.Lock()


def ensure_worker() -> None:
    """Start this process's delivery thread unless it runs (a forked child starts its own)."""
    global _worker
    worker = _worker
    if worker is not None and worker.pid == os.getpid() and worker.thread.is_alive():
        return
    with _lock:
        worker = _worker
        if worker is not None and worker.pid == os.getpid() and worker.thread.is_alive():
            return
        _worker = DeliveryWorker()
        _worker.thread.start()


def wake() -> None:
    """Tell the delivery thread that alerts were just committed."""
    worker = _worker
    if worker is not None and worker.pid == os.getpid():
        worker.wake.set()


def stop_worker(timeout: float | None = 5.0) -> None:
    """Stop this process's delivery thread (tests, shutdown)."""
    global _worker
    with _lock:
        worker, _worker = _worker, None
    if worker is not None and worker.pid == os.getpid():
        worker.stop.set()
        worker.wake.set()
        worker.thread.join(timeout)


def _after_fork_in_child() -> None:
    global _lock
    _lock = threading.Lock()


if hasattr(os, "register_at_fork"):  # not on Windows
    os.register_at_fork(after_in_child=_after_fork_in_child)
