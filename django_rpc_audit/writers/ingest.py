"""The ingest worker: reads the log stream in a consumer group and writes the rows.

``manage.py rpc_logs_ingest`` runs one :class:`IngestWorker`; run as many as you like, on any
hosts: the consumer group shares the entries among them. Each batch is read with
``XREADGROUP``, written in one transaction (``COPY`` on PostgreSQL), and acknowledged
(``XACK``) only after the commit, so a worker killed at any point loses nothing: its entries
stay pending, and it re-reads them when it starts again, or another worker claims them
(``XAUTOCLAIM``) once they have been idle for ``INGEST_CLAIM_IDLE_SECONDS``. Writing a row
twice is harmless: row ids are deterministic and the sink's writes idempotent.

The next batch is read and decoded while the database writes the previous one (a writer
thread holds the database connection). An entry that cannot be decoded, a row the database
refuses, and an entry delivered ``INGEST_MAX_DELIVERIES`` times without being acknowledged
go to the dead-letter stream ``<LOG_STREAM>:dead`` with the reason, and are acknowledged.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import socket
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import redis
from django.db import DatabaseError, connections, router

from django_rpc_audit.alerts.slow import SlowVerdict
from django_rpc_audit.conf import DjangoCfgRPCConfig, get_config
from django_rpc_audit.writers.base import is_unreachable
from django_rpc_audit.writers.entry import FIELD, MalformedEntry, decode_entry
from django_rpc_audit.writers.sink import write_rows

logger = logging.getLogger(__name__)

#: Suffix of the dead-letter stream's name.
DEAD_LETTER_SUFFIX = ":dead"
#: Longest reason kept with a dead letter.
_MAX_REASON_CHARS = 1000
_FIRST_RETRY_DELAY = 0.1
_MAX_RETRY_DELAY = 5.0

_Entry = tuple[str, dict[str, Any] | None]


@dataclass(frozen=True, slots=True)
class IngestStats:
    """What an :class:`IngestWorker` has done since it started, and the stream's backlog.

    The counters are this worker's own; ``lag`` and ``pending`` are the consumer group's, as
    of ``backlog_at`` (refreshed every few seconds, ``None`` before the first refresh).
    """

    #: The worker's consumer name in the group.
    consumer: str = ""
    #: Rows written (committed) to the database.
    rows: int = 0
    #: Entries acknowledged: written, dead-lettered or found trimmed.
    acked: int = 0
    #: Transactions committed.
    batches: int = 0
    #: Entries taken over from other consumers (``XAUTOCLAIM``).
    claimed: int = 0
    #: Entries moved to the dead-letter stream.
    dead_lettered: int = 0
    #: Pending entries the stream had already trimmed (``LOG_STREAM_MAXLEN``): rows lost.
    trimmed: int = 0
    #: Write attempts that failed because the database was unreachable, then retried.
    retries: int = 0
    #: Rows per second over the last stats interval.
    rows_per_second: float = 0.0
    #: Entries added to the stream but not yet delivered to any worker of the group.
    lag: int | None = None
    #: Entries delivered to a worker of the group and not yet acknowledged.
    pending: int | None = None
    #: ``time.time()`` of the backlog figures.
    backlog_at: float | None = None


class IngestObserver(Protocol):
    """Told what an :class:`IngestWorker` does (the Prometheus integration's ingest metrics),
    on the worker's threads. Must never raise."""

    def batch_written(self, rows: int, seconds: float) -> None:
        """A batch of ``rows`` rows was committed; its transaction took ``seconds``."""
        ...

    def counts(self, stats: IngestStats) -> None:
        """The worker's counters and the group's backlog, every ``stats_interval`` seconds."""
        ...


def stream_backlog(client: redis.Redis, stream: str, group: str) -> tuple[int | None, int]:
    """``(lag, pending)`` of ``group`` on ``stream``: entries not yet delivered, and delivered
    but not acknowledged. ``lag`` is ``None`` when Redis cannot tell (entries were trimmed or
    deleted meanwhile); ``(None, 0)`` when the group does not exist yet.

    Cheap (``XINFO GROUPS``): what a metrics integration polls.
    """
    try:
        groups = client.xinfo_groups(stream)
    except redis.ResponseError:  # no such stream
        return None, 0
    for info in groups:
        name = info.get("name")
        if isinstance(name, bytes):
            name = name.decode()
        if name == group:
            lag = info.get("lag")
            return (None if lag is None else int(lag)), int(info.get("pending", 0))
    return None, 0


@dataclass
class _Batch:
    #: Stream ids to acknowledge once the rows are committed.
    ids: list[str]
    rows: list[dict[str, Any]]
    #: Entry id of each row, for dead-lettering a row the database refuses.
    row_ids: list[str]
    payloads: dict[str, Any] = field(default_factory=dict)
    #: The slow verdicts of the slow calls, by row id (for their ``rpc.slow`` alerts).
    slow: dict[str, SlowVerdict] = field(default_factory=dict)


class DatabaseDown(Exception):
    """The database could not be reached; the batch is retried."""


class IngestWorker:
    """One consumer of the log stream's consumer group.

    Build it from the settings with :meth:`from_config`, then :meth:`run` it until
    :meth:`stop`::

        worker = IngestWorker.from_config()
        worker.run()  # returns once stop() was called and the last batch is written

    :meth:`stats` is safe to call from any thread; :func:`worker_stats` gives those of every
    worker running in the process.
    """

    #: The workers whose :meth:`run` is under way in this process.
    running: ClassVar[weakref.WeakSet[IngestWorker]] = weakref.WeakSet()

    def __init__(
        self,
        *,
        redis_url: str,
        stream: str,
        group: str,
        consumer: str | None = None,
        batch_size: int = 2_000,
        block_ms: int = 1_000,
        claim_idle_seconds: float = 60.0,
        max_deliveries: int = 5,
        stats_interval: float = 5.0,
        using: str | None = None,
    ) -> None:
        self.redis_url = redis_url
        self.stream = stream
        self.group = group
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}"
        self.dead_letter_stream = f"{stream}{DEAD_LETTER_SUFFIX}"
        self.batch_size = batch_size
        self.block_ms = block_ms
        self.claim_idle_ms = max(1, int(claim_idle_seconds * 1000))
        self.max_deliveries = max_deliveries
        self.stats_interval = stats_interval
        self.using = using
        #: Told the worker's counters and batch timings (Prometheus metrics).
        self.observer: IngestObserver | None = None
        self._stop = threading.Event()
        self._client: redis.Redis = redis.Redis.from_url(
            redis_url, socket_connect_timeout=5, socket_timeout=max(10.0, block_ms / 1000 + 5)
        )
        self._counts = dict.fromkeys(
            ("rows", "acked", "batches", "claimed", "dead_lettered", "trimmed", "retries"), 0
        )
        self._counts_lock = threading.Lock()
        self._rate = 0.0
        self._backlog: tuple[int | None, int | None, float | None] = (None, None, None)
        self._rate_mark = (time.monotonic(), 0)
        # One batch written while the next one is read: a bounded hand-off.
        self._batches: queue.Queue[_Batch | None] = queue.Queue(maxsize=1)
        self._writer_error: BaseException | None = None
        self._database_down = threading.Event()
        self._next_claim = 0.0

    @classmethod
    def from_config(
        cls, config: DjangoCfgRPCConfig | None = None, **overrides: Any
    ) -> IngestWorker:
        """A worker configured by ``DJANGO_CFG_RPC`` (``LOG_STREAM``, ``INGEST_*``)."""
        config = config or get_config()
        options: dict[str, Any] = {
            "redis_url": config.log_stream_url,
            "stream": config.log_stream,
            "group": config.ingest_group,
            "batch_size": config.ingest_batch_size,
            "claim_idle_seconds": config.ingest_claim_idle_seconds,
            "max_deliveries": config.ingest_max_deliveries,
        }
        options.update({key: value for key, value in overrides.items() if value is not None})
        worker = cls(**options)
        from django_rpc_audit.integrations import build_ingest_observer

        worker.observer = build_ingest_observer(config)
        return worker

    def __repr__(self) -> str:
        return f"<IngestWorker {self.consumer} on {self.stream}/{self.group}>"

    # -- running --------------------------------------------------------------------------------

    def stop(self) -> None:
        """Finish the batch in hand, write it, and return from :meth:`run`."""
        self._stop.set()

    def run(self, on_stats: Callable[[IngestStats], None] | None = None) -> None:
        """Read, write and acknowledge batches until :meth:`stop` is called.

        ``on_stats`` is called with :meth:`stats` every ``stats_interval`` seconds (what the
        command prints). Raises if the writer thread failed on something other than an
        unreachable database.
        """
        while not self._stop.is_set():
            try:
                self.ensure_group()
                break
            except redis.ConnectionError as exc:  # Redis not up yet: wait for it
                self._redis_error("reach the log stream's Redis", exc)
        IngestWorker.running.add(self)
        writer = threading.Thread(target=self._write_loop, name="rpc-audit-ingest", daemon=True)
        writer.start()
        next_stats = time.monotonic() + self.stats_interval
        try:
            # Entries this consumer was given before a crash or restart come first.
            self._read_loop(start="0")
            self._read_loop(start=">", on_stats=on_stats, next_stats=next_stats)
        finally:
            if writer.is_alive():
                self._batches.put(None)
                writer.join()
            IngestWorker.running.discard(self)
            self._refresh_backlog()
            if on_stats is not None:
                on_stats(self.stats())
        if self._writer_error is not None:
            raise self._writer_error

    def ensure_group(self) -> None:
        """Create the stream and the consumer group if they do not exist (idempotent)."""
        try:
            self._client.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def _read_loop(
        self,
        *,
        start: str,
        on_stats: Callable[[IngestStats], None] | None = None,
        next_stats: float = 0.0,
    ) -> None:
        own_pending = start != ">"
        cursor = start
        while not self._stop.is_set() and self._writer_error is None:
            reporting = on_stats is not None or self.observer is not None
            if reporting and time.monotonic() >= next_stats:
                self._refresh_backlog()
                if on_stats is not None:
                    on_stats(self.stats())
                next_stats = time.monotonic() + self.stats_interval
            if self._database_down.is_set():
                # No point reading more while the batch in hand cannot be written.
                self._stop.wait(0.1)
                continue
            if not own_pending and time.monotonic() >= self._next_claim:
                self._claim_idle()
                self._next_claim = time.monotonic() + self.claim_idle_ms / 2000
            try:
                reply: Any = self._client.xreadgroup(
                    self.group,
                    self.consumer,
                    {self.stream: cursor},
                    count=self.batch_size,
                    block=None if own_pending else self.block_ms,
                )
            except redis.RedisError as exc:
                self._redis_error("read the log stream", exc)
                continue
            entries = reply[0][1] if reply else []
            if own_pending:
                if not entries:
                    return
                cursor = _id_text(entries[-1][0])
            if entries:
                self._hand_over(entries)

    def _redis_error(self, action: str, exc: Exception) -> None:
        if isinstance(exc, redis.ResponseError) and "NOGROUP" in str(exc):
            with contextlib.suppress(redis.RedisError):
                self.ensure_group()  # the stream was deleted: start afresh
            return
        logger.warning("Could not %s (%s); retrying.", action, exc)
        self._stop.wait(1.0)

    def _hand_over(self, entries: Sequence[Any]) -> None:
        """Decode ``entries`` into a batch and queue it for the writer thread."""
        batch = _Batch(ids=[], rows=[], row_ids=[])
        dead: list[tuple[str, Any, str]] = []
        trimmed: list[str] = []
        by_id: dict[str, int] = {}
        for raw_id, fields in entries:
            entry_id = _id_text(raw_id)
            batch.ids.append(entry_id)
            if fields is None:  # trimmed from the stream while pending with us
                trimmed.append(entry_id)
                continue
            payload = fields.get(FIELD.encode()) if isinstance(fields, dict) else None
            if payload is None:
                dead.append((entry_id, fields, f"no {FIELD!r} field"))
                continue
            try:
                row, slow = decode_entry(payload)
            except MalformedEntry as exc:
                dead.append((entry_id, fields, f"malformed entry: {exc}"))
                continue
            if slow is not None:
                batch.slow[row["id"]] = slow
            # One row per call in a batch (an upsert may touch a row once): the finished row
            # wins over the pending one; a row sent twice (a retried XADD) is written once.
            position = by_id.get(row["id"])
            if position is None:
                by_id[row["id"]] = len(batch.rows)
                batch.rows.append(row)
                batch.row_ids.append(entry_id)
            elif row.get("status", "pending") != "pending":
                batch.rows[position] = row
                batch.row_ids[position] = entry_id
            batch.payloads[entry_id] = payload
        self._lost_to_trimming(len(trimmed))
        for entry_id, fields, reason in dead:
            self._dead_letter(entry_id, fields, reason)
        self._put(batch)

    def _lost_to_trimming(self, count: int) -> None:
        if count:
            self._count("trimmed", count)
            logger.error(
                "%d pending log stream entries were trimmed (LOG_STREAM_MAXLEN) before they "
                "were ingested: their rows are lost.",
                count,
            )

    def _put(self, batch: _Batch) -> None:
        while True:
            try:
                self._batches.put(batch, timeout=0.5)
                return
            except queue.Full:
                if self._writer_error is not None:
                    return

    # -- claiming entries of dead consumers -------------------------------------------------------

    def _claim_idle(self) -> None:
        """Dead-letter entries delivered too often, then claim the other idle ones."""
        try:
            stale: Any = self._client.xpending_range(
                self.stream,
                self.group,
                min="-",
                max="+",
                count=self.batch_size,
                idle=self.claim_idle_ms,
            )
            for info in stale:
                if info["times_delivered"] >= self.max_deliveries:
                    entry_id = _id_text(info["message_id"])
                    found = self._client.xrange(self.stream, entry_id, entry_id)
                    fields = found[0][1] if found else None
                    self._dead_letter(
                        entry_id,
                        fields,
                        f"delivered {info['times_delivered']} times without being acknowledged "
                        f"(last consumer {_id_text(info['consumer'])})",
                    )
            reply: Any = self._client.xautoclaim(
                self.stream,
                self.group,
                self.consumer,
                min_idle_time=self.claim_idle_ms,
                start_id="0-0",
                count=self.batch_size,
            )
        except redis.RedisError as exc:
            self._redis_error("claim idle log stream entries", exc)
            return
        entries = reply[1] if len(reply) > 1 else []
        deleted = reply[2] if len(reply) > 2 else []
        # Redis 7 drops them from the pending list itself.
        self._lost_to_trimming(len(deleted))
        if entries:
            self._count("claimed", len(entries))
            logger.info("Claimed %d idle log stream entries.", len(entries))
            self._hand_over(entries)

    def _dead_letter(self, entry_id: str, fields: Any, reason: str) -> None:
        payload = fields.get(FIELD.encode()) if isinstance(fields, dict) else None
        message: dict[Any, Any] = {
            "id": entry_id,
            "reason": reason[:_MAX_REASON_CHARS],
            "consumer": self.consumer,
        }
        if payload is not None:
            message[FIELD] = payload
        try:
            pipe = self._client.pipeline(transaction=True)
            pipe.xadd(self.dead_letter_stream, message)
            pipe.xack(self.stream, self.group, entry_id)
            pipe.execute()
        except redis.RedisError as exc:
            # Not acknowledged: it is dead-lettered again on a later claim.
            logger.warning("Could not dead-letter log stream entry %s: %s", entry_id, exc)
            return
        self._count("dead_lettered", 1)
        self._count("acked", 1)
        logger.error(
            "Log stream entry %s moved to %s: %s", entry_id, self.dead_letter_stream, reason
        )

    # -- the writer thread ------------------------------------------------------------------------

    def _write_loop(self) -> None:
        try:
            while True:
                batch = self._batches.get()
                if batch is None:
                    return
                self._write_until_done(batch)
        except BaseException as exc:
            self._writer_error = exc
            logger.exception("The ingest worker's writer thread failed.")
        finally:
            connections.close_all()

    def _write_until_done(self, batch: _Batch) -> None:
        delay = 0.0
        last_touch = time.monotonic()
        while True:
            started = time.perf_counter()
            try:
                written = self._write(batch.rows, batch.row_ids, batch)
                break
            except DatabaseDown as exc:
                self._database_down.set()
                self._count("retries", 1)
                if self._stop.is_set():
                    # Not acknowledged: the entries stay pending, re-read on the next start.
                    logger.warning(
                        "Stopping with %d row(s) unwritten, the database is unreachable; they "
                        "stay in the stream and are written when a worker starts again.",
                        len(batch.rows),
                    )
                    return
                delay = min(max(delay * 2, _FIRST_RETRY_DELAY), _MAX_RETRY_DELAY)
                if delay in (_FIRST_RETRY_DELAY, _MAX_RETRY_DELAY):
                    logger.warning(
                        "Cannot write RPC log rows, the database is unreachable (%s); "
                        "%d row(s) in hand, retrying in %.1f s.",
                        exc,
                        len(batch.rows),
                        delay,
                    )
                time.sleep(delay)
                if time.monotonic() - last_touch > self.claim_idle_ms / 3000:
                    # Still ours: reset the entries' idle time (JUSTID leaves their delivery
                    # count alone) so no other worker claims them while the database is down.
                    self._touch(batch.ids)
                    last_touch = time.monotonic()
        seconds = time.perf_counter() - started
        if delay:
            logger.warning("RPC log rows are being written again.")
        self._database_down.clear()
        self._ack(batch.ids)
        self._count("rows", written)
        self._count("batches", 1)
        if self.observer is not None:
            self._observe(self.observer.batch_written, written, seconds)

    def _write(self, rows: list[dict[str, Any]], row_ids: list[str], batch: _Batch) -> int:
        from django_rpc_audit.models import RPCLog

        if not rows:
            return 0
        alias = self.using or router.db_for_write(RPCLog)
        queryset = RPCLog.objects.using(alias)
        try:
            return write_rows(queryset, rows, batch.slow)
        except Exception as exc:
            # Unreachable, dropped or cancelled (a psycopg error raised past Django's wrapper
            # included): retried as a batch. Anything else but a database error is a bug.
            if is_unreachable(exc, connections[alias]):
                with contextlib.suppress(Exception):
                    connections[alias].close()
                raise DatabaseDown(str(exc)) from exc
            if not isinstance(exc, DatabaseError):
                raise
            if len(rows) == 1:
                self._dead_letter(
                    row_ids[0],
                    {FIELD.encode(): batch.payloads.get(row_ids[0])},
                    f"refused by the database: {type(exc).__name__}: {exc}",
                )
                return 0
        # One row the database refuses must not hold back the others: halve until found.
        middle = len(rows) // 2
        return self._write(rows[:middle], row_ids[:middle], batch) + self._write(
            rows[middle:], row_ids[middle:], batch
        )

    def _ack(self, ids: list[str]) -> None:
        delay = _FIRST_RETRY_DELAY
        while True:
            try:
                self._client.xack(self.stream, self.group, *ids)
            except redis.RedisError as exc:
                # Written but not acknowledged: retry; a restart would rewrite them harmlessly.
                logger.warning("Could not acknowledge %d entries (%s); retrying.", len(ids), exc)
                time.sleep(delay)
                delay = min(delay * 2, _MAX_RETRY_DELAY)
                continue
            self._count("acked", len(ids))
            return

    def _touch(self, ids: list[str]) -> None:
        with contextlib.suppress(redis.RedisError):
            self._client.xclaim(
                self.stream,
                self.group,
                self.consumer,
                min_idle_time=0,
                message_ids=ids,  # type: ignore[arg-type]
                justid=True,
            )

    # -- stats ------------------------------------------------------------------------------------

    def _count(self, name: str, n: int) -> None:
        with self._counts_lock:
            self._counts[name] += n

    def _refresh_backlog(self) -> None:
        now = time.monotonic()
        with self._counts_lock:
            rows = self._counts["rows"]
        mark, marked_rows = self._rate_mark
        if now > mark:
            self._rate = (rows - marked_rows) / (now - mark)
        self._rate_mark = (now, rows)
        try:
            lag, pending = stream_backlog(self._client, self.stream, self.group)
        except redis.RedisError:
            pass
        else:
            self._backlog = (lag, pending, time.time())
        if self.observer is not None:
            self._observe(self.observer.counts, self.stats())

    @staticmethod
    def _observe(method: Callable[..., None], *args: Any) -> None:
        try:
            method(*args)
        except Exception:
            logger.exception("The ingest worker's metrics failed; ingestion goes on.")

    def stats(self) -> IngestStats:
        """This worker's counters and the group's backlog (see :class:`IngestStats`)."""
        with self._counts_lock:
            counts = dict(self._counts)
        lag, pending, at = self._backlog
        return IngestStats(
            consumer=self.consumer,
            rows_per_second=self._rate,
            lag=lag,
            pending=pending,
            backlog_at=at,
            **counts,
        )


def worker_stats() -> list[IngestStats]:
    """:meth:`IngestWorker.stats` of each worker running in this process (what a metrics
    integration reads; the group's ``lag`` and ``pending`` are refreshed by the workers every
    ``stats_interval`` seconds)."""
    return [worker.stats() for worker in list(IngestWorker.running)]


def _id_text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
