"""Redaction: secrets in params, responses, error messages and URLs never reach a receiver.

A key names a secret when one of its words (or a run of adjacent words) is a secret word:
keys are split on ``_``, ``-``, ``.``, spaces and camelCase boundaries and compared whole and
case-insensitively, so ``db_password``, ``X-Api-Key`` and ``accessToken`` are secrets while
``monkey`` and ``tokenizer_name`` are not.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import re2

from django_rpc_audit.utils import REDACTED, method_rule

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
# Word boundaries inside a key: camelCase, acronyms (``HTTPAuthorization``) and digit runs
# (``password2`` -> password, 2). Each alternative looks one character back and at most two
# ahead, so Python's engine runs it in linear time (tests/test_linear_time.py checks it).
_CAMEL = re.compile(
    r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])|(?<=[A-Za-z])(?=[0-9])|(?<=[0-9])(?=[A-Za-z])"
)
_SEPARATORS = re.compile(r"[\s_.\-]+")
#: Keys longer than this are checked without caching (the cache must not hold user data).
_MAX_CACHED_KEY = 256

#: What a rule may say about a method's params or response: drop it, or keep only these keys.
FieldRule = Literal["drop"] | tuple[str, ...]
DROPPED: dict[str, str] = {"_redacted": "dropped by a per-method rule"}
FAILED: dict[str, str] = {"_redacted": "redaction failed; value withheld"}


def key_words(key: str) -> list[str]:
    """The lower-case words of ``key``: ``"X-Api-Key"`` -> ``["x", "api", "key"]``; digits are a
    word of their own (``"password2"`` -> ``["password", "2"]``)."""
    return [word.lower() for word in _SEPARATORS.split(_CAMEL.sub(" ", key)) if word]


def _normalise(word: str) -> str:
    return "".join(key_words(word))


def _is_secret(key: str, extra: frozenset[str]) -> bool:
    if len(key) <= _MAX_CACHED_KEY:
        return _is_secret_cached(key, extra)
    return _is_secret_uncached(key, extra)


@functools.lru_cache(maxsize=4096)
def _is_secret_cached(key: str, extra: frozenset[str]) -> bool:
    return _is_secret_uncached(key, extra)


def _is_secret_uncached(key: str, extra: frozenset[str]) -> bool:
    # A secret word made of the key's words (joined) is a substring of the key without its
    # separators, lower-cased: most keys contain none, and are told apart at C speed without
    # splitting them into words (lower() is per character but for the final sigma, which no
    # secret word holds).
    compact = _compact(key).lower()
    short, long = _secret_word_finders(extra)
    finder = short if len(compact) <= _MAX_CACHED_KEY else long
    if finder.search(compact) is None:
        return False
    return _is_secret_words(key_words(key), extra)


def _compact(key: str) -> str:
    """``key`` without its separators (``_SEPARATORS``). Most keys are snake_case or camelCase:
    once their underscores are gone they are letters and digits alone (no separator is
    either), told by two C calls at a third of ``re.sub``'s cost."""
    compact = key.replace("_", "")
    if compact.isalnum():
        return compact
    return _SEPARATORS.sub("", compact)


@functools.lru_cache(maxsize=16)
def _secret_word_finders(extra: frozenset[str]) -> tuple[Any, Any]:
    """Patterns finding a secret word anywhere in a text: Python's for short keys (a literal
    alternation on at most ``_MAX_CACHED_KEY`` characters: bounded, and five times faster to
    call), RE2 for longer ones (linear whatever the length)."""
    words = "|".join(re.escape(word) for word in sorted(SECRET_WORDS | extra, key=len))
    return re.compile(words), re2.compile(words)


def _is_secret_words(words: list[str], extra: frozenset[str]) -> bool:
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


# -- secrets in free text ------------------------------------------------------------------------
#
# Every pattern runs on RE2 (google-re2), whose matching time is linear in the text, and each
# is built so that one ``finditer`` pass stays linear too: an attempt that scans far and fails
# shares its fate with every later start inside the scanned run, so no run is scanned twice.
# They run on UTF-8 bytes, encoded once per text (google-re2 re-encodes a ``str`` per call).
# Values are then read with possessive Python patterns (no backtracking) from where RE2 left.

