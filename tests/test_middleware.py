"""RPCAuditMiddleware: attribution in sync and async views, isolation, reset, no session access."""

from __future__ import annotations

import asyncio
import random

import pytest
from asgiref.sync import iscoroutinefunction, sync_to_async
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


async def logged_in_async_client(username: str) -> tuple[AsyncClient, object]:
    """An ``AsyncClient`` logged in as a new user ``username``, and that user."""
    user = await UserFactory._meta.model.objects.acreate(username=username)
    client = AsyncClient()
    await client.aforce_login(user)
    return client, user


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
    client, user = await logged_in_async_client("async-user")

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
    client, user = await logged_in_async_client("quiet-async")

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


@pytest.mark.parametrize(
    ("trusted", "remote_addr", "forwarded", "client"),
    [
        # A direct client forging a chain that ends in a trusted proxy: the peer is no proxy.
        (["10.0.0.1"], "203.0.113.9", "6.6.6.6, 10.0.0.1", "203.0.113.9"),
        # nginx at a trusted address sends the client alone (its own address is the peer).
        (["10.0.0.1"], "10.0.0.1", "198.51.100.7", "198.51.100.7"),
        # Two trusted proxies: the first one's address is in the chain.
        (["10.0.0.1", "10.0.0.2"], "10.0.0.2", "198.51.100.7, 10.0.0.1", "198.51.100.7"),
        # The client forged the left part: the right-most untrusted address is the client.
        (["10.0.0.1"], "10.0.0.1", "6.6.6.6, 198.51.100.7", "198.51.100.7"),
        # Networks: every hop in 10.0.0.0/8 is a proxy.
        (["10.0.0.0/8"], "10.1.2.3", "6.6.6.6, 198.51.100.7, 10.9.9.9", "198.51.100.7"),
        # Every hop is a proxy: the left-most (an internal host calling through them).
        (["10.0.0.0/8"], "10.0.0.1", "10.0.0.5, 10.0.0.4", "10.0.0.5"),
        # A trusted peer without a header is the client itself.
        (["10.0.0.1"], "10.0.0.1", None, "10.0.0.1"),
        # A hop a trusted proxy wrote that is no address: nothing is vouched for but the peer.
        (["10.0.0.1"], "10.0.0.1", "198.51.100.7, garbage", "10.0.0.1"),
        # Garbage left of the client is the client's own and is never reached.
        (["10.0.0.1"], "10.0.0.1", "<script>, 198.51.100.7", "198.51.100.7"),
        # Ports, brackets, IPv6, IPv4-mapped peers and entries.
        (["10.0.0.1"], "::ffff:10.0.0.1", "198.51.100.7:4711", "198.51.100.7"),
        (["::ffff:10.0.0.1"], "10.0.0.1", "198.51.100.7", "198.51.100.7"),
        (["2001:db8::/32"], "2001:db8::1", "2a00:1450::7, [2001:db8::2]:443", "2a00:1450::7"),
        # IPv4 entries never match IPv6 hops, nor the other way round.
        (["0.0.0.0/0"], "2001:db8::1", "198.51.100.7", "2001:db8::1"),
    ],
)
def test_forwarded_headers_count_only_from_trusted_proxies(
    rpc_settings, trusted, remote_addr, forwarded, client
):
    rpc_settings(TRUSTED_PROXY_IPS=trusted)
    extra = {"HTTP_X_FORWARDED_FOR": forwarded} if forwarded else {}
    request = RequestFactory().get("/", REMOTE_ADDR=remote_addr, **extra)
    assert client_ip(request) == client


def test_rfc_7239_forwarded_header_when_named_by_ipware_precedence(rpc_settings, settings):
    rpc_settings(TRUSTED_PROXY_IPS=["10.0.0.1"])
    settings.IPWARE_META_PRECEDENCE_ORDER = ("HTTP_FORWARDED", "REMOTE_ADDR")
    request = RequestFactory().get(
        "/",
        REMOTE_ADDR="10.0.0.1",
        HTTP_FORWARDED='for=6.6.6.6, for="[2001:db8::7]:443";proto=https',
        HTTP_X_FORWARDED_FOR="1.2.3.4",  # not the header this site's proxy writes
    )
    assert client_ip(request) == "2001:db8::7"


