"""The number options of the ``rpc_logs_*`` commands, from the shell or from ``call_command``.

``call_command("rpc_logs_stats", hours=24)`` (what schedulers do) skips argparse's ``type``
conversion, so each command passes its options through :func:`checked` again in ``handle()``:
an ``int``, a ``float`` or a string all work, and anything else is a ``CommandError``.
"""

from __future__ import annotations

import argparse
import math
import threading
from collections.abc import Callable
from typing import TypeVar

from django.core.management.base import CommandError

_Number = TypeVar("_Number", int, float)


def _finite(raw: object) -> float:
    if isinstance(raw, bool) or not isinstance(raw, str | int | float):
        raise argparse.ArgumentTypeError(f"{raw!r} is not a number")
    try:
        value = float(raw)
    except (ValueError, OverflowError):
        raise argparse.ArgumentTypeError(f"{raw!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{raw!r} is not a finite number")
    return value


def non_negative_number(raw: object) -> float:
    """A finite number >= 0 (``argparse`` ``type``)."""
    value = _finite(raw)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{raw!r} is below 0")
    return value


def positive_number(raw: object) -> float:
    """A finite number > 0 (``argparse`` ``type``)."""
    value = _finite(raw)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{raw!r} is not above 0")
    return value


def positive_seconds(raw: object) -> float:
    """A finite number of seconds > 0 that a thread can wait for (``threading.TIMEOUT_MAX``,
    under 300 years) (``argparse`` ``type``)."""
    value = positive_number(raw)
    if value > threading.TIMEOUT_MAX:
        raise argparse.ArgumentTypeError(f"{raw!r} is more seconds than a wait can last")
    return value


def positive_integer(raw: object) -> int:
    """A whole number >= 1 (``argparse`` ``type``); ``"1.5"`` and ``1.5`` are refused."""
    value = _finite(raw)
    if not value.is_integer() or value < 1:
        raise argparse.ArgumentTypeError(f"{raw!r} is not a whole number of at least 1")
    return int(value)


def checked(parse: Callable[[object], _Number], value: object, option: str) -> _Number:
    """``value`` of ``option`` parsed again by ``parse``; a :class:`CommandError` if refused."""
    try:
        return parse(value)
    except argparse.ArgumentTypeError as exc:
        raise CommandError(f"{option}: {exc}.") from None


def shown(value: float) -> str:
    """``24`` for 24.0, ``1.5`` for 1.5: numbers as the user would write them."""
    return f"{value:g}" if not float(value).is_integer() else str(int(value))
