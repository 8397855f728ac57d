"""Log writers: how call events become ``RPCLog`` rows, all in this package.

The built-in receivers hand each ``rpc_started`` / ``rpc_finished`` event to the writer
:func:`get_writer` returns; the writer decides when and where it is written, and the sink
writes it.

- :mod:`~django_rpc_audit.writers.base`: the :class:`LogWriter` interface every writer
  implements, the :class:`WriterStats` counters and the :class:`WriterObserver` that
  publishes them (Prometheus).
- :mod:`~django_rpc_audit.writers.sync`: :class:`SyncLogWriter` (``WRITE_MODE = "sync"``),
  each event written at once on the caller's thread and connection.
- :mod:`~django_rpc_audit.writers.buffered`: :class:`BufferedLogWriter` (``"buffered"``, the
  default), a bounded in-memory buffer written in batches by a background thread on its own
  connection.
- :mod:`~django_rpc_audit.writers.lifecycle`: the buffered writers at the edges of a process:
  flushed at exit (multiprocessing children included) and on ``SIGTERM``
  (:func:`install_sigterm_flush`, with a watch that makes sure its handler runs), never shared
  with a forked child.
- :mod:`~django_rpc_audit.writers.stream`: :class:`StreamLogWriter` (``"stream"``), the
  buffered writer's buffer shipped to a Redis Stream with pipelined ``XADD`` instead of the
  database.
- :mod:`~django_rpc_audit.writers.entry`: a stored row as one compact, exact stream entry,
  its layout made from the model's columns.
- :mod:`~django_rpc_audit.writers.ingest`: :class:`IngestWorker` (``rpc_logs_ingest``), a
  consumer-group worker writing the stream's rows (and their alerts) to the database, and
  :func:`stream_backlog` (the group's lag), :func:`worker_stats` (the running workers'
  counters) and :class:`IngestObserver` (what publishes them: Prometheus) for monitoring.
- :mod:`~django_rpc_audit.writers.sink`: the rows themselves; column values made safe to store,
  single-row writes and idempotent batch writes (``COPY`` on PostgreSQL). Every writer ends
  here.
- :mod:`~django_rpc_audit.writers.mysql`: the sink's batch writes on MySQL and MariaDB
  (multi-row upserts, of events and of stored rows) and which of their errors refuse a row
  rather than the connection.
- :mod:`~django_rpc_audit.writers.registry`: the process-wide writer chosen by
  ``WRITE_MODE``, :func:`use_writer`, :func:`flush` and :func:`writer_stats`.

Import the public names from this package::

    from django_rpc_audit.writers import flush, writer_stats
"""

from __future__ import annotations

from django_rpc_audit.writers.base import (
    DatabaseUnavailable,
    DestinationUnavailable,
    LogWriter,
    WriterObserver,
    WriterStats,
)
from django_rpc_audit.writers.buffered import BufferedLogWriter
from django_rpc_audit.writers.ingest import (
    IngestObserver,
    IngestStats,
    IngestWorker,
    stream_backlog,
    worker_stats,
)
from django_rpc_audit.writers.lifecycle import install_sigterm_flush
from django_rpc_audit.writers.registry import (
    flush,
    get_writer,
    use_writer,
    writer_buffers,
    writer_never_blocks,
    writer_stats,
)
from django_rpc_audit.writers.stream import StreamLogWriter, StreamUnavailable
from django_rpc_audit.writers.sync import SyncLogWriter

__all__ = [
    "BufferedLogWriter",
    "DatabaseUnavailable",
    "DestinationUnavailable",
    "IngestObserver",
    "IngestStats",
    "IngestWorker",
    "LogWriter",
    "StreamLogWriter",
    "StreamUnavailable",
    "SyncLogWriter",
    "WriterObserver",
    "WriterStats",
    "flush",
    "get_writer",
    "install_sigterm_flush",
    "stream_backlog",
    "use_writer",
    "worker_stats",
    "writer_buffers",
    "writer_never_blocks",
    "writer_stats",
]
