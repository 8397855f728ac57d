"""What every writer shares: the :class:`LogWriter` interface and the writers' counters."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from django.db import InterfaceError, OperationalError


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


def is_unreachable(exc: BaseException, connection: Any) -> bool:
    """True when ``exc`` means the database cannot be used right now, not that it refused a
    row: the connection was refused, dropped or timed out, or a statement was cancelled (a
    ``statement_timeout``, a lock timeout, an administrator). Such a batch is retried with
    backoff. Django's own classes, and the driver's for errors it raised without Django's
    wrapping (a raw ``COPY`` through psycopg: ``QueryCanceled``, ``AdminShutdown``, ...).
    """
    classes: tuple[type[BaseException], ...] = (OperationalError, InterfaceError)
    driver = getattr(connection, "Database", None)
    for name in ("OperationalError", "InterfaceError"):
        driver_class = getattr(driver, name, None)
        if isinstance(driver_class, type) and issubclass(driver_class, BaseException):
            classes += (driver_class,)
    return isinstance(exc, classes)
