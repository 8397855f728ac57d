"""``StreamLogWriter`` (``WRITE_MODE = "stream"``): the buffered writer's buffer, shipped to a
Redis Stream instead of the database.

The receivers only enqueue, into the very buffer of
:class:`~django_rpc_audit.writers.buffered.BufferedLogWriter` (bounded, drops counted,
failures kept first); the background thread turns each batch into stored rows and adds them to
``LOG_STREAM`` with ``XADD ... MAXLEN ~`` (a hundred per server-side script call, the calls
pipelined). ``rpc_logs_ingest`` workers
(:mod:`~django_rpc_audit.writers.ingest`) write them to the database. Once ``XADD`` has
returned, the web process may die without losing the rows.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import redis

from django_rpc_audit.writers.base import DestinationUnavailable
from django_rpc_audit.writers.buffered import BufferedLogWriter
from django_rpc_audit.writers.entry import FIELD, encode_row
from django_rpc_audit.writers.sink import event_row_values

logger = logging.getLogger(__name__)

#: Rows built between two yields of the GIL to the request threads (as the sink does).
_ROWS_PER_YIELD = 8

#: Adds ARGV[2..] to the stream KEYS[1] as entries, trimming to about ARGV[1] entries. One
#: command per chunk of entries instead of one per entry: redis-py packs a command in Python,
#: about 10 µs of the writer thread's GIL time per ``XADD``, 1 µs per entry this way.
_XADD_ALL = """
for i = 2, #ARGV do
    redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', KEYS[2], ARGV[i])
end
return #ARGV - 1
"""
#: Entries per script call: each call holds Redis for a fraction of a millisecond only.
_ENTRIES_PER_CALL = 100


class StreamUnavailable(DestinationUnavailable):
    """The log stream's Redis could not be reached (or refused the entries); retried."""


class StreamLogWriter(BufferedLogWriter):
    """Buffers call events like :class:`BufferedLogWriter`; ships them to a Redis Stream.

    ``redis_url``, ``stream`` and ``maxlen`` say where (``LOG_STREAM_REDIS_URL`` or
    ``REDIS_URL``, ``LOG_STREAM``, ``LOG_STREAM_MAXLEN``). While Redis is unreachable the
    events stay buffered and the batch is retried with backoff, exactly as the buffered writer
    does for its database. A retried batch may add some entries twice; the ingest worker
    writes each row once.

    :meth:`flush` returns once the events are in the stream, not yet in the database.
    """

    destination = "the log stream's Redis"

    def __init__(self, *, redis_url: str, stream: str, maxlen: int, **options: Any) -> None:
        self.redis_url = redis_url
        self.stream = stream
        self.maxlen = maxlen
        super().__init__(**options)

    def _reset_state(self) -> None:
        super()._reset_state()
        # Built on first use, in the process that uses it (a forked child builds its own).
        self._client: redis.Redis | None = None
        self._xadd_all: Any = None

    def _redis(self) -> redis.Redis:
        if self._client is None:
            self._client = redis.Redis.from_url(
                self.redis_url,
                socket_connect_timeout=2,
                socket_timeout=5,
                health_check_interval=30,
            )
            self._xadd_all = self._client.register_script(_XADD_ALL)
        return self._client

    def _write_batch(self, events: list[dict[str, Any]], close_on_error: bool) -> None:
        started = time.perf_counter()
        payloads = []
        for n, event in enumerate(events, 1):
            try:
                row = event_row_values(event, for_copy=True)
                payloads.append(encode_row(row, event.get("slow")))
            except Exception:
                self._give_up(event)
            if n % _ROWS_PER_YIELD == 0:
                time.sleep(0)  # let a request thread waiting for the GIL run (see the sink)
        if not payloads:
            return
        try:
            pipe = self._redis().pipeline(transaction=False)
            for start in range(0, len(payloads), _ENTRIES_PER_CALL):
                chunk = payloads[start : start + _ENTRIES_PER_CALL]
                self._xadd_all(keys=[self.stream, FIELD], args=[self.maxlen, *chunk], client=pipe)
            pipe.execute()
        except redis.RedisError as exc:
            if close_on_error and self._client is not None:
                self._client.connection_pool.disconnect()
            raise StreamUnavailable(f"{type(exc).__name__}: {exc}") from exc
        self._written += len(payloads)
        if self.observer is not None:
            self.observer.batch_written(len(payloads), time.perf_counter() - started)
