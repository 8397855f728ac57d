"""How the long-running commands stop: SIGTERM (a supervisor) or SIGINT (Ctrl-C) ends their loop.

The handlers are the command's only while it runs: :func:`stop_on_signals` puts back the ones
the process had before (the buffered writer's SIGTERM flush, a test runner's Ctrl-C), so a
command run with ``call_command()`` leaves the process as it found it. A SIGTERM the command
took is marked handled for the flush's watch (:mod:`~django_rpc_audit.writers.lifecycle`),
which would otherwise send it again to the flush handler once that is back.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

from django_rpc_audit.writers import lifecycle

#: The signals that stop a command's loop.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextmanager
def stop_on_signals(stop: Callable[[], object]) -> Iterator[bool]:
    """Within the block, SIGTERM and SIGINT call ``stop()`` (which should only ask the loop to
    end: it runs between two bytecodes of the main thread). Yields whether the handlers were
    installed: Python lets only the main thread install them, so from another thread
    (``call_command()`` in a thread) nothing changes and that thread's caller stops the loop.
    The previous handlers are restored when the block ends, however it ends. ::

        with stop_on_signals(worker.stop):
            worker.run()
    """
    if threading.current_thread() is not threading.main_thread():
        yield False
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGTERM:
            # The flush handler's watch saw this SIGTERM too: it is handled.
            lifecycle.sigterm_handled()
        stop()

    previous: dict[signal.Signals, Any] = {}
    try:
        for signum in STOP_SIGNALS:
            previous[signum] = signal.signal(signum, handler)
        yield True
    finally:
        for signum, installed in previous.items():
            # None: a handler not installed from Python, which cannot be put back; the
            # default action is the closest.
            signal.signal(signum, signal.SIG_DFL if installed is None else installed)