# ``scheme://user:password@host``: the userinfo runs to the last ``@`` of the word, so a
# password with an unencoded ``@``, ``/``, ``?`` or ``#`` is hidden whole.
_URL_USERINFO = re2.compile(rb"([A-Za-z][A-Za-z0-9+.\-]*://)(\S*)@")
# The same, cut before its ``@`` (a text capped mid-URL): everything after ``://`` may be one.
_URL_OPEN = re2.compile(rb"[A-Za-z][A-Za-z0-9+.\-]*://(\S+)\z")
# ``Bearer <token>`` and the other HTTP authorization schemes; Digest's parameters run to the
# end of the line.
_AUTH_SCHEME = re2.compile(
    rb"(?i)\b(?:(bearer|basic|token|api[-_]?key|negotiate)[ \t]+([A-Za-z0-9\-._~+/]+=*)"
    rb"|(digest)[ \t]+([^\r\n]+))"
)
_SCHEME_PREFIX = re.compile(rb"(?i)(?:bearer|basic|token|api[-_]?key|negotiate|digest)[ \t]++")
# Values after ``key=`` / ``key: ``, read possessively from where the key's match ended.
# A quoted value may be cut at the end of the text, even right after a backslash (a cut text,
# a value cut inside an escape): it then runs to the end, and is hidden whole.
_DOUBLE_QUOTED = re.compile(rb'"(?:[^"\\]|\\.)*+(?:"|\\?\Z)', re.S)
_SINGLE_QUOTED = re.compile(rb"'(?:[^'\\]|\\.)*+(?:'|\\?\Z)", re.S)
_REST_OF_LINE = re.compile(rb"[^\r\n]*+")
_BARE_VALUE = re.compile(rb"[^\s&,;\"'<>]*+")
_REDACTED_BYTES = REDACTED.encode()


@functools.lru_cache(maxsize=16)
def _assignment_pattern(extra: frozenset[str]) -> Any:
    """``key=`` / ``key: `` / ``"key": `` whose key may name a secret.

    Only keys that contain a secret word (its letters, separators allowed between them) are
    matched, so text full of ``a=b`` or ``AB:CD`` costs one RE2 scan and no Python step per
    pair; :func:`_is_secret` then decides on whole words.
    """
    words = sorted(SECRET_WORDS | extra, key=len, reverse=True)
    spelled = "|".join("[_.\\-]*".join(re2.escape(char) for char in word) for word in words)
    return re2.compile(
        rf"(?i)((?:[a-z][\w.\-]*?)?(?:{spelled})[\w.\-]*)([\"']?\s*[=:][ \t]*)".encode()
    )


def _looks_like_credential(value: str) -> bool:
    """Tell ``Bearer eyJ0eXAi...`` from ``Basic authentication failed``."""
    if len(value) < 8:
        return False
    return any(char.isdigit() or char in '-._~+/="' for char in value) or any(
        char.isupper() for char in value[1:]
    )


def redact_text(text: str, extra_keys: frozenset[str] = frozenset(), *, cut: bool = False) -> str:
    """``text`` with secrets it quotes replaced by ``***``, in time linear in its length.

    Catches ``key=value`` / ``key: value`` pairs whose key is secret (a value after ``:`` runs
    to the end of the line, a quoted value to its closing quote; so query strings and headers
    too), HTTP authorization schemes (``Bearer``, ``Basic``, ``Token``, ``ApiKey``, ``Digest``,
    ``Negotiate``) and credentials in URLs (``redis://:***@cache``). With ``cut``, ``text`` is
    the start of a longer text: a secret that may go on past its end is redacted to the end. ::

        >>> redact_text("GET /cb?code=1&access_token=abc failed: Bearer eyJhbGciOi.x")
        'GET /cb?code=1&access_token=*** failed: Bearer ***'
    """
    if not text:
        return text
    colon, equals = ":" in text, "=" in text
    space = " " in text or "\t" in text
    if not (colon or equals or space):
        return text  # nothing below can match: skip the encoding
    data = text.encode("utf-8", "surrogatepass")
    spans: list[tuple[int, int, bytes]] = []
    if colon and "://" in text:
        _url_spans(data, spans, cut)
    if space:
        _scheme_spans(data, spans, cut)
    if colon or equals:
        _assignment_spans(data, spans, extra_keys)
    if not spans:
        return text
    return _splice(data, spans).decode("utf-8", "surrogatepass")


