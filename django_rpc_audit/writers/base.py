"""What every writer shares: the :class:`LogWriter` interface and the writers' counters."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


class LogWriter(Protocol):
    """Where the built-in receivers send call events.

    ``started`` receives ``rpc_started``'s keyword arguments, ``finished`` those of
    ``rpc_finished``. A writer must never raise into the caller.
    """

    def started(self, event: dict[str, Any]) -> None: ...

    def finished(self, event: dict[str, Any]) -> None: ...


@dataclass(frozen=True, slots=True)
class WriterStats:
    """Counters of a :class:`BufferedLogWriter` since it started (in this process)."""

    #: Calls waiting in the buffer.
    buffered: int = 0
    #: Rows written: inserts and completions of pending rows (the stream writer: rows added
    #: to the log stream).
    written: int = 0
    #: Calls dropped because the buffer was full (successful ones first).
    dropped: int = 0
    #: Rows the database refused (a data error, logged); not retried.
    failed: int = 0
    #: Write attempts that failed because the database (or the log stream's Redis) was
    #: unreachable, then retried.
    retries: int = 0
    #: Bytes the buffered calls hold (``BUFFER_MAX_BYTES`` bounds it), estimated from their
    #: texts. Left out of comparisons: it depends on the events' contents, not on the policy.
    buffered_bytes: int = field(default=0, compare=False)


class DestinationUnavailable(Exception):
    """A batch could not be delivered because its destination could not be reached; the
    buffered writer keeps it and retries."""


class DatabaseUnavailable(DestinationUnavailable):
    """A batch could not be written because the database could not be reached."""


class WriterObserver(Protocol):
    """Told what a :class:`BufferedLogWriter` does, on its own thread, never on the caller's
    (the Prometheus integration's pipeline metrics are one). Must never raise."""

    def batch_written(self, rows: int, seconds: float) -> None:
        """A batch of ``rows`` rows was written in ``seconds``."""
        ...

    def counts(self, stats: WriterStats) -> None:
        """The writer's counters now; called each time its thread wakes."""
        ...
