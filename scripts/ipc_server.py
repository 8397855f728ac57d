"""Start and stop a real django-ipc server (the peer of our Redis transport) on loopback.

django-ipc pins ``redis<7``, so it lives in a virtualenv of its own (``.venv-ipc``, made by
``scripts/test`` and ``scripts/demo``); this module only needs the standard library and runs
that interpreter. Run directly, it *is* the server::

    .venv-ipc/bin/python scripts/ipc_server.py --port 8765 --health-port 8766 \
        --redis-url redis://127.0.0.1:6379/2 --stream stream:requests
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Self

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PYTHON = ROOT / ".venv-ipc" / "bin" / "python"


def ipc_python() -> Path | None:
    """The interpreter that has django-ipc: ``$RPC_AUDIT_IPC_PYTHON`` or ``.venv-ipc``."""
    configured = os.environ.get("RPC_AUDIT_IPC_PYTHON")
    path = Path(configured) if configured else DEFAULT_PYTHON
    return path if path.exists() else None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class LoopbackServer:
    """A server in a child process with a temporary working directory of its own, on
    loopback: ``start()`` (each server's own), ``stop()``, and ``with``."""

    process: subprocess.Popen[bytes] | None = None
    _workdir: tempfile.TemporaryDirectory[str] | None = None

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            if self.process.stderr:
                self.process.stderr.close()
            self.process = None
        if self._workdir is not None:
            self._workdir.cleanup()
            self._workdir = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


class IPCServer(LoopbackServer):
    """A django-ipc server in a child process, up once its ``/health`` answers.

    ::

        with IPCServer(redis_url="redis://127.0.0.1:6379/15", stream="s:requests") as server:
            ...  # calls on stream "s:requests" are answered by the real server
    """

    def __init__(
        self,
        *,
        redis_url: str,
        stream: str = "stream:requests",
        python: Path | None = None,
        startup_timeout: float = 30.0,
    ) -> None:
        found = python or ipc_python()
        if found is None:
            raise FileNotFoundError(
                "No interpreter with django-ipc: create .venv-ipc (scripts/test does) or set "
                "RPC_AUDIT_IPC_PYTHON."
            )
        self.python = found
        self.redis_url = redis_url
        self.stream = stream
        self.startup_timeout = startup_timeout
        self.port = free_port()
        self.health_port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        # django-ipc writes a logs/ folder into its working directory: keep it out of ours.
        self._workdir: tempfile.TemporaryDirectory[str] | None = None

    def start(self) -> Self:
        self._workdir = tempfile.TemporaryDirectory(prefix="django-ipc-")
        self.process = subprocess.Popen(  # noqa: S603 - our own script, fixed arguments
            [
                str(self.python),
                str(Path(__file__).resolve()),
                "--port",
                str(self.port),
                "--health-port",
                str(self.health_port),
                "--redis-url",
                self.redis_url,
                "--stream",
                self.stream,
            ],
            cwd=self._workdir.name,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                stderr = (
                    self.process.stderr.read().decode(errors="replace")
                    if self.process.stderr
                    else ""
                )
                raise RuntimeError(f"django-ipc server exited at start:\n{stderr[-2000:]}")
            if self.healthy():
                return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"django-ipc server did not answer /health in {self.startup_timeout} s")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.health_port}/health", timeout=1
            ) as reply:
                return bool(json.load(reply).get("status") == "ok")
        except (OSError, ValueError, urllib.error.URLError):
            return False


def _serve(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description="Run a django-ipc server on loopback.")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--health-port", type=int, required=True)
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--stream", default="stream:requests")
    args = parser.parse_args(argv)

    import asyncio

    from django_ipc.server import ServerConfig, WSServerConfig, run_server

    config = ServerConfig(
        server=WSServerConfig(
            host="127.0.0.1",
            port=args.port,
            health_port=args.health_port,
            redis_url=args.redis_url,
            request_stream=args.stream,
            auth_mode="none",
        )
    )
    asyncio.run(run_server(config))


if __name__ == "__main__":
    _serve(sys.argv[1:])
