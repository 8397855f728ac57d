"""Test helpers: see the rows of calls your tests make, without sleeping.

With the buffered writer (the default ``WRITE_MODE``) rows are written by a background thread
on its own database connection: outside your test's transaction, and on SQLite's in-memory test
database not at all reliably. In tests, capture the calls instead and write them on demand, on
the test's own connection (inside its transaction, rolled back with it)::

    from django_rpc_audit.testing import capture_rpc_logs

    with capture_rpc_logs() as writer:
        client.get("/notify/")
        writer.flush()
        assert RPCLog.objects.get().status == "success"

With pytest, the plugin this package registers (entry point ``pytest11``) gives the same as the
``rpc_log_writer`` fixture::

    def test_notify(client, rpc_log_writer):
        client.get("/notify/")
        rpc_log_writer.flush()
        assert RPCLog.objects.get().status == "success"

Alternatively set ``"WRITE_MODE": "sync"`` in your test settings: each row is then written at
once, on the test's connection.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from django_rpc_audit.writers import BufferedLogWriter, use_writer

__all__ = ["capture_rpc_logs", "rpc_log_writer"]


@contextlib.contextmanager
def capture_rpc_logs(*, buffer_size: int = 100_000) -> Iterator[BufferedLogWriter]:
    """Within the block, buffer every call's events; ``flush()`` writes them on this thread.

    Nothing is written in the background. Events still buffered when the block ends are
    discarded (the test's transaction would roll them back anyway).
    """
    writer = BufferedLogWriter(buffer_size=buffer_size, background=False)
    with use_writer(writer):
        yield writer


try:
    import pytest
except ImportError:  # pragma: no cover  (the helpers above work without pytest)
    pass
else:

    @pytest.fixture
    def rpc_log_writer() -> Iterator[BufferedLogWriter]:
        """A writer that buffers the test's calls until ``rpc_log_writer.flush()``.

        ``flush()`` writes them on the test's database connection, so use it with the ``db``
        fixture (or ``django_db`` mark) as for any ORM access.
        """
        with capture_rpc_logs() as writer:
            yield writer
