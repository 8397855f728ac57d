"""Redaction: secrets in params, responses, error messages and URLs never reach a receiver.

A key names a secret when one of its words (or a run of adjacent words) is a secret word:
keys are split on ``_``, ``-``, ``.``, spaces and camelCase boundaries and compared whole and
case-insensitively, so ``db_password``, ``X-Api-Key`` and ``accessToken`` are secrets while
``monkey`` and ``tokenizer_name`` are not.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from django_rpc_audit.utils import REDACTED

#: Secret words, compared with a key's words (or adjacent words joined: ``api_key`` -> apikey).
SECRET_WORDS: frozenset[str] = frozenset(
    {
        "password",
        "passwd",
        "pwd",
        "passphrase",
        "secret",
        "token",
        "apikey",
        "accesstoken",
        "refreshtoken",
        "idtoken",
        "authorization",
        "bearer",
        "cookie",
        "session",
        "sessionid",
        "csrf",
        "csrftoken",
        "csrfmiddlewaretoken",
        "xsrf",
        "privatekey",
        "secretkey",
        "clientsecret",
        "credential",
        "credentials",
        "jwt",
        "signature",
    }
)

#: Adjacent words joined when looking a key up (``private_key_pem`` -> privatekey).
_MAX_RUN = 3
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")
_SEPARATORS = re.compile(r"[\s_.\-]+")
_MAX_DEPTH = 64

#: What a rule may say about a method's params or response: drop it, or keep only these keys.
FieldRule = Literal["drop"] | tuple[str, ...]
DROPPED: dict[str, str] = {"_redacted": "dropped by a per-method rule"}
FAILED: dict[str, str] = {"_redacted": "redaction failed; value withheld"}


def key_words(key: str) -> list[str]:
    """The lower-case words of ``key``: ``"X-Api-Key"`` -> ``["x", "api", "key"]``."""
    return [word.lower() for word in _SEPARATORS.split(_CAMEL.sub(" ", key)) if word]


def _normalise(word: str) -> str:
    return "".join(key_words(word))


@functools.lru_cache(maxsize=4096)
def _is_secret(key: str, extra: frozenset[str]) -> bool:
    words = key_words(key)
    for start in range(len(words)):
        for end in range(start + 1, min(start + _MAX_RUN, len(words)) + 1):
            joined = "".join(words[start:end])
            if joined in SECRET_WORDS or joined in extra:
                return True
    return False


def is_secret_key(key: object, extra_keys: Iterable[str] = ()) -> bool:
    """True when the mapping key ``key`` names a secret (see the module docstring)."""
    if not isinstance(key, str):
        return False
    return _is_secret(key, frozenset(_normalise(word) for word in extra_keys))


# ``token=abc``, ``"password": "abc"``, ``api_key: abc`` in free text and query strings. The
# value is matched in a lookahead: a key that is not secret must not swallow the text after it
# (``https://host/?token=abc`` has the non-secret key ``https`` first).
_ASSIGNMENT = re.compile(
    r"""(?P<key>[A-Za-z][\w.\-]{0,63})(?P<sep>["']?\s*[=:]\s*)"""
    r"""(?=(?P<value>"[^"]*"|'[^']*'|[^\s&,;"'<>]+))"""
)
_AUTH_SCHEME = re.compile(r"(?i)\b(?P<scheme>bearer|basic)\s+(?P<value>[\w\-.~+/]+=*)")
_URL_PASSWORD = re.compile(r"(?P<prefix>[a-z][a-z0-9+.\-]*://[^/\s:@]*:)(?P<value>[^@\s/]+)(?=@)")


def _looks_like_credential(value: str) -> bool:
    """Tell ``Bearer eyJ0eXAi...`` from ``Basic authentication failed``."""
    if len(value) < 8:
        return False
    return any(char.isdigit() or char in "-._~+/=" for char in value) or any(
        char.isupper() for char in value[1:]
    )


def redact_text(text: str, extra_keys: frozenset[str] = frozenset()) -> str:
    """``text`` with secrets it quotes replaced by ``***``.

    Catches ``key=value`` / ``key: value`` pairs whose key is secret (so query strings of URLs
    too), ``Bearer``/``Basic`` credentials, and passwords in URLs (``redis://:pw@host``). ::

        >>> redact_text("GET /cb?code=1&access_token=abc failed: Bearer eyJhbGciOi.x")
        'GET /cb?code=1&access_token=*** failed: Bearer ***'
    """
    if not text:
        return text
    text = _URL_PASSWORD.sub(lambda m: f"{m['prefix']}{REDACTED}", text)
    text = _AUTH_SCHEME.sub(
        lambda m: f"{m['scheme']} {REDACTED}" if _looks_like_credential(m["value"]) else m[0],
        text,
    )
    pieces: list[str] = []
    position = 0
    for match in _ASSIGNMENT.finditer(text):
        value = match["value"]
        if match.start() < position or not _is_secret(match["key"], extra_keys):
            continue
        if value == REDACTED or value.lower() in ("bearer", "basic"):
            continue  # already redacted, or a scheme whose credential _AUTH_SCHEME handled
        quote = value[0] if value[:1] in ("'", '"') else ""
        pieces += [text[position : match.end()], f"{quote}{REDACTED}{quote}"]
        position = match.end() + len(value)
    if not pieces:
        return text
    pieces.append(text[position:])
    return "".join(pieces)


@dataclass(frozen=True, slots=True)
class MethodRule:
    """What to keep of one method's params and response (``None``: everything, redacted)."""

    params: FieldRule | None = None
    response: FieldRule | None = None


class Redactor:
    """Applies the secret words, the extra keys and the per-method rules of the settings.

    Redaction copies: the values given are never changed (the wire payload is sent as it was).
    """

    def __init__(
        self,
        extra_keys: Iterable[str] = (),
        method_rules: Sequence[tuple[str, MethodRule]] = (),
    ) -> None:
        self.extra_keys = frozenset(_normalise(word) for word in extra_keys)
        self.method_rules = tuple(method_rules)

    def rule_for(self, method: str) -> MethodRule:
        """The rule of ``method``: an exact name first, then the first matching glob pattern."""
        for pattern, rule in self.method_rules:
            if pattern == method:
                return rule
        for pattern, rule in self.method_rules:
            if fnmatch.fnmatchcase(method, pattern):
                return rule
        return MethodRule()

    def params(self, method: str, params: Any) -> Any:
        """``params`` as receivers may see them."""
        try:
            return self._apply(self.rule_for(method).params, params)
        except Exception:  # never leak, never break the call
            return dict(FAILED)

    def response(self, method: str, response: Any) -> Any:
        """``response`` as receivers may see it (``None`` stays ``None``)."""
        if response is None:
            return None
        try:
            return self._apply(self.rule_for(method).response, response)
        except Exception:
            return dict(FAILED)

    def text(self, text: str | None) -> str | None:
        """An error message with the secrets it echoes redacted."""
        if not text:
            return text
        try:
            return redact_text(str(text), self.extra_keys)
        except Exception:
            return FAILED["_redacted"]

    def value(self, value: Any) -> Any:
        """``value`` with secret keys' values and secrets in strings redacted, recursively."""
        return self._value(value, 0, set())

    def _apply(self, rule: FieldRule | None, value: Any) -> Any:
        if rule == "drop":
            return dict(DROPPED)
        if rule is not None and isinstance(value, Mapping):
            value = {key: item for key, item in value.items() if key in rule}
        return self.value(value)

    def _value(self, value: Any, depth: int, path: set[int]) -> Any:
        if isinstance(value, str):
            return redact_text(value, self.extra_keys)
        if depth >= _MAX_DEPTH:
            return value
        if not isinstance(value, Mapping | list | tuple):
            fields = _object_fields(value)
            if fields is None:
                # Other objects are left for the sanitizer; they are not walked here.
                return value
            # A dataclass or pydantic model becomes the dict the sanitizer would store, so
            # its secret fields are redacted like a dict's keys.
            value = fields
        if id(value) in path:
            return value
        path.add(id(value))
        try:
            if isinstance(value, Mapping):
                return {
                    key: REDACTED
                    if isinstance(key, str) and _is_secret(key, self.extra_keys)
                    else self._value(item, depth + 1, path)
                    for key, item in value.items()
                }
            items = [self._value(item, depth + 1, path) for item in value]
            return items if isinstance(value, list) else tuple(items)
        finally:
            path.discard(id(value))


def _object_fields(value: object) -> dict[str, Any] | None:
    """The fields of a dataclass instance or a pydantic model, else ``None``."""
    if isinstance(value, type):
        return None
    if dataclasses.is_dataclass(value):
        return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    model_dump = getattr(value, "model_dump", None)  # pydantic v2, without importing it
    if callable(model_dump):
        dumped = model_dump()
        return dumped if isinstance(dumped, dict) else None
    return None


@functools.lru_cache(maxsize=16)
def get_redactor(
    extra_keys: tuple[str, ...] = (), method_rules: tuple[tuple[str, MethodRule], ...] = ()
) -> Redactor:
    """The (cached) :class:`Redactor` of ``REDACT_KEYS`` and ``REDACT_METHODS``."""
    return Redactor(extra_keys, method_rules)
