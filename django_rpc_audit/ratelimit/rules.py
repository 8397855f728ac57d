"""``RATE_LIMITS``: limits parsed from settings, and which one applies to a method.

A rule maps a method name or glob pattern to a :class:`Limit` (or to ``None``: unlimited).
Matching is the one every per-method setting uses: an exact name first, else the first glob
pattern that matches, in the order the settings give them.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

#: Seconds in each period unit a rate may name.
UNITS: dict[str, int] = {
    **dict.fromkeys(("s", "sec", "second", "seconds"), 1),
    **dict.fromkeys(("m", "min", "minute", "minutes"), 60),
    **dict.fromkeys(("h", "hour", "hours"), 3600),
    **dict.fromkeys(("d", "day", "days"), 86400),
}
_UNIT_NAMES = {1: "second", 60: "minute", 3600: "hour", 86400: "day"}

# "10/minute", "5/30s", "100 / 2 hours burst 20": only ever matched against settings.
_SPEC = re.compile(
    r"^\s*(?P<count>\d+)\s*/\s*(?P<multiple>\d+)?\s*(?P<unit>[a-z]+)"
    r"(?:\s+burst\s+(?P<burst>\d+))?\s*$",
    re.IGNORECASE,
)
#: Limits whose burst tolerance would pass this (microseconds, about 31 years) are refused:
#: the script's arithmetic must stay exact in doubles.
MAX_TOLERANCE_US = 10**15
UNLIMITED = "unlimited"


@dataclass(frozen=True, slots=True)
class Limit:
    """``count`` calls per ``period`` seconds, ``burst`` of them at once (default ``count``).

    With ``shared``, every method the rule's pattern matches draws on one budget per subject;
    otherwise each method has its own. ::

        Limit.parse("10/minute")               # 10 a minute, all 10 at once if idle
        Limit.parse("10/minute burst 2")       # 10 a minute, at most 2 back to back
        Limit(count=100, period=3600, burst=20)
    """

    count: int
    period: float
    burst: int = 0
    shared: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.count, bool) or not isinstance(self.count, int) or self.count < 1:
            raise ValueError(f"the count must be a positive whole number, not {self.count!r}")
        period = self.period
        if isinstance(period, bool) or not isinstance(period, int | float) or not period > 0:
            raise ValueError(f"the period must be a positive number of seconds, not {period!r}")
        if self.burst == 0:
            object.__setattr__(self, "burst", self.count)
        burst = self.burst
        if isinstance(burst, bool) or not isinstance(burst, int) or burst < 1:
            raise ValueError(f"the burst must be a positive whole number, not {burst!r}")
        if not isinstance(self.shared, bool):
            raise ValueError(f"'shared' must be True or False, not {self.shared!r}")
        if self.count > period * 1_000_000:
            raise ValueError("more than 1,000,000 calls a second cannot be limited")
        if self.burst * self.interval_us > MAX_TOLERANCE_US:
            raise ValueError(f"{self} spans more than 30 years")

    @classmethod
    def parse(cls, spec: object) -> Limit:
        """A limit from ``"<count>/[<n>]<unit>[ burst <b>]"``, a dict or a :class:`Limit`.

        Units: ``s``/``second``, ``m``/``minute``, ``h``/``hour``, ``d``/``day`` (plurals and
        ``sec``/``min`` too). A dict has ``"rate"`` (that string) and optionally ``"burst"``
        and ``"shared"``.

        :raises ValueError: ``spec`` is not one of those.
        """
        if isinstance(spec, Limit):
            return spec
        if isinstance(spec, Mapping):
            unknown = set(spec) - {"rate", "burst", "shared"}
            if unknown or "rate" not in spec:
                raise ValueError(
                    f"a limit dict has 'rate' and optionally 'burst' and 'shared', not {spec!r}"
                )
            rate = cls.parse(spec["rate"])
            burst = spec.get("burst", rate.burst)
            if burst == 0:
                raise ValueError("the burst must be a positive whole number, not 0")
            return cls(rate.count, rate.period, burst, spec.get("shared", False))
        if not isinstance(spec, str):
            raise ValueError(f"a limit is a string such as '10/minute', not {spec!r}")
        match = _SPEC.match(spec)
        unit = UNITS.get(match["unit"].lower()) if match else None
        if match is None or unit is None:
            raise ValueError(
                f"{spec!r} is not a rate such as '10/minute', '5/30s' or '100/hour burst 20'"
            )
        multiple = int(match["multiple"]) if match["multiple"] else 1
        burst = int(match["burst"]) if match["burst"] else None
        if multiple < 1 or burst == 0:
            raise ValueError(f"{spec!r}: the period and the burst must be at least 1")
        return cls(int(match["count"]), multiple * unit, burst or 0)

    @property
    def interval_us(self) -> int:
        """The emission interval ``period / count`` in microseconds, rounded up."""
        return max(1, math.ceil(self.period * 1_000_000 / self.count))

    @property
    def tolerance_us(self) -> int:
        """How far (microseconds) a subject's state may run ahead of now: ``(burst - 1) * T``."""
        return (self.burst - 1) * self.interval_us

    def __str__(self) -> str:
        period = self.period
        name = _UNIT_NAMES.get(int(period)) if float(period).is_integer() else None
        text = f"{self.count}/{name}" if name else f"{self.count}/{period:g}s"
        return text if self.burst == self.count else f"{text} burst {self.burst}"


