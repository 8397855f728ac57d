"""Shared fixtures: settings helpers, local handlers, real Redis, signal capture."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from asgiref.sync import SyncToAsync
from django.db import connections
from django.test import Client

from django_rpc_audit.conf import clear_config_cache
from django_rpc_audit.signals import rpc_finished, rpc_started
from django_rpc_audit.transports import register_local_handler, unregister_local_handler
from scripts.ipc_server import free_port

#: With RPC_AUDIT_STRICT=1 (as scripts/test sets), a missing Redis or django-ipc fails the run
#: instead of skipping the tests that need it.
STRICT = os.environ.get("RPC_AUDIT_STRICT") == "1"
REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/15")
ROOT = Path(__file__).resolve().parent.parent


def unavailable(reason: str) -> None:
    """Skip (or fail, in strict mode) a test whose real service is missing."""
    if STRICT:
        pytest.fail(f"{reason} (RPC_AUDIT_STRICT=1)")
    pytest.skip(reason)


@pytest.fixture(autouse=True)
def _fresh_config() -> Iterator[None]:
    """Every test starts and ends with no cached config or client."""
    clear_config_cache()
    yield
    clear_config_cache()


@pytest.fixture(autouse=True)
def _close_async_thread_connections(request: pytest.FixtureRequest) -> Iterator[None]:
    """Close the database connection that async tests opened in asgiref's worker thread.

    ``sync_to_async`` runs ORM calls of an async test in one shared thread, whose connection
    Django's test teardown never sees; left open, it keeps PostgreSQL from dropping the test
    database.
    """
    yield
    if request.node.get_closest_marker("asyncio"):
        SyncToAsync.single_thread_executor.submit(connections.close_all).result()


@pytest.fixture
def rpc_settings(settings: Any) -> Callable[..., dict[str, Any]]:
    """Update ``DJANGO_CFG_RPC`` for one test: ``rpc_settings(TRANSPORT="redis", ...)``."""

    def configure(**keys: Any) -> dict[str, Any]:
        settings.DJANGO_CFG_RPC = {**settings.DJANGO_CFG_RPC, **keys}
        return settings.DJANGO_CFG_RPC

    return configure


@pytest.fixture
def rpc_env(monkeypatch: pytest.MonkeyPatch) -> Callable[[str, str], None]:
    """Set a ``DJANGO_CFG_RPC__*`` environment variable for one test."""

    def setenv(key: str, value: str) -> None:
        monkeypatch.setenv(f"DJANGO_CFG_RPC__{key}", value)
        clear_config_cache()

    return setenv


@pytest.fixture
def local_handler() -> Iterator[Callable[[str, Any], None]]:
    """Register local handlers for one test; they are removed afterwards."""
    registered: list[str] = []

    def register(method: str, handler: Any) -> None:
        register_local_handler(method, handler)
        registered.append(method)

    yield register
    for method in registered:
        unregister_local_handler(method)


@pytest.fixture
def echo_handler(local_handler: Callable[[str, Any], None]) -> None:
    """``test.echo`` answers with its params."""
    local_handler("test.echo", lambda params: {"echo": params})


class SignalRecorder:
    """Records every ``rpc_started`` / ``rpc_finished`` with its keyword arguments."""

    def __init__(self) -> None:
        self.started: list[dict[str, Any]] = []
        self.finished: list[dict[str, Any]] = []

    def on_started(self, sender: type, **kwargs: Any) -> None:
        self.started.append({"sender": sender, **kwargs})

    def on_finished(self, sender: type, **kwargs: Any) -> None:
        self.finished.append({"sender": sender, **kwargs})


@pytest.fixture
def signals() -> Iterator[SignalRecorder]:
    recorder = SignalRecorder()
    rpc_started.connect(recorder.on_started, dispatch_uid="tests.recorder.started")
    rpc_finished.connect(recorder.on_finished, dispatch_uid="tests.recorder.finished")
    yield recorder
    rpc_started.disconnect(dispatch_uid="tests.recorder.started")
    rpc_finished.disconnect(dispatch_uid="tests.recorder.finished")


@pytest.fixture
def redis_url() -> str:
    """The real Redis server's URL; the test is skipped (strict: fails) if it is not up."""
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1)
    try:
        client.ping()
    except redis.RedisError as exc:
        unavailable(f"Redis is not reachable at {REDIS_URL}: {exc}")
    finally:
        client.close()
    return REDIS_URL


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def redis_transport(
    rpc_settings: Callable[..., dict[str, Any]], redis_url: str, redis_client: redis.Redis
) -> Iterator[str]:
    """Switch to the Redis transport on a stream of this test's own; yields the stream name."""
    stream = f"rpc_audit_test:{uuid.uuid4().hex}:requests"
    rpc_settings(TRANSPORT="redis", REDIS_URL=redis_url, REQUEST_STREAM=stream)
    yield stream
    redis_client.delete(stream)


