"""``BufferedLogWriter``: the receivers only enqueue; a background thread writes batches.

What keeps its rows at the end of a process (the exit and ``SIGTERM`` flushes, a fresh start
in forked children) is in :mod:`~django_rpc_audit.writers.lifecycle`.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
from collections import OrderedDict, deque
from datetime import datetime
from typing import Any

from django.db import connections, router

from django_rpc_audit.conf import get_config
from django_rpc_audit.costs import is_costed
from django_rpc_audit.status import RPCStatus
from django_rpc_audit.writers import lifecycle
from django_rpc_audit.writers.base import (
    DatabaseUnavailable,
    DestinationUnavailable,
    WriterObserver,
    WriterStats,
    is_unreachable,
)
from django_rpc_audit.writers.sink import (
    bulk_record_events,
    event_bytes,
    is_finished_event,
    resolve_payloads,
)

logger = logging.getLogger(__name__)


# One buffer entry per call: its latest event, with the sequence number it was accepted with.
_Key = tuple[str, datetime]
_Entry = tuple[int, dict[str, Any]]

#: Outcomes dropped first when the buffer is full: successes, and calls a rate limit refused
#: (a flood of those must not push out the failures).
_EXPENDABLE = frozenset({RPCStatus.SUCCESS.value, RPCStatus.RATE_LIMITED.value})
#: What an expendable outcome with a cost (``COSTS``) counts as: not expendable.
_BILLED = "billed"

#: Characters of deferred payloads parsed and stored between two yields of the GIL (about a
#: millisecond of work; see sink._yield_the_gil).
_CHARS_PER_YIELD = 200_000


def _resolve_payloads(events: list[dict[str, Any]]) -> None:
    """Make the stored form of the payloads the client deferred to this thread, letting a
    request thread that waits for the GIL run every millisecond or so."""
    work = 0
    for event in events:
        work += resolve_payloads(event)
        if work >= _CHARS_PER_YIELD:
            time.sleep(0)
            work = 0


#: First wait before retrying an unreachable database; doubled up to BUFFER_MAX_RETRY_DELAY.
_FIRST_RETRY_DELAY = 0.1


class BufferedLogWriter:
    """Buffers call events in memory and writes them in batches on a background thread.

    The caller's share is a dictionary insert under a lock: nothing touches the database on
    the calling thread, nor on an event loop. One buffer entry per call holds its latest event,
    so a call that finishes before its batch is written is inserted once, in its final state;
    a call still running at write time is inserted as ``pending`` and completed later.

    Bounded: at most ``buffer_size`` calls and about ``buffer_max_bytes`` bytes
    (:func:`~django_rpc_audit.writers.sink.event_bytes`) are held. When the buffer is full, an
    event gets in only by evicting events that cost less to lose: a new started event is not
    buffered (the call's row is written whole from its finished event); any finished event may
    take the place of the oldest buffered started events (whose calls then leave their rows
    whole when they finish); a failure, a timeout, or the outcome of a call whose pending row
    is written, may take the place of the oldest successful (or rate-limited) calls whose row is
    not written. Anything else is dropped. The outcome of a written pending row is never
    evicted (the row would stay ``pending``). Every dropped call is counted (:meth:`stats`) and
    logged.

    While the database is unreachable the thread retries the same batch with exponential
    backoff (up to ``max_retry_delay`` seconds) and loses nothing that fits in the buffer.
    Writes are idempotent (see :func:`~django_rpc_audit.writers.sink.bulk_record_events`), so
    retrying a batch whose commit reply was lost writes no duplicates.

    Subclasses deliver elsewhere by overriding :meth:`_write_batch` (the stream writer).

    With ``background=False`` no thread is started and nothing is written until :meth:`flush`,
    which then writes on the calling thread's connection: what the ``rpc_log_writer`` test
    fixture uses, so rows land in the test's transaction.
    """

    #: Where the rows go, as the log messages name it.
    destination = "the database"

    def __init__(
        self,
        *,
        buffer_size: int = 100_000,
        buffer_max_bytes: int = 64 * 2**20,
        batch_size: int = 1_000,
        flush_interval: float = 0.5,
        max_retry_delay: float = 10.0,
        using: str | None = None,
        background: bool = True,
    ) -> None:
        self.buffer_size = buffer_size
        self.buffer_max_bytes = buffer_max_bytes
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.max_retry_delay = max_retry_delay
        self.using = using
        self.background = background
        #: Told the writer's counters and batch timings (Prometheus metrics), on its thread.
        self.observer: WriterObserver | None = None
        self._reset_state()
        lifecycle.track(self)

    def _reset_state(self) -> None:
        self._lock = threading.Lock()
        self._buffer: dict[_Key, _Entry] = {}
        # What may go when the buffer is full, oldest first, cheapest kind first (_make_room):
        # buffered started events (nothing is lost: the finished event makes the whole row),
        # then successful (and rate-limited) calls whose pending row is not written (one such
        # row is lost), never a failure.
        self._started: OrderedDict[_Key, None] = OrderedDict()
        self._successes: OrderedDict[_Key, None] = OrderedDict()
        # Calls whose pending row is written and whose outcome is not: their finished event
        # is never evicted (the row would stay pending, and the reaper would call a success a
        # timeout). At most ``buffer_size`` remembered (a call whose outcome never comes
        # must not grow it); beyond that the oldest are forgotten.
        self._pending_written: OrderedDict[_Key, None] = OrderedDict()
        # Bytes each buffered call holds (sink.event_bytes) and their sum: BUFFER_MAX_BYTES.
        self._sizes: dict[_Key, int] = {}
        self._bytes = 0
        self._seq = 0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._retry_now = threading.Event()
        self._progress = threading.Condition()
        self._write_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._written = 0
        self._dropped = 0
        self._dropped_reported = 0
        self._failed = 0
        self._retries = 0

    def __repr__(self) -> str:
        mode = "background" if self.background else "inline"
        return f"<{type(self).__name__} {mode} buffered={len(self._buffer)}>"

    # -- the caller's side --------------------------------------------------------------------

    def started(self, event: dict[str, Any]) -> None:
        """Buffer ``rpc_started``'s arguments."""
        self._put(event)

    def finished(self, event: dict[str, Any]) -> None:
        """Buffer ``rpc_finished``'s arguments; they replace the call's started event."""
        self._put(event)

    def _put(self, event: dict[str, Any]) -> None:
        key = (event["correlation_id"], event["started_at"])
        status = event.get("status")
        if status in _EXPENDABLE and is_costed(get_config(), event.get("method", ""), status):
            # A call with a cost is on a bill: it is kept like a failure when the buffer is full
            # (the status here only decides evictions; the event keeps its own).
            status = _BILLED
        size = event_bytes(event)
        buffer, sizes = self._buffer, self._sizes
        with self._lock:
            self._seq += 1
            full = key not in buffer and len(buffer) >= self.buffer_size
            if full and not self._make_room(key, status):
                return
            growth = size - sizes.get(key, 0)
            if self._bytes + growth > self.buffer_max_bytes and not self._make_byte_room(
                key, status, growth
            ):
                return
            buffer[key] = (self._seq, event)
            self._bytes += growth
            sizes[key] = size
            if status is None:
                self._started[key] = None
            else:
                self._started.pop(key, None)
                if status in _EXPENDABLE and key not in self._pending_written:
                    self._successes[key] = None
            size = len(buffer)
        if self._thread is None and self.background:
            self._start()
        if size >= self.batch_size and not self._wake.is_set():
            self._wake.set()

    def _make_room(self, key: _Key, status: str | None) -> bool:
        """The buffer is full: may the event of ``key``, a call not in it, be buffered? (Lock
        held.) Only by evicting something that costs less to lose than the event itself."""
        if status is None:
            # Not buffering a started event loses nothing: the finished one makes the row.
            return False
        if self._started:
            # A started event goes without loss: when its call finishes, the row is whole.
            victim, _ = self._started.popitem(last=False)
        elif self._successes and (status not in _EXPENDABLE or key in self._pending_written):
            # A failure, or the outcome of a written pending row, outweighs a success whose
            # row is not written yet: that call is dropped, counted.
            victim, _ = self._successes.popitem(last=False)
            self._dropped += 1
        else:
            self._dropped += 1
            return False
        self._evict(victim)
        return True

    def _make_byte_room(self, key: _Key, status: str | None, growth: int) -> bool:
        """The event of ``key`` would take the buffer over ``buffer_max_bytes`` by growing it
        ``growth`` bytes: may it be buffered? A finished event takes the room
        of the oldest buffered started events; a failure, the outcome of a written pending row,
        or a call already buffered, also that of the oldest buffered successful (or
        rate-limited) calls. A new started, successful or rate-limited call that still does
        not fit is dropped. A call already buffered is never left with only its started event
        (its row would stay pending): if nothing can go, it goes over by that one event.
        (Lock held.)"""
        limit = self.buffer_max_bytes
        buffered = key in self._buffer
        if status is not None:
            # Its own started event is about to be replaced: never a victim.
            self._started.pop(key, None)
            while self._started and self._bytes + growth > limit:
                victim, _ = self._started.popitem(last=False)
                self._evict(victim)
        if buffered or (
            status is not None and (status not in _EXPENDABLE or key in self._pending_written)
        ):
            while self._successes and self._bytes + growth > limit:
                victim, _ = self._successes.popitem(last=False)
                self._evict(victim)
                self._dropped += 1
        if buffered or self._bytes + growth <= limit:
            return True
        self._dropped += 1
        return False

    def _evict(self, victim: _Key) -> None:
        """Take ``victim`` out of the buffer (already out of its eviction order). (Lock held.)"""
        del self._buffer[victim]
        self._bytes -= self._sizes.pop(victim, 0)

    def _note_pending_written(self, key: _Key) -> None:
        """The pending row of ``key`` is in the database. (Lock held.)"""
        self._pending_written[key] = None
        if len(self._pending_written) > self.buffer_size:
            self._pending_written.popitem(last=False)

    # -- flushing -----------------------------------------------------------------------------

    def flush(self, timeout: float | None = 30.0) -> bool:
        """Write every event buffered before this call; True once they are all written (or,
        the buffer being full, dropped: counted in :meth:`stats`).

        With the background thread, wake it and wait for it (up to ``timeout`` seconds;
        ``None``: no limit). Without one (``background=False``, or in a forked child before its
        first call), write on the calling thread's connection. False if the database could
        not be reached in time; the events stay buffered.
        """
        if not self.background:
            return self._write_inline()
        with self._lock:
            target = self._seq
            waiting = [key for key, (seq, _) in self._buffer.items() if seq <= target]
            thread = self._thread
        if not waiting:
            return True
        if thread is None or not thread.is_alive():
            return self._write_inline()
        deadline = None if timeout is None else time.monotonic() + timeout
        # Oldest first, as the thread writes them: each check drops the written head and stops
        # at the first call still waiting, so a long flush costs O(calls), not O(calls²).
        # A call is written once it has left the buffer. Still there with a newer event (its
        # finished event replaced the started one), it waits for that one: the older event
        # may never have been written. That is one more event at most: a call has two.
        pending = deque(waiting)
        while True:
            self._wake.set()
            with self._lock:
                buffer = self._buffer
                while pending and pending[0] not in buffer:
                    pending.popleft()
            if not pending:
                return True
            remaining = 0.1 if deadline is None else min(0.1, deadline - time.monotonic())
            if remaining <= 0:
                return False
            with self._progress:
                self._progress.wait(remaining)

    def _write_inline(self) -> bool:
        try:
            self._write_buffered(close_on_error=False)
        except DestinationUnavailable:
            logger.exception("Could not write the buffered RPC log rows to %s.", self.destination)
            return False
        finally:
            self._report_drops()
            self._publish()
        return True

    def stats(self) -> WriterStats:
        """What this writer has written, dropped and retried so far."""
        return WriterStats(
            buffered=len(self._buffer),
            buffered_bytes=self._bytes,
            written=self._written,
            dropped=self._dropped,
            failed=self._failed,
            retries=self._retries,
        )

    # -- the background thread ----------------------------------------------------------------

    def _start(self) -> None:
        with self._lock:
            if self._thread is not None or self._closed:
                return
            self._thread = threading.Thread(
                target=self._run, name="django-rpc-audit-writer", daemon=True
            )
        lifecycle.prepare_process()
        self._thread.start()

    def _run(self) -> None:
        lifecycle.leave_signals_to_the_main_thread()
        delay = 0.0
        try:
            while True:
                if delay:
                    # Backing off: a full batch does not cut the wait short, close() does once.
                    self._retry_now.wait(delay)
                    self._retry_now.clear()
                else:
                    self._wake.wait(self.flush_interval)
                self._wake.clear()
                # What is buffered now; calls made meanwhile wait for the next wake (a full
                # batch or the flush interval) instead of keeping the thread writing one small
                # transaction after another, which took the callers' CPU and GIL all along.
                limit = None if self._stop.is_set() else len(self._buffer)
                try:
                    self._write_buffered(close_on_error=True, limit=limit)
                except DestinationUnavailable:
                    self._retries += 1
                    delay = min(max(delay * 2, _FIRST_RETRY_DELAY), self.max_retry_delay)
                    if self._retries == 1 or delay == self.max_retry_delay:
                        logger.warning(
                            "Cannot write RPC log rows, %s is unreachable; "
                            "%d call(s) buffered, retrying in %.1f s.",
                            self.destination,
                            len(self._buffer),
                            delay,
                            exc_info=True,
                        )
                except Exception:
                    # Anything else (a project's database router raising, a bug) must not end
                    # the thread: every later call would wait in the buffer for the exit.
                    delay = min(max(delay * 2, _FIRST_RETRY_DELAY), self.max_retry_delay)
                    logger.exception(
                        "Could not write RPC log rows; %d call(s) buffered, retrying in %.1f s.",
                        len(self._buffer),
                        delay,
                    )
                else:
                    if delay:
                        logger.warning("RPC log rows are being written again.")
                    delay = 0.0
                self._report_drops()
                self._publish()
                if self._stop.is_set() and not self._buffer:
                    return
        finally:
            connections.close_all()

    def _report_drops(self) -> None:
        dropped = self._dropped
        if dropped > self._dropped_reported:
            logger.warning(
                "RPC log buffer full (BUFFER_SIZE=%d, BUFFER_MAX_BYTES=%d): dropped %d "
                "call(s), %d in all; failures and timeouts are kept before successful calls.",
                self.buffer_size,
                self.buffer_max_bytes,
                dropped - self._dropped_reported,
                dropped,
            )
            self._dropped_reported = dropped

    def _publish(self) -> None:
        observer = self.observer
        if observer is not None:
            observer.counts(self.stats())

    def _write_buffered(self, *, close_on_error: bool, limit: int | None = None) -> None:
        """Write the buffer, oldest calls first, one batch per transaction, until it is empty
        (or, with ``limit``, once at least ``limit`` calls are written).

        :raises DestinationUnavailable: the database (or stream) could not be reached; what is
            not written stays buffered.
        """
        written = 0
        with self._write_lock:
            while limit is None or written < limit:
                with self._lock:
                    batch = list(itertools.islice(self._buffer.items(), self.batch_size))
                if not batch:
                    return
                events = [event for _, (_, event) in batch]
                _resolve_payloads(events)
                self._write_batch(events, close_on_error)
                written += len(batch)
                with self._lock:
                    for key, entry in batch:
                        if is_finished_event(entry[1]):
                            self._pending_written.pop(key, None)
                        else:
                            self._note_pending_written(key)
                        # A call that finished meanwhile keeps its newer event, written next.
                        if self._buffer.get(key) is entry:
                            del self._buffer[key]
                            self._started.pop(key, None)
                            self._successes.pop(key, None)
                            self._bytes -= self._sizes.pop(key, 0)
                        elif not is_finished_event(entry[1]):
                            # ... which now completes a written pending row: never evicted.
                            self._successes.pop(key, None)
                with self._progress:
                    self._progress.notify_all()

    def _write_batch(self, events: list[dict[str, Any]], close_on_error: bool) -> None:
        from django_rpc_audit.models import RPCLog

        alias = self.using or router.db_for_write(RPCLog)
        queryset = RPCLog.objects.using(alias)
        started = time.perf_counter()
        try:
            written = bulk_record_events(queryset, events)
        except Exception as exc:
            if is_unreachable(exc, connections[alias]):
                if close_on_error:
                    _close_quietly(alias)
                raise DatabaseUnavailable(str(exc)) from exc
            if len(events) == 1:
                self._give_up(events[0])
                return
        else:
            self._written += written
            if self.observer is not None:
                self.observer.batch_written(written, time.perf_counter() - started)
            return
        # One row the database refuses must not hold back the others: write them one by one.
        for event in events:
            self._write_batch([event], close_on_error)

    def _give_up(self, event: dict[str, Any]) -> None:
        self._failed += 1
        logger.exception(
            "The database refused the RPC log row of %s (%s, %s); it is not retried.",
            event.get("method"),
            event.get("correlation_id"),
            event.get("status", "pending"),
        )

    # -- shutdown and fork --------------------------------------------------------------------

    def close(self, timeout: float | None = 10.0) -> bool:
        """Write what is buffered and stop the thread; True if nothing was left unwritten.

        Called at interpreter exit for every writer (``BUFFER_SHUTDOWN_TIMEOUT``).
        """
        with self._lock:
            self._closed = True
            thread = self._thread
        if thread is None or not thread.is_alive():
            return not self._buffer or self._write_inline()
        self._stop.set()
        self._retry_now.set()
        self._wake.set()
        thread.join(timeout)
        if self._buffer:
            logger.error(
                "%d RPC call(s) could not be logged before the process ended "
                "(the database was unreachable for BUFFER_SHUTDOWN_TIMEOUT).",
                len(self._buffer),
            )
            return False
        return True

    def _before_fork(self) -> None:
        self._lock.acquire()

    def _after_fork_in_parent(self) -> None:
        self._lock.release()

    def _after_fork_in_child(self) -> None:
        # The parent's thread does not exist here and its buffer is the parent's to write:
        # start afresh, with a thread of our own on the first call.
        self._reset_state()


def _close_quietly(alias: str) -> None:
    # The connection is broken; the next write reconnects.
    with contextlib.suppress(Exception):
        connections[alias].close()
