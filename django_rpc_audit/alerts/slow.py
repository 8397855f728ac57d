"""Slow-call detection: a call is slow when it takes far longer than its method usually does.

Each process keeps, per method, the durations of the latest ``SLOW_CALL_WINDOW`` successful
calls and from them a baseline: the median and the MAD (median absolute deviation). A
successful call is slow when its duration exceeds

    max(SLOW_CALL_FLOOR_MS, median + SLOW_CALL_SCORE * 1.4826 * MAD, SLOW_CALL_MIN_RATIO * median)

once the method has ``SLOW_CALL_MIN_SAMPLES`` samples (the modified z-score of Iglewicz and
Hoaglin, with 1.4826 * MAD estimating the standard deviation). The floor keeps fast methods
from being flagged over noise; the ratio keeps a method with almost no spread (MAD near 0)
from being flagged over a millisecond of jitter. A method that is always slow has a slow
median, so it is never flagged; one call twenty times its method's usual time always is. An
explicit ``SLOW_CALL_THRESHOLDS_MS`` entry replaces the baseline for its methods.

Cost to the caller: one dictionary lookup, one comparison and one append under a lock. Every
``max(1, SLOW_CALL_WINDOW // 8)`` samples the method's window is sorted to refresh its
baseline (``N log N`` with ``N <= SLOW_CALL_WINDOW``, amortised over those calls). No I/O.

Processes do not share baselines, and need not: each web process sees a random share of the
same traffic, so each learns the same median within sampling noise; a new process flags
nothing for a method until it has seen ``SLOW_CALL_MIN_SAMPLES`` of its calls (explicit
thresholds apply from the first call). The ``rpc.slow`` webhooks of several processes are
grouped by storm control like any other alert.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Literal

from django_rpc_audit.conf import DjangoCfgRPCConfig, get_config
from django_rpc_audit.status import RPCStatus
from django_rpc_audit.utils import method_rule

logger = logging.getLogger(__name__)

#: 1.4826 * MAD estimates the standard deviation of normally distributed durations.
MAD_SCALE = 1.4826
#: Most methods a detector tracks; the least recently called one is forgotten beyond it.
MAX_METHODS = 2_048
_SUCCESS = RPCStatus.SUCCESS.value


@dataclass(frozen=True, slots=True)
class SlowVerdict:
    """Why a call is slow: the threshold it crossed and its method's baseline."""

    #: The duration (milliseconds) above which a call of this method is slow.
    threshold_ms: float
    #: Median duration of the method's recent successful calls (``None``: explicit threshold
    #: and no baseline yet).
    baseline_ms: float | None
    #: Median absolute deviation of those durations.
    mad_ms: float | None
    #: How many recent calls the baseline was computed from.
    samples: int
    #: ``"baseline"`` (learnt) or ``"explicit"`` (``SLOW_CALL_THRESHOLDS_MS``).
    rule: Literal["baseline", "explicit"]


class _Method:
    """One method's recent durations and the baseline computed from them."""

    __slots__ = ("durations", "mad", "median", "since_refresh", "threshold")

    def __init__(self, window: int) -> None:
        self.durations: deque[float] = deque(maxlen=window)
        self.since_refresh = 0
        self.threshold: float | None = None
        self.median: float | None = None
        self.mad: float | None = None


