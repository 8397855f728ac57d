"""``SyncLogWriter``: each event written at once, on the caller's thread and connection."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from django.db import router, transaction

from django_rpc_audit.writers import sink

logger = logging.getLogger(__name__)


class SyncLogWriter:
    """Writes each event at once, on the calling thread's database connection.

    A pending row when the call starts, completed when it finishes. Each write runs in its own
    atomic block, so a failing write inside the caller's transaction rolls back to a savepoint
    instead of breaking that transaction.
    """

    def started(self, event: dict[str, Any]) -> None:
        self._write(sink.record_started, event)

    def finished(self, event: dict[str, Any]) -> None:
        self._write(sink.record_finished, event)

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
