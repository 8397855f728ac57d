"""RPCAuditMiddleware: attribution in sync and async views, isolation, reset, no session access."""

from __future__ import annotations

import asyncio
import random

import pytest
from asgiref.sync import iscoroutinefunction
from django.test import AsyncClient, Client, RequestFactory

from django_rpc_audit.context import EMPTY_CONTEXT, get_caller_context
from django_rpc_audit.middleware import RPCAuditMiddleware, client_ip
from django_rpc_audit.models import RPCLog
from tests.factories import UserFactory
from tests.views import ViewFailed

pytestmark = pytest.mark.usefixtures("echo_handler")


@pytest.fixture
def behind_proxy(rpc_settings):
    """Headers of a request from ``ip`` through a trusted proxy at 127.0.0.1.

    AsyncClient always connects from 127.0.0.1; a trusted proxy's X-Forwarded-For gives each
    async request its own client IP, through the same django-ipware path as production.
    """
    rpc_settings(TRUSTED_PROXY_IPS=["127.0.0.1"])

    def headers(ip: str, user_agent: str) -> dict[str, str]:
        return {"x-forwarded-for": f"{ip}, 127.0.0.1", "user-agent": user_agent}

    return headers


@pytest.mark.django_db
def test_sync_view_call_is_attributed_to_user_ip_and_agent():
    user = UserFactory()
    client = Client(REMOTE_ADDR="198.51.100.7", HTTP_USER_AGENT="sync-agent/1.0")
    client.force_login(user)

    response = client.get("/sync/call/", {"who": "sync"})

    assert response.status_code == 200
    assert response.json() == {"echo": {"who": "sync"}}
    log = RPCLog.objects.get()
    assert log.user == user
    assert log.caller_ip == "198.51.100.7"
    assert log.user_agent == "sync-agent/1.0"
    assert log.status == "success"
    assert log.response == {"echo": {"who": "sync"}}


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_async_view_call_is_attributed_to_user_ip_and_agent(behind_proxy):
    user = await UserFactory._meta.model.objects.acreate(username="async-user")
    client = AsyncClient()
    await client.aforce_login(user)

    response = await client.get(
        "/async/call/", {"who": "async"}, headers=behind_proxy("198.51.100.8", "async-agent/2.0")
    )

    assert response.status_code == 200
    log = await RPCLog.objects.select_related("user").aget()
    assert log.user == user
    assert log.caller_ip == "198.51.100.8"
    assert log.user_agent == "async-agent/2.0"
    assert log.params == {"who": "async"}


@pytest.mark.django_db
def test_anonymous_request_is_logged_without_user():
    Client(REMOTE_ADDR="198.51.100.9").get("/sync/call/")
    log = RPCLog.objects.get()
    assert log.user is None
    assert log.caller_ip == "198.51.100.9"


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_fifty_concurrent_async_requests_never_cross(local_handler, behind_proxy):
    async def slow_echo(params):
        # Yield to the other requests at a random point so their handling interleaves.
        await asyncio.sleep(random.uniform(0, 0.02))  # noqa: S311
        return {"echo": params}

    local_handler("test.echo", slow_echo)
    users = [
        await UserFactory._meta.model.objects.acreate(username=f"concurrent{n}") for n in range(50)
    ]
    clients = []
    for user in users:
        client = AsyncClient()
        await client.aforce_login(user)
        clients.append(client)

    responses = await asyncio.gather(
        *(
            client.get(
                "/async/call/",
                {"who": user.username},
                headers=behind_proxy(f"203.0.113.{n + 1}", f"agent-{n}"),
            )
            for n, (client, user) in enumerate(zip(clients, users, strict=True))
        )
    )

    for response, user in zip(responses, users, strict=True):
        assert response.json() == {"echo": {"who": user.username}}
    logs = [log async for log in RPCLog.objects.select_related("user")]
    assert len(logs) == 50
    for log in logs:
        n = int(log.user.username.removeprefix("concurrent"))
        assert log.params == {"who": log.user.username}
        assert log.caller_ip == f"203.0.113.{n + 1}"
        assert log.user_agent == f"agent-{n}"


