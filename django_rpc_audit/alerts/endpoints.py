"""Webhook endpoints: the ``WEBHOOKS`` setting parsed into :class:`WebhookEndpoint` values."""

from __future__ import annotations

import base64
import binascii
import dataclasses
import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

#: The events an endpoint can subscribe to.
EVENT_FAILED = "rpc.failed"
EVENT_TIMEOUT = "rpc.timeout"
EVENT_SLOW = "rpc.slow"
EVENTS: tuple[str, ...] = (EVENT_FAILED, EVENT_TIMEOUT, EVENT_SLOW)

Format = Literal["standard", "slack"]
FORMATS: tuple[Format, ...] = ("standard", "slack")

SECRET_PREFIX = "whsec_"  # noqa: S105  (the prefix, not a secret)
#: Bytes of key material a ``whsec_`` secret must hold (the Standard Webhooks range).
SECRET_BYTES = (24, 64)
_MAX_NAME = 64
_KEYS = {
    "NAME",
    "URL",
    "SECRET",
    "EVENTS",
    "METHODS",
    "FORMAT",
    "INCLUDE_PARAMS",
    "INCLUDE_RESPONSE",
    "INCLUDE_USER_EMAIL",
    "GROUP_WINDOW_SECONDS",
}


@dataclass(frozen=True, slots=True)
class WebhookEndpoint:
    """One receiver of alerts: where, how it is signed, and which calls it hears about."""

    #: Unique name; what the admin and the outbox rows show (never the URL's secrets).
    name: str
    #: ``http://`` or ``https://`` URL the notifications are POSTed to.
    url: str
    #: ``whsec_<base64>``: the Standard Webhooks signing secret ("" for a Slack endpoint).
    secret: str = ""
    #: Events this endpoint receives: ``rpc.failed``, ``rpc.timeout``, ``rpc.slow``.
    events: tuple[str, ...] = EVENTS
    #: Method names or globs (``send_*``); a call matches when one of them does.
    methods: tuple[str, ...] = ("*",)
    #: ``"standard"`` (``{"type", "timestamp", "data"}``) or ``"slack"`` (``{"text"}``).
    format: Format = "standard"
    #: Send the call's (already redacted) params / response; off by default.
    include_params: bool = False
    include_response: bool = False
    #: Send the user's e-mail address; off by default (id and username only).
    include_user_email: bool = False
    #: Storm-control window of this endpoint; ``None``: ``WEBHOOK_GROUP_WINDOW_SECONDS``.
    group_window_seconds: float | None = None

    def __repr__(self) -> str:
        # Never the secret, nor the URL (incoming-webhook URLs carry tokens).
        return f"<WebhookEndpoint {self.name!r}>"

    def wants(self, event: str, method: str) -> bool:
        """True when this endpoint subscribes to ``event`` for calls of ``method``."""
        return event in self.events and any(
            pattern == method or fnmatch.fnmatchcase(method, pattern) for pattern in self.methods
        )

    @property
    def key(self) -> bytes:
        """The secret's key material (base64-decoded after ``whsec_``)."""
        return secret_key(self.secret) if self.secret else b""


def secret_key(secret: str) -> bytes:
    """The key bytes of a ``whsec_`` secret.

    :raises ValueError: not ``whsec_`` followed by base64 of 24 to 64 bytes.
    """
    if not isinstance(secret, str) or not secret.startswith(SECRET_PREFIX):
        raise ValueError(f"a secret must start with {SECRET_PREFIX!r}")
    try:
        key = base64.b64decode(secret[len(SECRET_PREFIX) :], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("a secret must be 'whsec_' followed by base64") from None
    low, high = SECRET_BYTES
    if not low <= len(key) <= high:
        raise ValueError(f"a secret must hold {low} to {high} bytes, not {len(key)}")
    return key


def parse_endpoints(value: object) -> tuple[WebhookEndpoint, ...]:
    """The ``WEBHOOKS`` setting (a list of dicts with upper-case keys) as endpoints.

    :raises ValueError: with a message naming the endpoint and the key at fault.
    """
    if isinstance(value, tuple) and all(isinstance(item, WebhookEndpoint) for item in value):
        return value
    if not isinstance(value, list | tuple):
        raise ValueError(f"must be a list of endpoint dicts, not {type(value).__name__}")
    endpoints = tuple(_endpoint(n, item) for n, item in enumerate(value))
    names = [endpoint.name for endpoint in endpoints]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"has duplicate endpoint NAME(s): {', '.join(duplicates)}")
    return endpoints


def _endpoint(index: int, item: object) -> WebhookEndpoint:
    if isinstance(item, WebhookEndpoint):
        # Its field names are the setting's keys, lower-cased: validate it like a dict.
        item = {key.upper(): value for key, value in dataclasses.asdict(item).items()}
    if not isinstance(item, Mapping):
        raise ValueError(f"entry {index} must be a dict, not {type(item).__name__}")
    unknown = sorted(set(item) - _KEYS)
    where = f"entry {index} ({item.get('NAME', '?')!r})"
    if unknown:
        raise ValueError(f"{where} has unknown key(s) {', '.join(map(str, unknown))}")
    name = item.get("NAME")
    if not isinstance(name, str) or not name.strip() or len(name) > _MAX_NAME:
        raise ValueError(f"{where}: NAME must be a non-empty string of at most {_MAX_NAME} chars")
    url = item.get("URL")
    parts = urlsplit(url) if isinstance(url, str) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{where}: URL must be an http:// or https:// URL")
    fmt = item.get("FORMAT", "standard")
    if fmt not in FORMATS:
        raise ValueError(f"{where}: FORMAT must be one of {', '.join(FORMATS)}, not {fmt!r}")
    secret = item.get("SECRET", "")
    if secret or fmt == "standard":
        try:
            secret_key(secret)
        except ValueError as exc:
            # Never echo the secret itself.
            raise ValueError(f"{where}: SECRET is invalid: {exc}") from None
    events = _strings(where, "EVENTS", item.get("EVENTS", EVENTS))
    bad = sorted(set(events) - set(EVENTS))
    if bad or not events:
        raise ValueError(f"{where}: EVENTS must be a non-empty list of {', '.join(EVENTS)}")
    methods = _strings(where, "METHODS", item.get("METHODS", ("*",)))
    if not methods:
        raise ValueError(f"{where}: METHODS must list at least one method or glob")
    flags = {}
    for key in ("INCLUDE_PARAMS", "INCLUDE_RESPONSE", "INCLUDE_USER_EMAIL"):
        flag = item.get(key, False)
        if not isinstance(flag, bool):
            raise ValueError(f"{where}: {key} must be True or False, not {flag!r}")
        flags[key.lower()] = flag
    window = item.get("GROUP_WINDOW_SECONDS")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int | float)):
        raise ValueError(f"{where}: GROUP_WINDOW_SECONDS must be a number of seconds")
    if window is not None and not window > 0:
        raise ValueError(f"{where}: GROUP_WINDOW_SECONDS must be above 0")
    return WebhookEndpoint(
        name=name.strip(),
        url=str(url),
        secret=secret or "",
        events=tuple(dict.fromkeys(events)),
        methods=tuple(dict.fromkeys(methods)),
        format=fmt,
        group_window_seconds=None if window is None else float(window),
        **flags,
    )


def _strings(where: str, key: str, value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list | tuple | set | frozenset) or not all(
        isinstance(item, str) and item for item in value
    ):
        raise ValueError(f"{where}: {key} must be a list of strings")
    return tuple(value)
