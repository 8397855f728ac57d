"""The caller context: rpc_context blocks, nesting, reset, lazy users."""

from __future__ import annotations

import asyncio

import pytest
from django.contrib.auth.models import AnonymousUser
from django.utils.functional import SimpleLazyObject

from django_rpc_audit.context import (
    EMPTY_CONTEXT,
    RPCCallerContext,
    aresolve_user,
    get_caller_context,
    resolve_user,
    rpc_context,
)


def test_outside_any_block_the_context_is_empty():
    assert get_caller_context() is EMPTY_CONTEXT


def test_rpc_context_sets_and_restores():
    with rpc_context(caller_ip="10.1.1.1", user_agent="cron") as context:
        assert get_caller_context() is context
        assert (context.caller_ip, context.user_agent) == ("10.1.1.1", "cron")
    assert get_caller_context() is EMPTY_CONTEXT


def test_rpc_context_nests():
    with rpc_context(caller_ip="10.0.0.1"):
        with rpc_context(caller_ip="10.0.0.2"):
            assert get_caller_context().caller_ip == "10.0.0.2"
        assert get_caller_context().caller_ip == "10.0.0.1"


def test_rpc_context_is_reset_when_the_block_raises():
    with pytest.raises(ZeroDivisionError), rpc_context(caller_ip="10.0.0.3"):
        1 / 0  # noqa: B018
    assert get_caller_context() is EMPTY_CONTEXT


def test_anonymous_user_resolves_to_none():
    assert resolve_user(RPCCallerContext(user=AnonymousUser())) is None
    assert resolve_user(EMPTY_CONTEXT) is None


def test_lazy_user_is_only_evaluated_on_resolve():
    evaluated = []

    def load():
        evaluated.append(True)
        return AnonymousUser()

    context = RPCCallerContext(user=SimpleLazyObject(load))
    assert evaluated == []
    assert resolve_user(context) is None
    assert evaluated == [True]


@pytest.mark.asyncio
async def test_aresolve_user_prefers_the_async_loader():
    sentinel = object()

    async def auser():
        return sentinel

    assert await aresolve_user(RPCCallerContext(auser=auser)) is sentinel


@pytest.mark.asyncio
async def test_concurrent_tasks_keep_their_own_context():
    async def worker(n: int) -> str | None:
        with rpc_context(caller_ip=f"10.0.0.{n}"):
            await asyncio.sleep(0.001 * (n % 5))
            return get_caller_context().caller_ip

    results = await asyncio.gather(*(worker(n) for n in range(1, 60)))
    assert results == [f"10.0.0.{n}" for n in range(1, 60)]
