"""A real HTTP endpoint on a free loopback port that records the webhooks it receives.

Used by the alert tests (in the test process, or by the storm and crash tests' child
processes through the URL). Answers are scripted: ``receiver.answers = [500, 500]`` makes the
next two requests fail, then every request gets 200. Every request's signature can be checked
with the independent ``standardwebhooks`` package.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from standardwebhooks import Webhook


@dataclass
class Received:
    """One request as the endpoint saw it: raw body bytes and headers."""

    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def webhook_id(self) -> str:
        return self.headers["webhook-id"]


@dataclass
class Answer:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    #: Hold the answer until this event is set (the crash test kills the sender meanwhile).
    hold: threading.Event | None = None


class WebhookReceiver:
    """``with WebhookReceiver() as receiver:`` serves on ``receiver.url`` until the block ends."""

    def __init__(self) -> None:
        self.requests: list[Received] = []
        self.answers: list[int | Answer] = []
        self.arrived = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                headers = {key.lower(): value for key, value in self.headers.items()}
                with receiver.arrived:
                    receiver.requests.append(Received(self.path, headers, body))
                    answer = receiver.answers.pop(0) if receiver.answers else 200
                    receiver.arrived.notify_all()
                if isinstance(answer, int):
                    answer = Answer(answer)
                if answer.hold is not None:
                    answer.hold.wait(30)
                try:
                    self.send_response(answer.status)
                    for key, value in answer.headers.items():
                        self.send_header(key, value)
                    self.send_header("Content-Length", "2")
                    self.end_headers()
                    self.wfile.write(b"ok")
                except OSError:
                    pass  # the sender is gone (the crash test)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> WebhookReceiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def wait_for(self, count: int, timeout: float = 30.0) -> list[Received]:
        """Wait until at least ``count`` requests arrived (or ``timeout``); return them all."""
        with self.arrived:
            self.arrived.wait_for(lambda: len(self.requests) >= count, timeout)
            return list(self.requests)

    def verified(self, secret: str) -> list[dict[str, Any]]:
        """Every request verified with ``standardwebhooks`` (raises on a bad signature)."""
        webhook = Webhook(secret)
        return [webhook.verify(request.body, request.headers) for request in self.requests]
