"""``StreamLogWriter`` (``WRITE_MODE = "stream"``): the buffered writer's buffer, shipped to a
Redis Stream instead of the database.

The receivers only enqueue, into the very buffer of
:class:`~django_rpc_audit.writers.buffered.BufferedLogWriter` (bounded, drops counted,
failures kept first); the background thread turns each batch into stored rows and adds them to
``LOG_STREAM`` with pipelined ``XADD ... MAXLEN ~``. ``rpc_logs_ingest`` workers
(:mod:`~django_rpc_audit.writers.ingest`) write them to the database. Once ``XADD`` has
returned, the web process may die without losing the rows.
"""

from __future__ import annotations

import logging
from typing import Any

import redis

from django_rpc_audit.writers.base import DestinationUnavailable
from django_rpc_audit.writers.buffered import BufferedLogWriter
from django_rpc_audit.writers.entry import FIELD, encode_row
from django_rpc_audit.writers.sink import event_row_values

logger = logging.getLogger(__name__)

#: Rows built between two yields of the GIL to the request threads (as the sink does).
_ROWS_PER_YIELD = 8


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

    def _redis(self) -> redis.Redis:
        if self._client is None:
            self._client = redis.Redis.from_url(
                self.redis_url,
                socket_connect_timeout=2,
                socket_timeout=5,
                health_check_interval=30,
            )
        return self._client

    def _write_batch(self, events: list[dict[str, Any]], close_on_error: bool) -> None:
        import time

        payloads = []
        for n, event in enumerate(events, 1):
            try:
                payloads.append(encode_row(event_row_values(event, for_copy=True)))
            except Exception:
                self._give_up(event)
            if n % _ROWS_PER_YIELD == 0:
                time.sleep(0)  # let a request thread waiting for the GIL run (see the sink)
        if not payloads:
            return
        try:
            pipe = self._redis().pipeline(transaction=False)
            for payload in payloads:
                pipe.xadd(self.stream, {FIELD: payload}, maxlen=self.maxlen, approximate=True)
            pipe.execute()
        except redis.RedisError as exc:
            if close_on_error and self._client is not None:
                self._client.connection_pool.disconnect()
            raise StreamUnavailable(f"{type(exc).__name__}: {exc}") from exc
        self._written += len(payloads)
