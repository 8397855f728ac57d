"""GCRA in one Lua script: the check, the ``XADD`` of an allowed request, and the new state.

The generic cell rate algorithm keeps one number per subject: its *theoretical arrival time*
(TAT). A limit of ``count`` calls per ``period`` has the emission interval
``T = period / count`` (rounded up to the microsecond, so the rate never exceeds the limit) and
a burst ``B``; the burst tolerance is ``(B - 1) * T``. A call at time ``now`` is allowed when
``max(TAT, now) - now <= (B - 1) * T``; it then moves the TAT to ``max(TAT, now) + T``. A
refused call changes nothing and learns ``max(TAT, now) - (B - 1) * T - now``, the wait after
which a call is allowed again.

Bound: over any window of ``W`` seconds, at most ``B + W / T`` calls of one subject pass
(the TAT advances by ``T`` per allowed call and may lead ``now`` by at most ``B * T``).

The clock is Redis's own (``TIME``), so every process on every host shares it. Times are whole
microseconds (about 1.8e15 today, exact in Lua's doubles), and the state expires once it no
longer holds anything back. When the request stream is given as a second key, an allowed
call's request is added in the same script: the check costs no round trip of its own.

Redis 5.0 or newer (scripts replicate their effects, so ``TIME`` may precede writes); nothing
newer than Redis 7.0 is used.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import redis
import redis.asyncio

#: KEYS[1]: the subject's TAT (µs). ARGV[1]: emission interval T (µs); ARGV[2]: burst
#: tolerance (B - 1) * T (µs). With KEYS[2], the request stream: ARGV[3] its approximate
#: MAXLEN, ARGV[4] the request's payload, added when the call is allowed.
#: Returns 0 when the call is allowed, else the microseconds until one would be.
SCRIPT = """
local clock = redis.call('TIME')
local now = clock[1] * 1000000 + clock[2]
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
local wait = tat - tonumber(ARGV[2]) - now
if wait > 0 then return wait end
if KEYS[2] then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', 'payload', ARGV[4])
end
tat = tat + tonumber(ARGV[1])
redis.call('SET', KEYS[1], string.format('%d', tat), 'PX', math.ceil((tat - now) / 1000))
return 0
"""

SCRIPT_SHA = hashlib.sha1(SCRIPT.encode(), usedforsecurity=False).hexdigest()


def run(client: redis.Redis, keys: Sequence[str], args: Sequence[str | int]) -> int:
    """Run the script: ``EVALSHA``, or ``EVAL`` (which caches it) when Redis lacks it."""
    try:
        return int(client.evalsha(SCRIPT_SHA, len(keys), *keys, *args))
    except redis.exceptions.NoScriptError:
        return int(client.eval(SCRIPT, len(keys), *keys, *args))


async def arun(client: redis.asyncio.Redis, keys: Sequence[str], args: Sequence[str | int]) -> int:
    """The ``async`` twin of :func:`run`."""
    try:
        return int(await client.evalsha(SCRIPT_SHA, len(keys), *keys, *args))
    except redis.exceptions.NoScriptError:
        return int(await client.eval(SCRIPT, len(keys), *keys, *args))
