"""What a call costs: the ``COSTS`` rules, and the cost stored on its row (``RPCLog.cost``).

A rule is found by method name (exact names first, then the first matching glob, as for
``SAMPLE_RATES``) and is either a fixed price or the dotted path of a function taking a
:class:`CostCall`. The cost is computed where the row's other columns are made (the writer's
thread for the buffered and stream writers, off the caller's path), from the values the row
stores: params and response already redacted and capped. A function that fails, or returns
something that is not a price, is logged and the row is kept without a cost: it never breaks
the call nor loses its row.

Whether a method has a rule at all (:func:`is_costed`) is a cached lookup, cheap enough for
the receivers: sampling asks it, because a call that carries a cost is never sampled out.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.utils.module_loading import import_string

from django_rpc_audit.conf import COST_DECIMAL_PLACES, DjangoCfgRPCConfig, parse_price
from django_rpc_audit.utils import method_rule

logger = logging.getLogger(__name__)

_QUANTUM = Decimal(1).scaleb(-COST_DECIMAL_PLACES)


@dataclass(frozen=True, slots=True)
class CostCall:
    """What a cost function sees of a finished call: the values its row stores.

    ``params`` and ``response`` are the stored (redacted, capped) JSON values: a response
    larger than ``MAX_RESPONSE_BYTES`` is its truncation marker, so raise the cap for a method
    whose cost is read from a large response.
    """

    method: str
    status: str
    params: Any
    response: Any
    error_code: str
    duration_ms: float | None
    user_id: Any
    username: str


#: A cost function: the cost of a call, or ``None`` when it costs nothing.
CostFunction = Callable[[CostCall], "Decimal | int | str | None"]


def cost_rule(config: DjangoCfgRPCConfig, method: str) -> Decimal | str | None:
    """The ``COSTS`` rule of ``method``: a price, a dotted path, or ``None`` (no cost)."""
    return _rule(config.costs, method)


@functools.lru_cache(maxsize=4096)
def _rule(rules: tuple[tuple[str, Decimal | str], ...], method: str) -> Decimal | str | None:
    found = method_rule(rules, method)
    return None if found is None else found[1]


def is_costed(config: DjangoCfgRPCConfig, method: str, status: str | None = None) -> bool:
    """True when calls of ``method`` (ending with ``status``, if given) may carry a cost.

    Such calls are never sampled out: a function rule may give any call a cost, so every
    call of its methods with a billable outcome is kept.
    """
    if not config.costs:
        return False
    if status is not None and status not in config.billable_statuses:
        return False
    return _rule(config.costs, str(method)) is not None


def load_cost_function(path: str) -> CostFunction:
    """The function a ``COSTS`` dotted path names.

    :raises ImproperlyConfigured: it cannot be imported or is not callable.
    """
    try:
        function = _import(path)
    except ImportError as exc:
        raise ImproperlyConfigured(f"COSTS function {path!r} cannot be imported: {exc}") from exc
    if not callable(function):
        raise ImproperlyConfigured(f"COSTS function {path!r} is not callable.")
    return function  # type: ignore[no-any-return]


@functools.lru_cache(maxsize=64)
def _import(path: str) -> Any:
    return import_string(path)


def cost_functions(config: DjangoCfgRPCConfig) -> list[str]:
    """The dotted paths among the ``COSTS`` rules."""
    return [rule for _, rule in config.costs if isinstance(rule, str)]


def call_cost(
    config: DjangoCfgRPCConfig,
    *,
    method: str,
    status: str,
    values: Callable[[], Mapping[str, Any]],
) -> Decimal | None:
    """The cost to store with a finished call, or ``None``.

    ``values`` gives the rest of :class:`CostCall`'s fields (params, response, error code,
    duration, user); it is only called for a function rule, so a fixed price costs a lookup.
    Never raises: a failing function is logged and the call costs ``None``.
    """
    if not is_costed(config, method, status):
        return None
    rule = _rule(config.costs, str(method))
    if isinstance(rule, Decimal):
        return rule
    assert rule is not None  # is_costed() said so
    try:
        function = load_cost_function(rule)
        result = function(CostCall(method=method, status=status, **values()))
        if result is None:
            return None
        if isinstance(result, Decimal):
            # A function's arithmetic may carry more places than the column: rounded once
            # here, so that every total is the exact sum of the stored costs.
            result = result.quantize(_QUANTUM, rounding=ROUND_HALF_EVEN)
        return parse_price(result)
    except Exception:
        logger.exception(
            "The COSTS function %r failed for a call of %r; its row is kept without a cost.",
            rule,
            method,
        )
        return None