class ControlledClock:
    """The client's monotonic clock, advanced only by the ``test.took`` handlers."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def perf_counter(self) -> float:
        return self.now

    def advance(self, ms: float) -> None:
        self.now += ms / 1000


@pytest.fixture
def controlled_clock(
    monkeypatch: pytest.MonkeyPatch, local_handler: Callable[[str, Any], None]
) -> ControlledClock:
    """Calls of exact durations: ``test.took`` / ``test.atook`` (async) take ``params["ms"]``.

    The client's clock (``time.perf_counter`` as ``client.py`` sees it) is replaced by one
    that only these local handlers move, so a call's ``duration_ms`` is what the test says,
    however busy the machine (a real 5 ms sleep can take 60 ms on a loaded one).
    """
    import types

    from django_rpc_audit import client as client_module

    clock = ControlledClock()
    monkeypatch.setattr(
        client_module, "time", types.SimpleNamespace(perf_counter=clock.perf_counter)
    )

    def took(params: dict[str, Any]) -> dict[str, Any]:
        clock.advance(params["ms"])
        return {}

    async def atook(params: dict[str, Any]) -> dict[str, Any]:
        clock.advance(params["ms"])
        return {}

    local_handler("test.took", took)
    local_handler("test.atook", atook)
    return clock


@pytest.fixture
def webhook_receiver() -> Iterator[Any]:
    """A real HTTP endpoint on a free loopback port recording the webhooks it gets."""
    from tests.webhook_receiver import WebhookReceiver

    with WebhookReceiver() as receiver:
        yield receiver


@pytest.fixture
def clean_storm_windows(redis_client: redis.Redis) -> Iterator[None]:
    """No storm-control window of an earlier test (or run) is open in Redis."""
    from django_rpc_audit.alerts.storm import KEY_PREFIX

    def clean() -> None:
        for key in redis_client.scan_iter(f"{KEY_PREFIX}*"):
            redis_client.delete(key)

    clean()
    yield
    clean()


@pytest.fixture
def admin_client_(db: None) -> Client:
    """A test client logged in as the superuser ``root``, made by the factory."""
    from tests.factories import UserFactory

    client = Client()
    client.force_login(UserFactory(username="root", is_staff=True, is_superuser=True))
    return client


#: django-environ's URL scheme and the default port of each server database a child uses.
SERVER_DATABASES = {"postgresql": ("postgres", 5432), "mysql": ("mysql", 3306)}


@pytest.fixture
def child_env(tmp_path: Path) -> dict[str, str]:
    """The environment of a child process, with ``DATABASE_URL`` naming a migrated database.

    On PostgreSQL and MariaDB, the test database itself (tests using it need
    ``transaction=True``); on SQLite, a file of the test's own, which other processes can open.
    """
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("DJANGO_CFG_RPC__", "PYTEST_"))
    }
    env["PYTHONPATH"] = str(ROOT)
    settings = connections["default"].settings_dict
    scheme, default_port = SERVER_DATABASES.get(connections["default"].vendor, (None, None))
    if scheme is not None:
        auth = settings["USER"] + (f":{settings['PASSWORD']}" if settings["PASSWORD"] else "")
        host = settings["HOST"] or "127.0.0.1"
        env["DATABASE_URL"] = (
            f"{scheme}://{auth}@{host}:{settings['PORT'] or default_port}/{settings['NAME']}"
        )
    else:
        env["DATABASE_URL"] = f"sqlite:///{tmp_path / 'child.sqlite3'}"
        subprocess.run(
            [sys.executable, "-m", "tests.writer_process", "migrate"],
            cwd=ROOT,
            env=env,
            check=True,
            capture_output=True,
            timeout=120,
        )
    return env


class OTelSDK:
    """The OpenTelemetry SDK set up once per test process as the global providers: spans go to
    an in-memory exporter, metrics to an in-memory reader. ``broken`` makes the exporter and
    an extra span processor raise, as a failing backend would."""

    def __init__(self) -> None:
        from opentelemetry import metrics, trace
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
        from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
            InMemorySpanExporter,
        )

        sdk = self
        self.broken = False

        class Exporter(InMemorySpanExporter):
            def export(self, spans: Any) -> Any:
                if sdk.broken:
                    raise ConnectionError("the tracing backend is down")
                return super().export(spans)

        class BrokenProcessor(SpanProcessor):
            def on_end(self, span: Any) -> None:
                if sdk.broken:
                    raise RuntimeError("a span processor failed")

        self.exporter = Exporter()
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.tracer_provider.add_span_processor(BrokenProcessor())
        trace.set_tracer_provider(self.tracer_provider)
        self.reader = InMemoryMetricReader()
        metrics.set_meter_provider(MeterProvider(metric_readers=[self.reader]))

    def spans(self) -> list[Any]:
        return list(self.exporter.get_finished_spans())

    def data_points(self, name: str) -> list[Any]:
        """The data points of the metric ``name`` collected now (cumulative)."""
        data = self.reader.get_metrics_data()
        points: list[Any] = []
        for resource in data.resource_metrics if data else ():
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    if metric.name == name:
                        points.extend(
                            {"unit": metric.unit, "point": point}
                            for point in metric.data.data_points
                        )
        return points


_otel_sdk: OTelSDK | None = None


@pytest.fixture
def otel_sdk() -> Iterator[OTelSDK]:
    """The process's OpenTelemetry SDK (global providers), its spans cleared for the test."""
    global _otel_sdk
    if _otel_sdk is None:
        _otel_sdk = OTelSDK()
    _otel_sdk.exporter.clear()
    _otel_sdk.broken = False
    yield _otel_sdk
    _otel_sdk.broken = False