def test_proxy_count_falls_back_to_the_peer_for_a_direct_request(settings):
    settings.IPWARE_META_PROXY_COUNT = 1
    request = RequestFactory().get("/", REMOTE_ADDR="198.51.100.5")
    assert client_ip(request) == "198.51.100.5"


def test_proxy_count_reads_the_header_proxies_write_not_ones_they_pass_through(settings):
    """ipware's default header list starts with X-Forwarded-For but, for a private client,
    goes on to headers such as Client-IP that a proxy passes through as the client sent them."""
    settings.IPWARE_META_PROXY_COUNT = 1
    request = RequestFactory().get(
        "/",
        REMOTE_ADDR="10.0.0.9",
        HTTP_X_FORWARDED_FOR="10.1.2.3, 10.0.0.9",
        HTTP_CLIENT_IP="8.8.8.8, 10.0.0.9",
    )
    assert client_ip(request) == "10.1.2.3"


@pytest.mark.parametrize("entry", ["10.0.0.", "10.0", "proxy.internal", "10.0.0.0/33"])
def test_trusted_proxies_must_be_addresses_or_networks(settings, entry):
    from django.core.exceptions import ImproperlyConfigured

    from django_rpc_audit.conf import get_config

    settings.DJANGO_CFG_RPC = {"TRUSTED_PROXY_IPS": ["10.0.0.1", entry]}
    with pytest.raises(ImproperlyConfigured, match="TRUSTED_PROXY_IPS"):
        get_config()


def test_a_long_forwarded_chain_of_proxies_is_walked_to_its_start(rpc_settings):
    rpc_settings(TRUSTED_PROXY_IPS=["10.0.0.0/8"])
    chain = ", ".join(["10.0.0.7"] * 20_000)
    request = RequestFactory().get("/", REMOTE_ADDR="10.0.0.1", HTTP_X_FORWARDED_FOR=chain)
    assert client_ip(request) == "10.0.0.7"


def test_malformed_remote_addr_gives_no_ip():
    request = RequestFactory().get("/", REMOTE_ADDR="not-an-ip")
    assert client_ip(request) is None


# -- request-side hardening: what reaches the row from hostile or broken requests ---------


@pytest.mark.django_db
def test_forged_forwarded_for_is_not_stored():
    client = Client(REMOTE_ADDR="198.51.100.7", HTTP_X_FORWARDED_FOR="203.0.113.66")
    client.get("/sync/call/")
    assert RPCLog.objects.get().caller_ip == "198.51.100.7"


@pytest.mark.django_db
def test_forged_forwarded_for_behind_a_trusted_proxy_keeps_only_what_the_proxy_added(
    rpc_settings,
):
    # The client forged "1.2.3.4"; the trusted proxy appended the address it really saw.
    rpc_settings(TRUSTED_PROXY_IPS=["10.0.0.9"])
    client = Client(REMOTE_ADDR="10.0.0.9", HTTP_X_FORWARDED_FOR="1.2.3.4, 203.0.113.5, 10.0.0.9")
    client.get("/sync/call/")
    assert RPCLog.objects.get().caller_ip != "1.2.3.4"


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("remote_addr", "forwarded", "stored"),
    [
        ("999.1.1.1", None, None),
        ("", None, None),
        ("fe80::1%eth0", None, "fe80::1"),  # PostgreSQL's inet refuses the zone index
        ("::ffff:198.51.100.4", None, "198.51.100.4"),  # ipware unmaps IPv4-mapped IPv6
        ("10.0.0.9", "<script>, 10.0.0.9", None),
        ("10.0.0.9", "203.0.113.7:443, 10.0.0.9", "203.0.113.7"),  # port dropped
        ("10.0.0.9", "x" * 10_000, None),
    ],
)
def test_malformed_ips_are_stored_safely(rpc_settings, remote_addr, forwarded, stored):
    rpc_settings(TRUSTED_PROXY_IPS=["10.0.0.9"])
    extra = {"HTTP_X_FORWARDED_FOR": forwarded} if forwarded else {}
    response = Client(REMOTE_ADDR=remote_addr, **extra).get("/sync/call/")
    assert response.status_code == 200
    row = RPCLog.objects.get()
    assert row.status == "success"
    if stored is None:
        # Either nothing or the proxy peer itself: never the garbage, never a crash.
        assert row.caller_ip in (None, "10.0.0.9")
    else:
        assert row.caller_ip == stored


