"""The process-wide writer: chosen by ``WRITE_MODE``, replaced within :func:`use_writer`."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

from django_rpc_audit.conf import DjangoCfgRPCConfig, get_config
from django_rpc_audit.integrations import build_writer_observer
from django_rpc_audit.writers.base import LogWriter, WriterStats
from django_rpc_audit.writers.buffered import BufferedLogWriter
from django_rpc_audit.writers.lifecycle import shutdown_timeout
from django_rpc_audit.writers.stream import StreamLogWriter
from django_rpc_audit.writers.sync import SyncLogWriter

_sync_writer = SyncLogWriter()
_buffered_writer: BufferedLogWriter | None = None
_buffered_config: DjangoCfgRPCConfig | None = None
_override: LogWriter | None = None
_writer_lock = threading.Lock()


def _buffered_options(config: DjangoCfgRPCConfig) -> dict[str, Any]:
    options: dict[str, Any] = {
        "buffer_size": config.buffer_size,
        "buffer_max_bytes": config.buffer_max_bytes,
        "batch_size": config.buffer_batch_size,
        "flush_interval": config.buffer_flush_interval,
        "max_retry_delay": config.buffer_max_retry_delay,
    }
    if config.write_mode == "stream":
        options.update(
            redis_url=config.log_stream_url,
            stream=config.log_stream,
            maxlen=config.log_stream_maxlen,
        )
    return options


def get_writer() -> LogWriter:
    """The writer the receivers use: per ``WRITE_MODE``, unless :func:`use_writer` set one."""
    if _override is not None:
        return _override
    config = get_config()
    if config.write_mode == "sync":
        return _sync_writer
    writer = _buffered_writer
    if writer is None or _buffered_config is not config:
        writer = _configure_buffered_writer(config)
    return writer


def _configure_buffered_writer(config: DjangoCfgRPCConfig) -> BufferedLogWriter:
    """Build the buffered writer, or rebuild it when its settings changed."""
    global _buffered_writer, _buffered_config
    with _writer_lock:
        old = _buffered_writer
        options = _buffered_options(config)
        built_from = _buffered_config
        if old is not None and built_from is not None and _buffered_options(built_from) == options:
            _buffered_config = config
            old.observer = build_writer_observer(config)
            return old
        kind = StreamLogWriter if config.write_mode == "stream" else BufferedLogWriter
        _buffered_writer = kind(**options)
        _buffered_writer.observer = build_writer_observer(config)
        _buffered_config = config
    if old is not None:
        old.close(shutdown_timeout())
    return _buffered_writer


@contextlib.contextmanager
def use_writer(writer: LogWriter) -> Iterator[LogWriter]:
    """Send every event to ``writer`` within the block, whatever ``WRITE_MODE`` says."""
    global _override
    previous, _override = _override, writer
    try:
        yield writer
    finally:
        _override = previous


def flush(timeout: float | None = 30.0) -> bool:
    """Write every call logged so far; True once they are all in the database (with
    ``WRITE_MODE = "stream"``: in the log stream).

    A no-op (True) with the synchronous writer. ::

        get_rpc_client().call("system.ping")
        flush()
        assert RPCLog.objects.count() == 1
    """
    writer = get_writer()
    if isinstance(writer, BufferedLogWriter):
        return writer.flush(timeout)
    return True


def writer_buffers() -> bool:
    """True when the writer in use is a buffered one (the default, or the stream writer): it
    writes on its own thread, where it can make the stored form of deferred payloads."""
    return isinstance(get_writer(), BufferedLogWriter)


def writer_never_blocks() -> bool:
    """True when handing an event to the writer in use cannot block: it only buffers."""
    return not get_config().enable_logging or isinstance(get_writer(), BufferedLogWriter)


def writer_stats() -> WriterStats:
    """Counters of the buffered writer in use (all zero with the synchronous writer)."""
    writer = get_writer()
    if isinstance(writer, BufferedLogWriter):
        return writer.stats()
    return WriterStats()
