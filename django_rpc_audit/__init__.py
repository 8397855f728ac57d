"""django-rpc-audit: see every RPC call your Django site makes, who made it and how it ended."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "RPCClient",
    "RPCLogContext",
    "RPCLogger",
    "__version__",
    "get_rpc_client",
    "rpc_context",
]

if TYPE_CHECKING:
    from django_rpc_audit.client import RPCClient, get_rpc_client
    from django_rpc_audit.context import rpc_context
    from django_rpc_audit.manual import RPCLogContext, RPCLogger

# Imported on first use, so that ``import django_rpc_audit`` (from settings, for instance)
# needs no configured Django.
_LAZY = {
    "RPCClient": "django_rpc_audit.client",
    "get_rpc_client": "django_rpc_audit.client",
    "rpc_context": "django_rpc_audit.context",
    "RPCLogContext": "django_rpc_audit.manual",
    "RPCLogger": "django_rpc_audit.manual",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'django_rpc_audit' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
