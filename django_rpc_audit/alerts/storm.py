"""Storm control: the first alert of a kind is sent at once, the rest of its window as a digest.

A kind is (endpoint, event, method, error code). The window is one Redis key per kind, set
with ``SET key <digest id>:<window end> NX PX <window> GET`` (Redis 7.0): one atomic command
that either opens the window (the caller sends its alert and schedules the digest) or returns
the open window's digest id (the caller's alert is counted in that digest). Every process on
every host that delivers alerts agrees through it.

Without Redis (unreachable), each process keeps its own windows in memory: alerts are then
grouped per process rather than lost or sent one by one.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
import uuid
from dataclasses import dataclass

import redis

logger = logging.getLogger(__name__)

KEY_PREFIX = "rpc_audit:alerts:window:"
#: Most windows a process keeps in memory while Redis is unreachable.
MAX_LOCAL_WINDOWS = 10_000


def group_key(event_type: str, method: str, error_code: str) -> str:
    """What storm control groups alerts by (per endpoint): a hash of event, method and code."""
    return hashlib.sha256(f"{event_type}\0{method}\0{error_code}".encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Window:
    """The storm-control window an alert falls in."""

    #: True when this alert opened the window: send it now.
    opened: bool
    #: The digest that counts the window's further alerts.
    digest_id: uuid.UUID
    #: Unix time the window closes (when its digest is due).
    ends_at: float


class StormControl:
    """Decides, for each alert, whether it opens a window or joins the open one."""

    def __init__(self, redis_url: str) -> None:
        self._redis = redis.Redis.from_url(
            redis_url, socket_connect_timeout=2, socket_timeout=2, health_check_interval=30
        )
        self._local: dict[str, tuple[uuid.UUID, float]] = {}
        self._lock = threading.Lock()
        self._warned = False

    def window(self, endpoint: str, key: str, seconds: float) -> Window:
        """The window of alert kind ``key`` at ``endpoint``, opened by this call if none is."""
        redis_key = f"{KEY_PREFIX}{endpoint}:{key}"
        candidate = uuid.uuid4()
        ends_at = time.time() + seconds
        try:
            previous = self._redis.set(
                redis_key,
                f"{candidate.hex}:{ends_at:.3f}",
                nx=True,
                px=max(1, round(seconds * 1000)),
                get=True,
            )
        except redis.RedisError:
            return self._local_window(redis_key, candidate, ends_at)
        if previous is None:
            return Window(True, candidate, ends_at)
        text = previous.decode() if isinstance(previous, bytes) else str(previous)
        digest_hex, _, end = text.partition(":")
        return Window(False, uuid.UUID(hex=digest_hex), float(end))

    def _local_window(self, key: str, candidate: uuid.UUID, ends_at: float) -> Window:
        if not self._warned:
            self._warned = True
            logger.warning(
                "Storm control cannot reach Redis; alerts are grouped per process meanwhile.",
                exc_info=True,
            )
        now = time.time()
        with self._lock:
            current = self._local.get(key)
            if current is not None and current[1] > now:
                return Window(False, current[0], current[1])
            if len(self._local) >= MAX_LOCAL_WINDOWS:
                self._local = {k: v for k, v in self._local.items() if v[1] > now}
                if len(self._local) >= MAX_LOCAL_WINDOWS:
                    self._local.clear()
            self._local[key] = (candidate, ends_at)
        return Window(True, candidate, ends_at)

    def close(self) -> None:
        self._redis.close()