def _url_spans(data: bytes, spans: list[tuple[int, int, bytes]], cut: bool) -> None:
    if b"@" in data:
        for match in _URL_USERINFO.finditer(data):
            userinfo = match[2]
            start = match.start(2)
            user, colon, _ = userinfo.partition(b":")
            if colon and not any(char in user for char in b"/?#"):
                spans.append((start + len(user) + 1, match.end(2), _REDACTED_BYTES))
            elif colon or _looks_like_credential(userinfo.decode("utf-8", "replace")):
                spans.append((start, match.end(2), _REDACTED_BYTES))
    if cut:
        match = _URL_OPEN.search(data)
        if match is not None and b"@" not in match[1]:
            spans.append((match.start(1), len(data), _REDACTED_BYTES))


def _scheme_spans(data: bytes, spans: list[tuple[int, int, bytes]], cut: bool) -> None:
    for match in _AUTH_SCHEME.finditer(data):
        group = 2 if match[2] is not None else 4
        value = match[group].decode("utf-8", "replace")
        at_cut = cut and match.end() == len(data)
        if value != REDACTED and (at_cut or _looks_like_credential(value)):
            spans.append((match.start(group), match.end(group), _REDACTED_BYTES))


def _assignment_spans(
    data: bytes, spans: list[tuple[int, int, bytes]], extra: frozenset[str]
) -> None:
    covered = 0  # end of the last value redacted: keys inside it are hidden already
    for match in _assignment_pattern(extra).finditer(data):
        if match.start() < covered or not _is_secret(match[1].decode("ascii", "replace"), extra):
            continue
        position = match.end()
        first = data[position : position + 1]
        if first == b'"':
            value = _DOUBLE_QUOTED.match(data, position)
        elif first == b"'":
            value = _SINGLE_QUOTED.match(data, position)
        elif b":" in match[2]:
            scheme = _SCHEME_PREFIX.match(data, position)
            if scheme is not None:
                position = scheme.end()  # keep the scheme word, hide its credential
            value = _REST_OF_LINE.match(data, position)
        else:
            value = _BARE_VALUE.match(data, position)
        if value is None:
            continue
        start, end = value.span()
        if first in (b'"', b"'"):
            # Keep the quotes: the text stays the JSON or Python it was.
            start += 1
            if end > start and data[end - 1 : end] == first and end - 1 >= start:
                end -= 1
        covered = max(covered, value.end())
        if end <= start or data[start:end] == _REDACTED_BYTES:
            continue
        spans.append((start, end, _REDACTED_BYTES))


def _splice(data: bytes, spans: list[tuple[int, int, bytes]]) -> bytes:
    """``data`` with each span replaced; overlapping spans become one replacement."""
    spans.sort()
    pieces: list[bytes] = []
    position = 0
    for start, end, replacement in spans:
        if end <= position:
            continue  # inside a span already replaced
        if start >= position:
            pieces += [data[position:start], replacement]
        # else: it overlaps the previous span, whose replacement stands for both
        position = end
    pieces.append(data[position:])
    return b"".join(pieces)


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
        found = method_rule(self.method_rules, method)
        return MethodRule() if found is None else found[1]

    def params(self, method: str, params: Any) -> Any:
        """``params`` as receivers may see them: the method's rule applied, then redacted."""
        return self._apply(self.rule_for(method).params, params)

    def response(self, method: str, response: Any) -> Any:
        """``response`` as receivers may see it (``None`` stays ``None``)."""
        if response is None:
            return None
        return self._apply(self.rule_for(method).response, response)

    def text(self, text: str | None) -> str | None:
        """An error message with the secrets it echoes redacted."""
        if not text:
            return text
        try:
            return redact_text(str(text), self.extra_keys)
        except Exception:
            return FAILED["_redacted"]

    def value(self, value: Any) -> Any:
        """``value`` made storable (:func:`~django_rpc_audit.sanitize.sanitize`) with secret
        keys' values, secrets in strings and values nested too deep to inspect withheld. Not
        capped: what the client sends to receivers is :func:`~django_rpc_audit.payload.stored`.
        """
        from django_rpc_audit.payload import stored

        return stored(value, None, self).value

    def _apply(self, rule: FieldRule | None, value: Any) -> Any:
        from django_rpc_audit.payload import stored

        return stored(value, None, self, rule).value


@functools.lru_cache(maxsize=16)
def get_redactor(
    extra_keys: tuple[str, ...] = (), method_rules: tuple[tuple[str, MethodRule], ...] = ()
) -> Redactor:
    """The (cached) :class:`Redactor` of ``REDACT_KEYS`` and ``REDACT_METHODS``."""
    return Redactor(extra_keys, method_rules)