@pytest.mark.django_db
def test_context_is_reset_after_the_view_raises():
    client = Client(raise_request_exception=False, REMOTE_ADDR="198.51.100.10")
    response = client.get("/sync/raises/")
    assert response.status_code == 500
    assert get_caller_context() is EMPTY_CONTEXT
    # The call made before the view raised is still logged.
    assert RPCLog.objects.get().caller_ip == "198.51.100.10"


def test_sync_middleware_sets_context_for_the_view_and_resets_on_error():
    seen = []

    def get_response(request):
        seen.append(get_caller_context())
        raise ViewFailed("boom")

    middleware = RPCAuditMiddleware(get_response)
    request = RequestFactory().get("/", REMOTE_ADDR="192.0.2.1", HTTP_USER_AGENT="ua")
    with pytest.raises(ViewFailed):
        middleware(request)
    assert seen[0].caller_ip == "192.0.2.1"
    assert seen[0].user_agent == "ua"
    assert get_caller_context() is EMPTY_CONTEXT


@pytest.mark.asyncio
async def test_async_middleware_sets_context_for_the_view_and_resets_on_error():
    seen = []

    async def get_response(request):
        seen.append(get_caller_context())
        raise ViewFailed("boom")

    middleware = RPCAuditMiddleware(get_response)
    assert iscoroutinefunction(middleware)
    request = RequestFactory().get("/", REMOTE_ADDR="192.0.2.2")
    with pytest.raises(ViewFailed):
        await middleware(request)
    assert seen[0].caller_ip == "192.0.2.2"
    assert get_caller_context() is EMPTY_CONTEXT


def test_sync_middleware_is_not_a_coroutine_function():
    assert not iscoroutinefunction(RPCAuditMiddleware(lambda request: None))


@pytest.mark.django_db
def test_no_session_access_when_the_view_makes_no_call():
    client = Client()
    client.force_login(UserFactory())

    quiet = client.get("/sync/no-call/")
    calling = client.get("/sync/call/")

    assert quiet.wsgi_request.session.accessed is False
    assert "Cookie" not in quiet.get("Vary", "")
    # The same client does touch the session once a call needs the user: the check above
    # would catch a middleware that evaluated request.user eagerly.
    assert calling.wsgi_request.session.accessed is True


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_no_session_access_in_async_views_without_a_call():
    user = await UserFactory._meta.model.objects.acreate(username="quiet-async")
    client = AsyncClient()
    await client.aforce_login(user)

    quiet = await client.get("/async/no-call/")
    calling = await client.get("/async/call/")

    assert quiet.asgi_request.session.accessed is False
    assert "Cookie" not in quiet.get("Vary", "")
    assert calling.asgi_request.session.accessed is True


def test_forged_forwarded_for_is_ignored_by_default():
    request = RequestFactory().get(
        "/", REMOTE_ADDR="198.51.100.20", HTTP_X_FORWARDED_FOR="203.0.113.99"
    )
    assert client_ip(request) == "198.51.100.20"


def test_forwarded_for_is_used_through_a_trusted_proxy(rpc_settings):
    rpc_settings(TRUSTED_PROXY_IPS=["10.0.0.9"])
    request = RequestFactory().get(
        "/", REMOTE_ADDR="10.0.0.9", HTTP_X_FORWARDED_FOR="203.0.113.7, 10.0.0.9"
    )
    assert client_ip(request) == "203.0.113.7"


def test_untrusted_proxy_falls_back_to_the_peer(rpc_settings):
    rpc_settings(TRUSTED_PROXY_IPS=["10.0.0.9"])
    request = RequestFactory().get(
        "/", REMOTE_ADDR="198.51.100.30", HTTP_X_FORWARDED_FOR="203.0.113.7, 198.51.100.30"
    )
    assert client_ip(request) == "198.51.100.30"


def test_ipware_settings_are_honoured(settings):
    settings.IPWARE_META_PROXY_COUNT = 1
    request = RequestFactory().get(
        "/", REMOTE_ADDR="10.0.0.9", HTTP_X_FORWARDED_FOR="203.0.113.8, 10.0.0.9"
    )
    assert client_ip(request) == "203.0.113.8"


def test_malformed_remote_addr_gives_no_ip():
    request = RequestFactory().get("/", REMOTE_ADDR="not-an-ip")
    assert client_ip(request) is None
