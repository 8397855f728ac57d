"""The caller context (user, IP, user agent) that RPC calls pick up without being passed it."""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Iterator
from contextvars import ContextVar, Token
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from asgiref.sync import sync_to_async
from django.utils.functional import LazyObject, empty

if TYPE_CHECKING:
    from django.contrib.auth.base_user import AbstractBaseUser
    from django.http import HttpRequest


@dataclass(frozen=True, slots=True)
class RPCCallerContext:
    """Who is making RPC calls right now.

    ``user`` may be a lazy object (``request.user``): it is only evaluated when a call is made,
    so a request that makes no call never touches the session. ``auser`` is the async loader
    (``request.auser``) used by :meth:`~django_rpc_audit.client.RPCClient.acall`.

    ``request`` (what the middleware sets) wins over both: the user is read from
    ``request.user`` when each call is made, so a ``login()`` or ``logout()`` earlier in the
    view decides who later calls are attributed to.
    """

    user: Any = None
    caller_ip: str | None = None
    user_agent: str | None = None
    auser: Callable[[], Awaitable[Any]] | None = None
    request: HttpRequest | None = None


EMPTY_CONTEXT = RPCCallerContext()

_caller_context: ContextVar[RPCCallerContext] = ContextVar(
    "django_rpc_audit_caller_context", default=EMPTY_CONTEXT
)


def get_caller_context() -> RPCCallerContext:
    """The context of the current request, task or ``rpc_context`` block (empty outside one)."""
    return _caller_context.get()


def set_caller_context(context: RPCCallerContext) -> Token[RPCCallerContext]:
    """Set the context; pass the returned token to :func:`reset_caller_context` in ``finally``."""
    return _caller_context.set(context)


def reset_caller_context(token: Token[RPCCallerContext]) -> None:
    """Restore the context that was active before the matching :func:`set_caller_context`."""
    _caller_context.reset(token)


@contextlib.contextmanager
def rpc_context(
    *,
    user: AbstractBaseUser | None = None,
    caller_ip: str | None = None,
    user_agent: str | None = None,
) -> Iterator[RPCCallerContext]:
    """Attribute the RPC calls made inside the block, outside a request (Celery tasks, commands).

    ::

        with rpc_context(user=user, caller_ip="10.0.0.5", user_agent="nightly-sync"):
            get_rpc_client().call("send_notification", {"user_id": str(user.pk)})

    Blocks nest; leaving one restores the outer context, even when the block raises.
    """
    context = RPCCallerContext(user=user, caller_ip=caller_ip, user_agent=user_agent)
    token = set_caller_context(context)
    try:
        yield context
    finally:
        reset_caller_context(token)


def _concrete_user(user: Any) -> Any:
    """``user`` evaluated, or ``None`` for an anonymous user."""
    if user is None:
        return None
    if getattr(user, "is_anonymous", False):
        return None
    return user


def _current_user(context: RPCCallerContext) -> Any:
    """The user as things stand now: ``request.user`` is re-read, since ``login()`` and
    ``logout()`` replace it on the request."""
    if context.request is not None:
        return getattr(context.request, "user", None)
    return context.user


def resolve_user(context: RPCCallerContext) -> Any:
    """The authenticated user of ``context``, evaluating a lazy ``request.user`` now."""
    return _concrete_user(_current_user(context))


async def aresolve_user(context: RPCCallerContext) -> Any:
    """Like :func:`resolve_user` without blocking the event loop (uses ``request.auser()``)."""
    user = _current_user(context)
    unloaded = isinstance(user, LazyObject) and user._wrapped is empty
    if context.request is not None:
        if not unloaded:
            # Loaded already, or replaced by alogin() / alogout(): nothing left to read.
            return _concrete_user(user)
        auser = getattr(context.request, "auser", None)
    else:
        auser = context.auser
    if auser is not None:
        return _concrete_user(await auser())
    if unloaded:
        # Evaluating ``request.user`` may query the session: not on the event loop.
        return await sync_to_async(_concrete_user)(user)
    return _concrete_user(user)
