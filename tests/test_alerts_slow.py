"""Slow-call detection: the per-method baseline, the ``rpc_slow`` signal, ``is_slow`` rows.

The detector is first tested with exact durations, then through the client with controlled
durations: local handlers that advance the client's clock by exactly the duration asked
(``controlled_clock``), and, for the method steady at 2 s, handlers that really sleep.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest
from django.core.exceptions import ImproperlyConfigured

from django_rpc_audit import get_rpc_client
from django_rpc_audit.alerts.slow import SlowCallDetector, get_detector
from django_rpc_audit.conf import DjangoCfgRPCConfig
from django_rpc_audit.models import RPCLog
from django_rpc_audit.sampling import finished_sample_rate
from django_rpc_audit.signals import rpc_slow

# -- the detector, with exact durations ----------------------------------------------------------


def test_flags_the_one_call_at_twenty_times_the_usual() -> None:
    detector = SlowCallDetector(min_samples=30)
    rng = random.Random(1)
    verdicts = [detector.observe("m", "success", 5 + rng.uniform(-0.5, 0.5)) for _ in range(60)]
    assert verdicts == [None] * 60
    verdict = detector.observe("m", "success", 100.0)
    assert verdict is not None
    assert verdict.rule == "baseline"
    assert verdict.baseline_ms == pytest.approx(5, abs=0.5)
    assert verdict.threshold_ms == 50.0  # the floor: 3 x 5 ms and median + 3.5 MAD are lower
    assert detector.observe("m", "success", 5.2) is None


def test_never_flags_a_method_that_is_always_slow() -> None:
    detector = SlowCallDetector(min_samples=30)
    rng = random.Random(2)
    # Steady at 2 s with the jitter a busy machine adds: MAD is tiny, the ratio guard holds.
    verdicts = [
        detector.observe("slow.report", "success", 2000 + rng.expovariate(1 / 3))
        for _ in range(500)
    ]
    assert verdicts == [None] * 500
    median, mad, samples = detector.baseline("slow.report")
    assert median == pytest.approx(2002, abs=2)
    assert samples == 200


def test_a_method_that_becomes_slow_for_good_stops_being_flagged() -> None:
    detector = SlowCallDetector(min_samples=30, window=100)
    for _ in range(100):
        detector.observe("m", "success", 5.0)
    flagged = [detector.observe("m", "success", 200.0) is not None for _ in range(200)]
    assert flagged[0] is True
    assert flagged[-1] is False  # the new normal: its baseline moved
    assert sum(flagged) < 100


def test_nothing_is_flagged_before_min_samples_nor_below_the_floor() -> None:
    detector = SlowCallDetector(min_samples=30, floor_ms=50)
    for _ in range(29):
        detector.observe("m", "success", 1.0)
    assert detector.observe("m", "success", 500.0) is None  # 30th sample: no baseline yet
    for _ in range(40):
        detector.observe("m", "success", 1.0)
    assert detector.observe("m", "success", 40.0) is None  # 40x, but under the floor
    assert detector.observe("m", "success", 60.0) is not None


def test_failures_are_neither_judged_nor_learnt() -> None:
    detector = SlowCallDetector(min_samples=3, window=10)
    for _ in range(10):
        detector.observe("m", "success", 5.0)
    assert detector.observe("m", "failed", 10_000.0) is None
    assert detector.observe("m", "timeout", 10_000.0) is None
    assert detector.baseline("m")[0] == 5.0


def test_explicit_thresholds_replace_the_baseline() -> None:
    detector = SlowCallDetector(thresholds=(("billing.*", 200.0),))
    assert detector.observe("billing.charge", "success", 150.0) is None
    verdict = detector.observe("billing.charge", "success", 250.0)
    assert verdict is not None
    assert (verdict.rule, verdict.threshold_ms) == ("explicit", 200.0)


def test_memory_is_bounded() -> None:
    detector = SlowCallDetector(window=10, max_methods=50)
    for n in range(500):
        for _ in range(20):
            detector.observe(f"m{n}", "success", 1.0)
    assert len(detector._methods) == 50
    assert all(len(state.durations) == 10 for state in detector._methods.values())


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("SLOW_CALL_FLOOR_MS", -1),
        ("SLOW_CALL_MIN_RATIO", 0.5),
        ("SLOW_CALL_SCORE", 0),
        ("SLOW_CALL_WINDOW", 1),
        ("SLOW_CALL_MIN_SAMPLES", "30"),
        ("SLOW_CALL_THRESHOLDS_MS", {"m": -5}),
        ("SLOW_CALL_DETECTION", "yes"),
    ],
)
def test_invalid_settings_name_the_key(key: str, value: Any) -> None:
    with pytest.raises(ImproperlyConfigured, match=key):
        DjangoCfgRPCConfig.from_mapping({key: value})


def test_min_samples_above_the_window_is_refused() -> None:
    with pytest.raises(ImproperlyConfigured, match="SLOW_CALL_MIN_SAMPLES"):
        DjangoCfgRPCConfig.from_mapping({"SLOW_CALL_MIN_SAMPLES": 50, "SLOW_CALL_WINDOW": 40})


# -- through the client, with controlled durations ------------------------------------------------


@pytest.fixture
def sleeper(local_handler: Any) -> None:
    """``test.asleep`` really sleeps ``params["ms"]`` milliseconds, on the event loop."""

    async def asleep(params: dict[str, Any]) -> dict[str, Any]:
        await asyncio.sleep(params["ms"] / 1000)
        return {}

    local_handler("test.asleep", asleep)


class SlowRecorder:
    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def __call__(self, sender: type, **kwargs: Any) -> None:
        self.calls.append(kwargs)


@pytest.fixture
def slow_signals() -> Any:
    recorder = SlowRecorder()
    rpc_slow.connect(recorder, dispatch_uid="tests.slow")
    yield recorder
    rpc_slow.disconnect(dispatch_uid="tests.slow")


@pytest.mark.django_db
@pytest.mark.usefixtures("controlled_clock")
def test_steady_5ms_then_one_100ms_call_flags_exactly_that_call(
    rpc_settings, slow_signals, signals
):
    rpc_settings(SLOW_CALL_MIN_SAMPLES=20)
    client = get_rpc_client()
    for _ in range(25):
        client.call("test.took", {"ms": 5})
    client.call("test.took", {"ms": 100})
    client.call("test.took", {"ms": 5})
    slow_rows = list(RPCLog.objects.filter(is_slow=True))
    assert len(slow_rows) == 1
    assert slow_rows[0].duration_ms == pytest.approx(100)
    (slow,) = slow_signals.calls
    assert slow["correlation_id"] == slow_rows[0].correlation_id
    # rpc_slow carries all of rpc_finished's arguments, plus the threshold and the baseline.
    finished = next(f for f in signals.finished if f["correlation_id"] == slow["correlation_id"])
    assert set(slow) == (set(finished) - {"sender"}) | {"threshold_ms", "baseline_ms"}
    assert slow["slow"] is finished["slow"]
    assert slow["threshold_ms"] == 50.0  # the floor: above 3 x 5 ms and 5 ms + 3.5 x 0
    assert slow["baseline_ms"] == pytest.approx(5)
    assert slow["duration_ms"] > slow["threshold_ms"]
    assert [f["slow"] is not None for f in signals.finished].count(True) == 1


@pytest.mark.asyncio
@pytest.mark.usefixtures("sleeper")
async def test_a_method_steady_at_2s_is_never_flagged(rpc_settings, slow_signals):
    """Two waves of 12 concurrent 2 s calls (about 4 s: the proof needs durations of 2 s; the
    calls overlap so that the baseline fills without a minute of waiting). Detection does not
    depend on logging, which is off here."""
    rpc_settings(SLOW_CALL_MIN_SAMPLES=10, ENABLE_LOGGING=False)
    client = get_rpc_client()
    for _ in range(2):
        await asyncio.gather(*(client.acall("test.asleep", {"ms": 2000}) for _ in range(12)))
    median, _, samples = get_detector().baseline("test.asleep")
    assert samples == 24
    assert median is not None
    assert median >= 2000
    assert slow_signals.calls == []


@pytest.mark.django_db
@pytest.mark.usefixtures("controlled_clock")
def test_the_buffered_writer_marks_slow_rows(rpc_settings, rpc_log_writer):
    """The batch path (COPY on PostgreSQL) writes ``is_slow`` like the synchronous writer."""
    rpc_settings(SLOW_CALL_THRESHOLDS_MS={"test.took": 20})
    client = get_rpc_client()
    client.call("test.took", {"ms": 1})
    client.call("test.took", {"ms": 40})
    rpc_log_writer.flush()
    assert sorted(RPCLog.objects.values_list("is_slow", flat=True)) == [False, True]


@pytest.mark.asyncio
@pytest.mark.usefixtures("controlled_clock")
async def test_acall_sends_rpc_slow_too(rpc_settings, slow_signals):
    rpc_settings(SLOW_CALL_THRESHOLDS_MS={"test.atook": 20}, ENABLE_LOGGING=False)
    client = get_rpc_client()
    await client.acall("test.atook", {"ms": 1})
    await client.acall("test.atook", {"ms": 40})
    (slow,) = slow_signals.calls
    assert slow["method"] == "test.atook"
    assert (slow["threshold_ms"], slow["baseline_ms"]) == (20.0, None)
    assert slow["slow"].rule == "explicit"


@pytest.mark.django_db
@pytest.mark.usefixtures("controlled_clock")
def test_detection_off_flags_nothing(rpc_settings, slow_signals):
    rpc_settings(SLOW_CALL_DETECTION=False, SLOW_CALL_THRESHOLDS_MS={"test.took": 1})
    get_rpc_client().call("test.took", {"ms": 5})
    assert slow_signals.calls == []
    assert not RPCLog.objects.filter(is_slow=True).exists()


def test_sampling_keeps_every_slow_call() -> None:
    from django_rpc_audit.alerts.slow import SlowVerdict

    config = DjangoCfgRPCConfig(sample_rate=0.0, always_log_slower_than_ms=10_000)
    event = {"correlation_id": "c", "method": "m", "status": "success", "duration_ms": 80.0}
    assert finished_sample_rate(config, {**event, "slow": None}) is None
    verdict = SlowVerdict(50.0, 5.0, 0.1, 100, "baseline")
    assert finished_sample_rate(config, {**event, "slow": verdict}) == 1.0


# -- admin and dashboard --------------------------------------------------------------------------


@pytest.mark.django_db
def test_slow_calls_in_the_changelist_filter_and_the_dashboard(admin_client_):
    from tests.factories import RPCLogFactory

    fast = RPCLogFactory(method="fast.one", duration_ms=3.0)
    slow = RPCLogFactory(method="slow.one", duration_ms=900.0, is_slow=True)
    page = admin_client_.get("/admin/django_rpc_audit/rpclog/?is_slow__exact=1")
    assert page.status_code == 200
    assert f"/rpclog/{slow.pk}/change/".encode() in page.content
    assert f"/rpclog/{fast.pk}/change/".encode() not in page.content
    dashboard = admin_client_.get("/admin/django_rpc_audit/rpclog/dashboard/")
    assert dashboard.status_code == 200
    assert b'data-table="slow-calls"' in dashboard.content
    assert str(slow.pk).encode() in dashboard.content
    assert b"is_slow__exact=1" in dashboard.content