@pytest.mark.django_db
def test_an_explicit_malformed_caller_ip_is_stored_as_null():
    from django_rpc_audit import get_rpc_client

    get_rpc_client().call("test.echo", caller_ip="300.300.300.300")
    assert RPCLog.objects.get().caller_ip is None


@pytest.mark.django_db
def test_a_100_kb_user_agent_is_capped(rpc_settings):
    rpc_settings(MAX_USER_AGENT_BYTES=1024)
    huge = "Mozilla/5.0 " + "A" * 100_000
    Client(HTTP_USER_AGENT=huge).get("/sync/call/")
    stored = RPCLog.objects.get().user_agent
    assert stored.startswith("Mozilla/5.0 AAAA")
    assert len(stored.encode("utf-8")) <= 1024
    assert f" ... [truncated, {len(huge)} bytes] ... " in stored
    assert stored.endswith("AAAA")  # the start and the end are kept


@pytest.mark.django_db
def test_non_utf8_and_nul_user_agents_are_stored(signals):
    # WSGI servers hand header bytes over as latin-1 text: b"\xff\xfe" arrives as "\xff\xfe".
    latin1 = b"agent/\xff\xfe\x00end".decode("latin-1")
    Client(HTTP_USER_AGENT=latin1).get("/sync/call/")
    # Some servers decode with surrogateescape: lone surrogates.
    escaped = b"agent/\xff".decode("utf-8", "surrogateescape")
    Client(HTTP_USER_AGENT=escaped).get("/sync/call/")
    stored = set(RPCLog.objects.values_list("user_agent", flat=True))
    assert stored == {"agent/\ufffd", "agent/\xff\xfe\ufffdend"}
    assert [event["user_agent"] for event in signals.started] == [
        "agent/\xff\xfe\ufffdend",
        "agent/\ufffd",
    ]


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_async_request_with_raw_non_utf8_header_bytes():
    agent = b"async/\xff\x00".decode("latin-1")
    response = await AsyncClient().get("/async/call/", headers={"user-agent": agent})
    assert response.status_code == 200
    row = await RPCLog.objects.aget()
    assert row.user_agent == "async/\xff\ufffd"


# -- streamed responses: calls made while the body is consumed, after the view returned -------


