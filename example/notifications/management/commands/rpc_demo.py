"""``rpc_demo``: make a few hundred RPC calls through the views, then show what was logged."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError
from django.db import connections
from django.test import AsyncClient, Client
from django.test.client import MULTIPART_CONTENT
from django.utils import timezone

from django_rpc_audit.conf import get_config
from django_rpc_audit.models import RPCLog, WebhookDelivery
from django_rpc_audit.utils import redact_url
from django_rpc_audit.writers import flush

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

    from django.contrib.auth.models import User
    from django.core.management.base import CommandParser
    from django.db.models import QuerySet

    from django_rpc_audit.conf import DjangoCfgRPCConfig


@dataclass(frozen=True, slots=True)
class Visitor:
    """A user (``None``: anonymous) on one device: one address, one browser."""

    username: str | None
    ip: str
    user_agent: str


VISITORS = (
    Visitor("admin", "10.0.0.5", "Mozilla/5.0 (Windows NT 10.0; Win64; x64) Chrome/126.0.0.0"),
    Visitor("alice", "203.0.113.10", "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_5) Safari/605.1"),
    Visitor("alice", "198.51.100.77", "Mozilla/5.0 (Linux; Android 14; Pixel 8) Chrome/126.0"),
    Visitor("bob", "198.51.100.23", "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Firefox/128.0"),
    Visitor("carol", "2001:db8::c0:1", "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5) Mobile/15E148"),
    Visitor("dave", "192.0.2.44", "python-requests/2.32.3"),
    Visitor(None, "192.0.2.200", "uptime-monitor/1.4"),
)

#: What a visitor does, and how often. "slow" pings ask the peer to wait 400 ms before it
#: answers, past the views' 250 ms ping timeout: against the real django-ipc server too,
#: whose system.ping sleeps delay_ms, so every slow ping is a timeout and no other call is.
#: "reports" calls a method no peer has: a failed call. The local send_notification fails
#: for offline users (handlers.is_online); the real server answers them delivered=false.
ACTIONS = {
    "ping": 20,
    "aping": 20,
    "slow ping": 3,
    "slow aping": 3,
    "notify": 15,
    "anotify": 15,
    "aecho": 18,
    "reports": 6,
}
SLOW_DELAY_MS = 400


@dataclass(frozen=True, slots=True)
class DemoRequest:
    """One request of the demo, sent by the test client of its visitor."""

    visitor: Visitor
    is_async: bool
    http_method: str
    path: str
    data: dict[str, Any]
    #: Of the POST body: a form unless it says otherwise.
    content_type: str = MULTIPART_CONTENT


def plan_requests(count: int, rng: random.Random, user_ids: Sequence[str]) -> list[DemoRequest]:
    """``count`` requests by random visitors; anonymous visitors only ping."""
    requests = []
    for _ in range(count):
        visitor = rng.choice(VISITORS)
        actions = list(ACTIONS) if visitor.username else ["ping", "aping"]
        action = rng.choices(actions, [ACTIONS[name] for name in actions])[0]
        requests.append(_request(action, visitor, rng, user_ids))
    return requests


def _request(
    action: str, visitor: Visitor, rng: random.Random, user_ids: Sequence[str]
) -> DemoRequest:
    if action.endswith("ping"):
        delay_ms = SLOW_DELAY_MS if action.startswith("slow") else 0
        is_async = action.endswith("aping")
        path = "/api/async/ping/" if is_async else "/api/ping/"
        return DemoRequest(visitor, is_async, "get", path, {"delay_ms": delay_ms})
    if action.endswith("notify"):
        is_async = action == "anotify"
        data: dict[str, Any] = {
            "user_id": rng.choice(user_ids),
            "title": "Order shipped",
            "message": f"Parcel {rng.randrange(10_000, 99_999)} is on its way.",
        }
        path = "/api/async/notify/" if is_async else "/api/notify/"
        return DemoRequest(visitor, is_async, "post", path, data)
    if action == "aecho":
        data = {
            "cart": [rng.randrange(1, 500) for _ in range(rng.randint(1, 4))],
            "from": visitor.username,
        }
        return DemoRequest(visitor, True, "post", "/api/async/echo/", data, "application/json")
    return DemoRequest(
        visitor, False, "get", "/api/reports/", {"period": rng.choice(["day", "week"])}
    )


class RemoteAsyncClient(AsyncClient):
    """An ``AsyncClient`` whose requests come from ``ip`` with the ``User-Agent`` given.

    ASGI requests take ``REMOTE_ADDR`` from the scope's ``client``, which ``AsyncClient`` has no
    option for. The user agent is set here too: in Django 5.2, ``AsyncClient(headers=...)``
    sends ``http-user-agent`` instead of ``user-agent``.
    """

    def __init__(self, ip: str, user_agent: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.ip = ip
        self.user_agent = user_agent

    def _base_scope(self, **request: Any) -> dict[str, Any]:
        scope: dict[str, Any] = super()._base_scope(**request)  # type: ignore[misc]
        scope["client"] = [self.ip, 0]
        scope["headers"].append((b"user-agent", self.user_agent.encode("latin-1")))
        return scope


@contextlib.contextmanager
def _silenced(logger_name: str) -> Iterator[None]:
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


class Command(BaseCommand):
    help = (
        "Make RPC calls through the example views as several users, from several addresses, "
        "then print what django-rpc-audit logged. With REDIS_URL set, a real django-ipc server "
        "answers them."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--calls", type=int, default=300, help="Requests to make (default 300)."
        )
        parser.add_argument(
            "--concurrency",
            type=int,
            default=8,
            help="Async requests in flight at once (default 8).",
        )
        parser.add_argument("--seed", type=int, default=1, help="Seed of the random mix.")

    def handle(self, *args: Any, calls: int, concurrency: int, seed: int, **options: Any) -> None:
        if calls < 1:
            raise CommandError("--calls must be at least 1.")
        if concurrency < 1:
            raise CommandError("--concurrency must be at least 1.")
        if RPCLog._meta.db_table not in connections[RPCLog.objects.db].introspection.table_names():
            raise CommandError("The database has no RPC log table: run `manage.py migrate` first.")
        users = self._demo_users()
        rng = random.Random(seed)
        plan = plan_requests(calls, rng, [str(user.pk) for user in users.values()])
        config = get_config()
        started = timezone.now()
        with (
            self._peer(config),
            # The views answer 502 and 504 on purpose; Django would log every one of them.
            _silenced("django.request"),
        ):
            codes = self._run_sync([r for r in plan if not r.is_async], users)
            codes += self._run_async([r for r in plan if r.is_async], users, concurrency)
        responses = ", ".join(f"{code}: {n}" for code, n in sorted(codes.items()))
        self.stdout.write(f"Responses: {responses}")
        # The buffered writer (the default WRITE_MODE) writes in the background: wait for it.
        flush(timeout=60)
        logs = RPCLog.objects.filter(created_at__gte=started)
        self._report_alerts(logs, started)
        self._print_method_stats(logs)
        self._print_user_stats(logs)
        self._check_attribution(logs, expected_rows=len(plan))
        self.stdout.write(
            "\nBrowse the log in the admin: run `.venv/bin/python example/manage.py runserver` "
            "(with the same DATABASE_URL), open http://127.0.0.1:8000/admin/ and sign in as "
            "admin / admin. The analytics dashboard is at "
            "http://127.0.0.1:8000/admin/django_rpc_audit/rpclog/dashboard/ (also in the sidebar)."
        )

    # -- setting up -----------------------------------------------------------------------

    def _demo_users(self) -> dict[str, User]:
        """The superuser admin/admin and a few ordinary users, created if missing."""
        user_model = get_user_model()
        users: dict[str, User] = {}
        admin = user_model.objects.filter(username="admin").first()
        if admin is None:
            admin = user_model.objects.create_superuser("admin", "admin@example.com", "admin")
            self.stdout.write("Created the superuser admin (password: admin).")
        users["admin"] = admin
        for name in ("alice", "bob", "carol", "dave"):
            user, created = user_model.objects.get_or_create(
                username=name, defaults={"email": f"{name}@example.com"}
            )
            if created:
                user.set_unusable_password()
                user.save(update_fields=["password"])
            users[name] = user
        return users

    @contextlib.contextmanager
    def _peer(self, config: DjangoCfgRPCConfig) -> Iterator[None]:
        """Whoever answers the calls: the local handlers, or a django-ipc server started here."""
        if config.transport == "local":
            self.stdout.write("Transport: local (handlers in notifications/handlers.py answer).")
            yield
            return
        try:
            from scripts.ipc_server import IPCServer
        except ImportError as exc:
            raise CommandError(
                "scripts.ipc_server is not importable: run example/manage.py from the repository."
            ) from exc
        server = IPCServer(redis_url=config.redis_url, stream=config.request_stream)
        try:
            server.start()
        except (OSError, RuntimeError) as exc:
            raise CommandError(f"Could not start the django-ipc server: {exc}") from exc
        self.stdout.write(
            f"Transport: redis, answered by a django-ipc server on {redact_url(config.redis_url)} "
            f"stream {config.request_stream!r}."
        )
        try:
            yield
        finally:
            server.stop()

    # -- making the requests --------------------------------------------------------------

    def _run_sync(self, plan: list[DemoRequest], users: dict[str, User]) -> Counter[int]:
        clients: dict[Visitor, Client] = {}
        for visitor in VISITORS:
            client = Client(REMOTE_ADDR=visitor.ip, headers={"user-agent": visitor.user_agent})
            if visitor.username:
                client.force_login(users[visitor.username])
            clients[visitor] = client
        codes: Counter[int] = Counter()
        clock = time.perf_counter()
        for request in plan:
            client = clients[request.visitor]
            if request.http_method == "get":
                response = client.get(request.path, request.data)
            else:
                response = client.post(request.path, request.data, request.content_type)
            codes[response.status_code] += 1
        elapsed = time.perf_counter() - clock
        self.stdout.write(f"Sync views: {len(plan)} requests with Client in {elapsed:.1f} s.")
        return codes

    def _run_async(
        self, plan: list[DemoRequest], users: dict[str, User], concurrency: int
    ) -> Counter[int]:
        clock = time.perf_counter()
        statuses = asyncio.run(self._send_async(plan, users, concurrency))
        elapsed = time.perf_counter() - clock
        self.stdout.write(
            f"Async views: {len(plan)} requests with AsyncClient, {concurrency} at a time, "
            f"in {elapsed:.1f} s."
        )
        return Counter(statuses)

    async def _send_async(
        self, plan: list[DemoRequest], users: dict[str, User], concurrency: int
    ) -> list[int]:
        clients: dict[Visitor, AsyncClient] = {}
        for visitor in VISITORS:
            client = RemoteAsyncClient(visitor.ip, visitor.user_agent)
            if visitor.username:
                await client.aforce_login(users[visitor.username])
            clients[visitor] = client
        slots = asyncio.Semaphore(concurrency)

        async def send(request: DemoRequest) -> int:
            client = clients[request.visitor]
            async with slots:
                if request.http_method == "get":
                    response = await client.get(request.path, request.data)
                else:
                    response = await client.post(request.path, request.data, request.content_type)
            return int(response.status_code)

        return list(await asyncio.gather(*(send(request) for request in plan)))

    # -- reporting ------------------------------------------------------------------------

    def _report_alerts(self, logs: QuerySet[RPCLog], started: Any) -> None:
        slow = logs.flagged_slow().count()
        self.stdout.write(f"Slow calls flagged (slower than their method's normal): {slow}.")
        if not settings.RPC_FAILURE_WEBHOOK_URL:
            self.stdout.write(
                "Webhooks: none configured. Set RPC_FAILURE_WEBHOOK_URL and RPC_WEBHOOK_SECRET "
                "(whsec_...) to receive signed alerts of failed, timed-out and slow calls."
            )
            return
        alerts = WebhookDelivery.objects.filter(created_at__gte=started)
        states = Counter(alerts.values_list("state", flat=True))
        summary = ", ".join(f"{state}: {n}" for state, n in sorted(states.items())) or "none"
        self.stdout.write(
            f"Webhook alerts of this run ({summary}); delivery goes on in the background and "
            "with `manage.py rpc_webhooks_deliver`. See them in the admin under Webhook "
            "deliveries."
        )

    def _print_method_stats(self, logs: QuerySet[RPCLog]) -> None:
        rows = [
            (
                item["method"],
                item["total_calls"],
                item["success_count"],
                item["failed_count"],
                item["timeout_count"],
                _ms(item["avg_duration_ms"]),
                _ms(item["p95_duration_ms"]),
            )
            for item in logs.stats_by_method()
        ]
        self._table(
            "Calls of this run by method (RPCLog.objects.stats_by_method())",
            ("method", "total", "success", "failed", "timeout", "avg ms", "p95 ms"),
            rows,
        )

    def _print_user_stats(self, logs: QuerySet[RPCLog]) -> None:
        rows = [
            (
                item["username"] or "(anonymous)",
                item["total_calls"],
                item["failed_count"],
                item["timeout_count"],
                item["caller_ip_count"],
            )
            for item in logs.stats_by_user()
        ]
        self._table(
            "Rows attributed to each user by the middleware (RPCLog.objects.stats_by_user())",
            ("user", "rows", "failed", "timeout", "IPs"),
            rows,
        )

    def _check_attribution(self, logs: QuerySet[RPCLog], expected_rows: int) -> None:
        """Every row must carry the user, IP and user agent of the request that made the call,
        also for the async requests that ran concurrently."""
        sent = {(visitor.username, visitor.ip, visitor.user_agent) for visitor in VISITORS}
        rows = 0
        wrong = 0
        for logged in logs.values_list("user__username", "caller_ip", "user_agent"):
            rows += 1
            if logged not in sent:
                wrong += 1
        if rows != expected_rows:
            raise CommandError(
                f"{expected_rows} requests made RPC calls but {rows} rows were logged: is "
                "DJANGO_CFG_RPC['ENABLE_LOGGING'] (or DJANGO_CFG_RPC__ENABLE_LOGGING) off?"
            )
        if wrong:
            raise CommandError(f"{wrong} of {rows} rows carry another request's user, IP or agent.")
        self.stdout.write(
            f"\nAttribution: all {rows} rows carry their own request's user, IP and user agent."
        )

    def _table(self, title: str, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
        cells = [[str(value) for value in row] for row in [header, *rows]]
        widths = [max(len(row[i]) for row in cells) for i in range(len(header))]

        def line(row: Sequence[str]) -> str:
            # First column left-aligned (names), the numbers right-aligned.
            first, *rest = row
            return "  ".join(
                [
                    first.ljust(widths[0]),
                    *(cell.rjust(w) for cell, w in zip(rest, widths[1:], strict=True)),
                ]
            )

        self.stdout.write(f"\n{title}")
        self.stdout.write(self.style.MIGRATE_HEADING(line(cells[0])))
        self.stdout.write("  ".join("-" * width for width in widths))
        for row in cells[1:]:
            self.stdout.write(line(row))


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"