@pytest.fixture
def hide_package(monkeypatch: pytest.MonkeyPatch) -> Callable[[str], None]:
    """Make ``importlib.util.find_spec`` report a package as not installed, for one test."""
    import importlib.util

    real = importlib.util.find_spec
    hidden: set[str] = set()

    def find_spec(name: str, *args: Any) -> Any:
        return None if name in hidden else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    return hidden.add


@pytest.fixture
def utf8mb3_user_agent() -> Iterator[None]:
    """The log table of a site whose database was made with MySQL's old 3-byte ``utf8``.

    DDL commits on MySQL, so the tests using it run outside a transaction, and the column is
    put back afterwards.
    """
    from django_rpc_audit.models import RPCLog

    connection = connections["default"]
    table = connection.ops.quote_name(RPCLog._meta.db_table)

    def alter(charset: str) -> None:
        with connection.cursor() as cursor:
            cursor.execute(
                f"ALTER TABLE {table} MODIFY `user_agent` longtext CHARACTER SET {charset} NOT NULL"
            )

    alter("utf8mb3")
    try:
        yield
    finally:
        alter("utf8mb4")


class PrivateRedis:
    """A redis-server of the test's own on a free loopback port, which the test may stop and
    start again (never the shared one other processes use)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> PrivateRedis:
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis.from_url(self.url, socket_connect_timeout=1)
        try:
            for _ in range(100):
                with contextlib.suppress(redis.ConnectionError):
                    client.ping()
                    return self
                time.sleep(0.05)
        finally:
            client.close()
        raise RuntimeError("the private redis-server did not start")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    server = PrivateRedis()
    try:
        server.start()
    except FileNotFoundError:
        unavailable("redis-server is not installed")
    yield server
    server.stop()