@pytest.mark.django_db
def test_calls_made_while_a_sync_stream_is_consumed_are_attributed():
    user = UserFactory()
    client = Client(REMOTE_ADDR="198.51.100.40", HTTP_USER_AGENT="stream-agent/1")
    client.force_login(user)
    response = client.get("/sync/stream/")
    assert RPCLog.objects.count() == 0  # nothing is called before the body is consumed
    body = b"".join(response.streaming_content)
    assert body.count(b"echo") == 3
    assert get_caller_context() is EMPTY_CONTEXT  # set per chunk, never left behind
    rows = list(RPCLog.objects.select_related("user").order_by("params__who"))
    assert [row.params["who"] for row in rows] == ["stream0", "stream1", "stream2"]
    for row in rows:
        assert (row.user, row.caller_ip, row.user_agent) == (
            user,
            "198.51.100.40",
            "stream-agent/1",
        )


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_calls_made_while_an_async_stream_is_consumed_are_attributed(behind_proxy):
    client, user = await logged_in_async_client("async-streamer")
    response = await client.get("/async/stream/", headers=behind_proxy("198.51.100.41", "as/1"))
    chunks = [chunk async for chunk in response.streaming_content]
    assert len(chunks) == 3
    assert get_caller_context() is EMPTY_CONTEXT
    rows = [row async for row in RPCLog.objects.select_related("user").order_by("params__who")]
    assert [row.params["who"] for row in rows] == ["astream0", "astream1", "astream2"]
    for row in rows:
        assert (row.user, row.caller_ip, row.user_agent) == (user, "198.51.100.41", "as/1")


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_a_sync_stream_served_over_asgi_is_attributed(behind_proxy):
    response = await AsyncClient().get(
        "/sync/stream/", headers=behind_proxy("198.51.100.42", "mixed/1")
    )
    await sync_to_async(b"".join)(response.streaming_content)
    ips = [row.caller_ip async for row in RPCLog.objects.all()]
    assert ips == ["198.51.100.42"] * 3


def test_a_file_response_keeps_its_file_for_the_server():
    """A ``FileResponse`` reads a file (no RPC call): left alone, so servers can still send the
    file with ``wsgi.file_wrapper`` / ``sendfile``."""
    import io

    from django.http import FileResponse

    response = FileResponse(io.BytesIO(b"data"))
    middleware = RPCAuditMiddleware(lambda request: response)
    assert middleware(RequestFactory().get("/")) is response
    assert response.file_to_stream is not None


# -- login() and logout() inside the view ------------------------------------------------------


@pytest.mark.django_db
def test_calls_after_login_in_the_view_are_the_new_users():
    bob = UserFactory(username="bob")
    response = Client().get("/sync/login-then-call/", {"as": "bob"})
    assert response.json() == {"was_authenticated": False}
    users = dict(RPCLog.objects.values_list("params__who", "user__username"))
    assert users == {"before-login": None, "after-login": bob.username}


@pytest.mark.django_db
def test_calls_after_logout_in_the_view_are_no_ones():
    alice = UserFactory(username="alice")
    client = Client()
    client.force_login(alice)
    client.get("/sync/logout-then-call/")
    users = dict(RPCLog.objects.values_list("params__who", "user__username"))
    assert users == {"before-logout": "alice", "after-logout": None}


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_calls_after_alogin_in_an_async_view_are_the_new_users():
    await UserFactory._meta.model.objects.acreate(username="async-bob")
    response = await AsyncClient().get("/async/login-then-call/", {"as": "async-bob"})
    assert response.json() == {"was_authenticated": False}
    users = {
        who: name async for who, name in RPCLog.objects.values_list("params__who", "user__username")
    }
    assert users == {"before-login": None, "after-login": "async-bob"}


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_calls_after_alogout_in_an_async_view_are_no_ones():
    client, alice = await logged_in_async_client("async-alice")
    await client.get("/async/logout-then-call/")
    users = {
        who: name async for who, name in RPCLog.objects.values_list("params__who", "user__username")
    }
    assert users == {"before-logout": "async-alice", "after-logout": None}


@pytest.mark.django_db
def test_a_user_set_on_the_request_by_an_authenticator_is_the_callers():
    """Token authentication (Django REST framework's ``Request.user`` setter writes through to
    the ``HttpRequest``) sets ``request.user`` after the middleware ran: its calls are that
    user's."""
    from django.contrib.auth.models import AnonymousUser

    from django_rpc_audit import get_rpc_client

    token_user = UserFactory(username="token-user")

    def view(request):
        request.user = token_user
        get_rpc_client().call("test.echo", {"who": "api"})

    request = RequestFactory().get("/")
    request.user = AnonymousUser()
    RPCAuditMiddleware(view)(request)
    assert RPCLog.objects.get().user == token_user