class SlowCallDetector:
    """Learns each method's normal duration from its calls and flags those far beyond it.

    ::

        detector = SlowCallDetector(min_samples=30)
        verdict = detector.observe("send_notification", "success", 412.0)
        if verdict is not None:
            print(f"slow: over {verdict.threshold_ms:.0f} ms (usually {verdict.baseline_ms} ms)")

    Thread-safe; bounded in memory (``window`` floats for each of at most ``max_methods``
    methods).
    """

    def __init__(
        self,
        *,
        window: int = 200,
        min_samples: int = 30,
        score: float = 3.5,
        floor_ms: float = 50.0,
        min_ratio: float = 3.0,
        thresholds: tuple[tuple[str, float], ...] = (),
        max_methods: int = MAX_METHODS,
    ) -> None:
        self.window = window
        self.min_samples = min_samples
        self.score = score
        self.floor_ms = floor_ms
        self.min_ratio = min_ratio
        self.thresholds = thresholds
        self.max_methods = max_methods
        self.refresh_every = max(1, window // 8)
        self._methods: OrderedDict[str, _Method] = OrderedDict()
        self._lock = threading.Lock()
        self._explicit = functools.lru_cache(maxsize=4096)(self._explicit_threshold)

    def observe(self, method: str, status: str, duration_ms: float | None) -> SlowVerdict | None:
        """Judge one finished call against its method's baseline, then learn from it.

        Only successful calls are judged and learnt from: a failure's duration says how it
        failed, not how long the method takes.
        """
        if status != _SUCCESS or duration_ms is None:
            return None
        explicit = self._explicit(method)
        with self._lock:
            state = self._methods.get(method)
            if state is None:
                state = self._methods[method] = _Method(self.window)
                if len(self._methods) > self.max_methods:
                    self._methods.popitem(last=False)
            else:
                self._methods.move_to_end(method)
            verdict = self._judge(state, explicit, duration_ms)
            state.durations.append(duration_ms)
            state.since_refresh += 1
            if len(state.durations) >= self.min_samples and (
                state.threshold is None or state.since_refresh >= self.refresh_every
            ):
                self._refresh(state)
        return verdict

    def baseline(self, method: str) -> tuple[float | None, float | None, int]:
        """``(median, MAD, samples)`` of ``method`` as last refreshed (for display and tests)."""
        with self._lock:
            state = self._methods.get(method)
            if state is None:
                return None, None, 0
            return state.median, state.mad, len(state.durations)

    def _judge(
        self, state: _Method, explicit: float | None, duration_ms: float
    ) -> SlowVerdict | None:
        samples = len(state.durations)
        if explicit is not None:
            if duration_ms > explicit:
                return SlowVerdict(explicit, state.median, state.mad, samples, "explicit")
            return None
        if state.threshold is not None and duration_ms > state.threshold:
            return SlowVerdict(state.threshold, state.median, state.mad, samples, "baseline")
        return None

    def _refresh(self, state: _Method) -> None:
        ordered = sorted(state.durations)
        median = _median(ordered)
        mad = _median(sorted(abs(value - median) for value in ordered))
        state.median, state.mad, state.since_refresh = median, mad, 0
        state.threshold = max(
            self.floor_ms, median + self.score * MAD_SCALE * mad, self.min_ratio * median
        )

    def _explicit_threshold(self, method: str) -> float | None:
        found = method_rule(self.thresholds, method)
        return None if found is None else float(found[1])

    def _after_fork_in_child(self) -> None:
        # The lock may have been held by a thread that does not exist in the child.
        self._lock = threading.Lock()


def _median(ordered: list[float]) -> float:
    middle = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[middle]
    return (ordered[middle - 1] + ordered[middle]) / 2


def _options(config: DjangoCfgRPCConfig) -> dict[str, object]:
    return {
        "window": config.slow_call_window,
        "min_samples": config.slow_call_min_samples,
        "score": config.slow_call_score,
        "floor_ms": config.slow_call_floor_ms,
        "min_ratio": config.slow_call_min_ratio,
        "thresholds": config.slow_call_thresholds_ms,
    }


_detector: SlowCallDetector | None = None
_detector_config: DjangoCfgRPCConfig | None = None
_detector_lock = threading.Lock()


def get_detector(config: DjangoCfgRPCConfig | None = None) -> SlowCallDetector:
    """The process-wide detector, rebuilt (its baselines forgotten) when its settings change."""
    global _detector, _detector_config
    config = config if config is not None else get_config()
    detector = _detector
    if detector is not None and _detector_config is config:
        return detector
    with _detector_lock:
        if (
            _detector is None
            or _detector_config is None
            or (_options(_detector_config) != _options(config))
        ):
            _detector = SlowCallDetector(**_options(config))  # type: ignore[arg-type]
        _detector_config = config
        return _detector


def judge_call(method: str, status: str, duration_ms: float | None) -> SlowVerdict | None:
    """The client's hook: the verdict on a finished call (``None`` unless it is slow).

    Never raises: a broken detector must not keep ``rpc_finished`` from being sent.
    """
    try:
        config = get_config()
        if not config.slow_call_detection:
            return None
        return get_detector(config).observe(method, status, duration_ms)
    except Exception:
        logger.exception("Slow-call detection failed for %s; the call is not judged.", method)
        return None


def slow_arguments(verdict: SlowVerdict) -> dict[str, float | None]:
    """What :data:`~django_rpc_audit.signals.rpc_slow` adds to ``rpc_finished``'s arguments."""
    return {"threshold_ms": verdict.threshold_ms, "baseline_ms": verdict.baseline_ms}


def _reset_after_fork() -> None:
    global _detector_lock
    _detector_lock = threading.Lock()
    if _detector is not None:
        _detector._after_fork_in_child()


if hasattr(os, "register_at_fork"):  # not on Windows
    os.register_at_fork(after_in_child=_reset_after_fork)