#: One rule: a method name or glob pattern, and its limit (``None``: unlimited).
Rule = tuple[str, Limit | None]


def parse_rules(value: object) -> tuple[Rule, ...]:
    """``RATE_LIMITS`` as rules, in the order given.

    Takes a dict (``{"send_notification": "10/minute", "reports.*": {"rate": "100/hour",
    "burst": 10}, "system.ping": None}``), pairs, or ``"pattern=spec"`` strings (how the
    environment variable gives them). ``None`` or ``"unlimited"`` exempts the methods a rule
    matches from the rules after it.

    :raises ValueError: a rule is malformed; the message names it.
    """
    if isinstance(value, Mapping):
        items: Iterable[Any] = value.items()
    elif isinstance(value, list | tuple):
        items = [_pair(item) for item in value]
    else:
        raise ValueError(f"must be a dict of method names (or glob patterns) to limits: {value!r}")
    rules: list[Rule] = []
    for pattern, spec in items:
        if not isinstance(pattern, str) or not pattern:
            raise ValueError(f"a method name or pattern must be a non-empty string: {pattern!r}")
        if spec is None or (isinstance(spec, str) and spec.strip().lower() == UNLIMITED):
            rules.append((pattern, None))
            continue
        try:
            rules.append((pattern, Limit.parse(spec)))
        except ValueError as exc:
            raise ValueError(f"limit for {pattern!r}: {exc}") from None
    return tuple(rules)


def _pair(item: object) -> tuple[object, object]:
    if isinstance(item, str):
        pattern, sep, spec = item.partition("=")
        if not sep:
            raise ValueError(f"{item!r} is not 'pattern=limit'")
        return pattern.strip(), spec.strip()
    if isinstance(item, list | tuple) and len(item) == 2:
        return item[0], item[1]
    raise ValueError(f"{item!r} is not a (pattern, limit) pair")


@dataclass(frozen=True, slots=True)
class RateLimitCall:
    """What ``RATE_LIMIT_POLICY`` decides about: one call that a rule limits.

    ``user`` is the authenticated user (``None`` when anonymous), ``caller_ip`` the client IP
    as attribution records it, ``limit`` the configured limit and ``subject`` whose budget the
    call draws on (``"user:<pk>"``, ``"ip:<address>"``, or ``"unknown"``). The policy returns
    this call, a changed copy (:meth:`replace`), or ``None`` to let the call through unlimited::

        PRO = Limit.parse("1000/hour")

        def rate_limit_policy(call):
            if call.user is not None and call.user.plan == "pro":
                return call.replace(limit=PRO)
            return call
    """

    method: str
    user: Any
    caller_ip: str | None
    limit: Limit
    subject: str

    def replace(
        self, *, limit: Limit | str | None = None, subject: str | None = None
    ) -> RateLimitCall:
        """A copy with another limit (a :class:`Limit` or its string) and/or subject."""
        changes: dict[str, Any] = {}
        if limit is not None:
            changes["limit"] = Limit.parse(limit)
        if subject is not None:
            if not isinstance(subject, str) or not subject:
                raise ValueError(f"a subject must be a non-empty string, not {subject!r}")
            changes["subject"] = subject
        return dataclasses.replace(self, **changes)
