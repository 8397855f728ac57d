"""Log writers turn call events into ``RPCLog`` rows; receivers hand every event to one."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

from django.db import router, transaction

from django_rpc_audit.querysets import RPCLogQuerySet

logger = logging.getLogger(__name__)


class LogWriter(Protocol):
    """Where the built-in receivers send call events.

    ``started`` receives ``rpc_started``'s keyword arguments, ``finished`` those of
    ``rpc_finished``. A writer must never raise into the caller.
    """

    def started(self, event: dict[str, Any]) -> None: ...

    def finished(self, event: dict[str, Any]) -> None: ...


class SyncLogWriter:
    """Writes each event at once, on the calling thread's database connection.

    A pending row when the call starts, completed when it finishes. Each write runs in its own
    atomic block, so a failing write inside the caller's transaction rolls back to a savepoint
    instead of breaking that transaction.
    """

    def started(self, event: dict[str, Any]) -> None:
        self._write(RPCLogQuerySet.record_started, event)

    def finished(self, event: dict[str, Any]) -> None:
        self._write(RPCLogQuerySet.record_finished, event)

    @staticmethod
    def _write(operation: Callable[..., object], event: dict[str, Any]) -> None:
        from django_rpc_audit.models import RPCLog

        try:
            alias = router.db_for_write(RPCLog)
            with transaction.atomic(using=alias):
                operation(RPCLog.objects.using(alias), **event)
        except Exception:
            # A lost pending row is written whole when the call finishes (record_finished).
            logger.exception(
                "Could not write the RPC log row of %s (%s, %s).",
                event.get("method"),
                event.get("correlation_id"),
                event.get("status", "pending"),
            )


_sync_writer = SyncLogWriter()


def get_writer() -> LogWriter:
    """The writer the receivers use."""
    return _sync_writer
