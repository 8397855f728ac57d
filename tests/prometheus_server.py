"""A real Prometheus server (Debian's ``prometheus`` package) on loopback, for the tests.

Its own configuration, data directory and free port; scrapes every 0.5 s. Queries go through
its HTTP API (``/api/v1/query``).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self

from scripts.ipc_server import LoopbackServer, free_port

SCRAPE_INTERVAL = 0.5


def prometheus_binary() -> str | None:
    return shutil.which("prometheus")


class PrometheusServer(LoopbackServer):
    """``with PrometheusServer({"live": "127.0.0.1:8000"}) as prometheus: ...`` scrapes
    ``/metrics/`` of each target, one job per name."""

    def __init__(self, targets: dict[str, str], metrics_path: str = "/metrics/") -> None:
        binary = prometheus_binary()
        if binary is None:
            raise FileNotFoundError("prometheus is not installed (apt-get install prometheus)")
        self.binary = binary
        self.targets = targets
        self.metrics_path = metrics_path
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    def _config(self) -> str:
        # YAML is a superset of JSON: no YAML library needed.
        interval = f"{int(SCRAPE_INTERVAL * 1000)}ms"
        return json.dumps(
            {
                "global": {"scrape_interval": interval, "scrape_timeout": interval},
                "scrape_configs": [
                    {
                        "job_name": job,
                        "metrics_path": self.metrics_path,
                        "static_configs": [{"targets": [target]}],
                    }
                    for job, target in self.targets.items()
                ],
            }
        )

    def start(self, timeout: float = 60.0) -> Self:
        self._workdir = tempfile.TemporaryDirectory(prefix="prometheus-")
        workdir = Path(self._workdir.name)
        (workdir / "prometheus.yml").write_text(self._config())
        self.process = subprocess.Popen(  # noqa: S603 - fixed arguments
            [
                self.binary,
                f"--config.file={workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            cwd=workdir,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                stderr = self.process.stderr.read().decode() if self.process.stderr else ""
                raise RuntimeError(f"prometheus exited at start:\n{stderr[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as reply:
                    if reply.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"prometheus was not ready in {timeout} s")

    # -- the HTTP API -----------------------------------------------------------------------

    def api(self, endpoint: str, **params: Any) -> Any:
        """``GET /api/v1/<endpoint>``; the ``data`` of a successful answer, else raises."""
        query = urllib.parse.urlencode(
            [
                (key, v)
                for key, value in params.items()
                for v in (value if isinstance(value, list) else [value])
            ]
        )
        try:
            with urllib.request.urlopen(
                f"{self.url}/api/v1/{endpoint}?{query}", timeout=10
            ) as reply:
                answer = json.load(reply)
        except urllib.error.HTTPError as exc:
            answer = json.load(exc)
        if answer.get("status") != "success":
            raise AssertionError(f"Prometheus refused {params}: {answer.get('error')}")
        return answer["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """An instant query's result (a vector's samples, or a matrix's series)."""
        params: dict[str, Any] = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        result: list[dict[str, Any]] = self.api("query", **params)["result"]
        return result

    def value(self, expr: str, at: float | None = None) -> float | None:
        """The single value of a query that gives one sample; ``None`` when it gives none."""
        result = self.query(expr, at)
        if not result:
            return None
        assert len(result) == 1, result
        return float(result[0]["value"][1])

    def wait_for(
        self, expr: str, expected: float | Callable[[float], bool], timeout: float = 60.0
    ) -> float:
        """Wait until ``expr`` evaluates to ``expected`` (or a value ``expected`` accepts): the
        scrapes have caught up. Return the time of the evaluation that did."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            now = time.time()
            last = self.value(expr, at=now)
            if last is not None and (expected(last) if callable(expected) else last == expected):
                return now
            time.sleep(SCRAPE_INTERVAL / 2)
        raise AssertionError(f"{expr} is {last}, not {expected}, after {timeout} s")
