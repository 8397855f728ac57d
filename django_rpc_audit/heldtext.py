"""Recycled memory for the texts a buffered call holds until the log writer parses them.

A call whose payloads are :class:`~django_rpc_audit.payload.Deferred` keeps its request's and
its reply's JSON text in the buffer until the writer's thread makes their stored form (or,
for a payload cut at its cap on the caller's thread, the text of that stored form). Held in
the caller's own string, that memory is new for every call: the allocator cannot give the next
call what the buffer still holds, so the calling thread touches fresh pages, and once a batch
is written and the texts are freed, the C allocator gives the memory back to the system, so
the next calls fault on fresh pages again. For a 64 KB payload those page faults (one per
4 KiB of each text) cost the caller more than the rest of the logging together.

:func:`hold` copies a text into a buffer kept for reuse instead: the caller's own string is
freed at once, as with logging off, and the copy lands in memory that is already mapped. The
buffers come in size classes (four per power of two, so at most a quarter is wasted); one is
given back to its class when its text is taken (:meth:`HeldText.take`) or dropped, and at
most :data:`RETAINED_BYTES` of free buffers are kept. Texts below :data:`MIN_BYTES` (the
allocator recycles small blocks well) and above :data:`MAX_BYTES` (rare: only a cap above
4 MiB keeps such a text) are held as they are.
"""

from __future__ import annotations

import contextlib
import os
import threading

#: Texts shorter than this are held as they are.
MIN_BYTES = 4_096
#: Texts longer than this are held as they are.
MAX_BYTES = 4 * 2**20
#: Free buffers kept for reuse, in bytes, across all size classes (per process).
RETAINED_BYTES = 16 * 2**20

_lock = threading.Lock()
# Free buffers by size class (their length); _retained: the bytes they hold.
_free: dict[int, list[bytearray]] = {}
_retained = 0


def size_class(size: int) -> int:
    """The buffer length for a text of ``size`` bytes: ``size`` rounded up to a quarter of its
    power of two (5, 6, 7 or 8 KiB between 4 and 8 KiB, and so on)."""
    step = 1 << max(0, size.bit_length() - 3)
    return -(-size // step) * step


class HeldText:
    """A text copied into a recycled buffer; :meth:`take` gives it back as it was given."""

    __slots__ = ("_buffer", "_is_str", "_size")

    def __init__(self, data: bytes, is_str: bool) -> None:
        self._size = size = len(data)
        self._is_str = is_str
        self._buffer: bytearray | None = _buffer_for(size)
        self._buffer[:size] = data

    def __len__(self) -> int:
        return self._size

    def __repr__(self) -> str:
        return f"<HeldText {self._size} bytes>"

    def take(self) -> str | bytes:
        """The text (``str`` or ``bytes``, as it was given), once; the buffer goes back."""
        buffer = self._buffer
        if buffer is None:
            raise ValueError("the held text was taken already")
        view = memoryview(buffer)[: self._size]
        try:
            text: str | bytes = (
                str(view, "utf-8", "surrogatepass") if self._is_str else view.tobytes()
            )
        finally:
            view.release()
        self._buffer = None
        _give_back(buffer)
        return text

    def __del__(self, _suppress: type[contextlib.suppress] = contextlib.suppress) -> None:
        # A text never taken (its call evicted from the buffer, or dropped) frees its buffer.
        # At interpreter exit this may run after the module's globals were set to None (a
        # writer of a script's own still holding calls): suppress is bound in advance, and
        # the error of calling None is suppressed.
        buffer = self._buffer
        if buffer is not None:
            self._buffer = None
            with _suppress(Exception):
                _give_back(buffer)


def hold(text: str | bytes) -> str | bytes | HeldText:
    """``text`` copied into a recycled buffer, or ``text`` itself when it is too short or too
    long to be worth it (see the module's docstring)."""
    size = len(text)
    if size < MIN_BYTES or size > MAX_BYTES:
        return text
    if isinstance(text, str):
        # Lone surrogates survive the round trip (a JSON text may carry them).
        return HeldText(text.encode("utf-8", "surrogatepass"), True)
    return HeldText(text, False)


def _buffer_for(size: int) -> bytearray:
    global _retained
    length = size_class(size)
    with _lock:
        free = _free.get(length)
        if free:
            _retained -= length
            return free.pop()
    return bytearray(length)


def _give_back(buffer: bytearray) -> None:
    global _retained
    length = len(buffer)
    with _lock:
        if _retained + length <= RETAINED_BYTES:
            _free.setdefault(length, []).append(buffer)
            _retained += length


def retained_bytes() -> int:
    """The bytes of free buffers kept for reuse."""
    return _retained


def _after_fork_in_child() -> None:
    # Another thread may have held the lock at the fork: the child starts afresh (the free
    # buffers are the parent's memory, copied on write: not worth keeping).
    global _lock, _free, _retained
    _lock = threading.Lock()
    _free = {}
    _retained = 0


os.register_at_fork(after_in_child=_after_fork_in_child)
