"""The stored form of a payload: what the signals carry and the log row keeps.

One walk over the caller's value makes it storable (as :func:`~django_rpc_audit.sanitize.sanitize`
does), withholds secrets (as :mod:`~django_rpc_audit.redaction` says) and caps it (at
``MAX_PARAMS_BYTES`` / ``MAX_RESPONSE_BYTES``), and it stops once the cap is reached: the work
on the caller's thread is bounded by what is kept, whatever the size or shape of the input.
Capping decides first what is kept; only the kept part is searched for secrets, and a string
cut by the cap is searched as cut (a secret running past the cut is redacted to the cut), so
no part of a secret survives a cut. Keys are checked before their values are kept, so
key-based redaction is complete for everything stored.
"""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import enum
import json
import math
import uuid
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from django.db import models
from django.utils.functional import Promise

from django_rpc_audit.heldtext import HeldText, hold
from django_rpc_audit.redaction import (
    DROPPED,
    FAILED,
    FieldRule,
    Redactor,
    _is_secret,
    redact_text,
)
from django_rpc_audit.sanitize import (
    _MAX_INT,
    MAX_DEPTH,
    TRUNCATED_KEY,
    _cut_utf8,
    _dumps_plain,
    _key,
    _last_utf8,
    _safe_repr,
    _sanitize,
    _utf8_size,
    clean_text,
)
from django_rpc_audit.utils import REDACTED

#: Characters read past a cut, so that what follows a secret near the cut (the ``@`` after a
#: URL's password, a closing quote) is seen; the stored text is cut at the cap afterwards.
CUT_MARGIN = 256

#: Keys of a name/value record (HAR headers and cookies, many APIs) naming the ``value``'s key.
_RECORD_NAME_KEYS = ("name", "Name", "key", "Key", "header", "field", "param", "parameter")
_RECORD_NAME_SET = frozenset(_RECORD_NAME_KEYS)
_RECORD_VALUE_KEYS = frozenset({"value", "Value", "values"})
_SCALAR_TYPES = (
    decimal.Decimal,
    uuid.UUID,
    Promise,
    datetime.date,
    datetime.time,
    datetime.timedelta,
)


@dataclass(frozen=True, slots=True)
class Stored:
    """A payload's stored form: ``value`` (plain JSON types) and its compact JSON ``text``."""

    value: Any
    text: str
    #: True when the value was over its cap and ``value`` is the truncation marker.
    truncated: bool = False


def stored(
    value: Any,
    max_bytes: int | None,
    redactor: Redactor | None = None,
    rule: FieldRule | None = None,
    *,
    original_bytes: int | None = None,
) -> Stored:
    """The stored form of ``value``: its method ``rule`` applied, sanitized, redacted by
    ``redactor`` (if any) and capped at ``max_bytes`` UTF-8 bytes of compact JSON (``None``:
    no cap). Never raises (a failure withholds the value).

    A value over the cap becomes a marker that is still valid JSON::

        {"_truncated": true, "original_bytes": 1398146, "preview": "{\\"name\\":\\"a.pdf\\",..."}

    ``preview`` is the start of the redacted value's compact JSON. ``original_bytes`` is the
    size before the cut: ``original_bytes`` when given (the client passes the size the value
    had on the wire), else the compact JSON size of the value (one C-speed pass, only for
    values over the cap), or ``null`` when that cannot be had.
    """
    try:
        return _stored(value, max_bytes, redactor, rule, original_bytes)
    except Exception:  # never leak, never break the call
        return Stored(dict(FAILED), _dumps_plain(FAILED))


class Deferred:
    """A payload whose stored form is made later, by the log writer's thread, from the JSON
    text it had on the wire (the request's body, the reply as received): what the client hands
    the built-in receivers when no other receiver reads the stored form (see
    ``django_rpc_audit.receivers``).

    The text is immutable, so what is logged is what was sent and received, whatever the
    caller does with its objects afterwards. :meth:`resolve` gives the same :class:`Stored`
    that :func:`stored` gives for the value the text encodes (the client defers only params
    whose wire encoding converted nothing, so that value is the caller's). ``size``: the
    characters (or bytes) held until then, which the buffer counts against
    ``BUFFER_MAX_BYTES``; the client defers only texts up to a small multiple of the cap.
    A longer payload is cut on the caller's thread, and the buffer keeps the text of its stored
    form the same way (:meth:`of_stored`). The texts are copied into recycled memory
    (:mod:`~django_rpc_audit.heldtext`).
    """

    __slots__ = (
        "_stored",
        "key",
        "max_bytes",
        "original_bytes",
        "redactor",
        "rule",
        "source",
        "verbatim",
    )

    def __init__(
        self,
        source: str | bytes,
        key: str | None,
        max_bytes: int | None,
        redactor: Redactor | None,
        rule: FieldRule | None,
        original_bytes: int | None,
    ) -> None:
        #: The JSON text (copied into recycled memory, see :mod:`~django_rpc_audit.heldtext`);
        #: ``key``: the member holding the payload (``None``: the whole text).
        self.source: str | bytes | HeldText = hold(source)
        self.key = key
        self.max_bytes = max_bytes
        self.redactor = redactor
        self.rule = rule
        self.original_bytes = original_bytes
        #: True when ``source`` is a stored form's own text (:meth:`of_stored`).
        self.verbatim = False
        self._stored: Stored | None = None

    @classmethod
    def of_stored(cls, result: Stored) -> Deferred:
        """``result``, made on the caller's thread, kept as its text alone (in recycled memory)
        until the writer's thread parses its value back: the caller lets go of the value and
        of its own text at once. What the client does with a payload cut at its cap."""
        deferred = cls(result.text, None, None, None, None, None)
        deferred.verbatim = True
        return deferred

    def __repr__(self) -> str:
        return f"<Deferred {self.key or 'document'}: {len(self.source)} characters>"

    @property
    def size(self) -> int:
        """Characters held: the text, or once resolved its stored form (value and text)."""
        if self._stored is not None:
            return 2 * len(self._stored.text)
        return len(self.source)

    def resolve(self) -> Stored:
        """The stored form, made once (the text is then let go). Never raises."""
        if self._stored is None:
            self._stored = self._resolve()
            self.source = ""
        return self._stored

    def _resolve(self) -> Stored:
        try:
            source = self.source
            source = source.take() if isinstance(source, HeldText) else source
            if self.verbatim:
                text = source if isinstance(source, str) else source.decode("utf-8")
                return Stored(_loads(text), text, truncated=True)
            document = _loads(source)
            if self.key is not None:
                document = document.get(self.key)
        except Exception:  # the client checked the text already: never here
            return Stored(dict(FAILED), _dumps_plain(FAILED))
        if document is None:
            document = {}  # a null result is the caller's {}
        return stored(
            document, self.max_bytes, self.redactor, self.rule, original_bytes=self.original_bytes
        )


_raw_decode = json.JSONDecoder().raw_decode


def _loads(source: str | bytes) -> Any:
    """``json.loads(source)``, without its two whitespace searches when the text is one JSON
    document and nothing else (the client's own wire texts)."""
    if type(source) is str:
        try:
            document, end = _raw_decode(source)
        except ValueError:
            end = -1
        if end == len(source):
            return document
    return json.loads(source)  # whitespace around the document, bytes, or an error to raise


def _stored(
    value: Any,
    max_bytes: int | None,
    redactor: Redactor | None,
    rule: FieldRule | None,
    original_bytes: int | None,
) -> Stored:
    if rule == "drop":
        return Stored(dict(DROPPED), _dumps_plain(DROPPED))
    if rule is not None and isinstance(value, Mapping):
        value = {key: value[key] for key in rule if key in value}
    walker = _Walker(redactor, max_bytes)
    copy = walker.walk(value, 0)
    text = _dumps_plain(copy)
    if max_bytes is None:
        return Stored(copy, text)
    if not walker.cut:
        size = _utf8_size(text)
        if size <= max_bytes:
            return Stored(copy, text)
        original_bytes = size
    elif original_bytes is None:
        original_bytes = _json_size(value)
    return _marker(text, original_bytes, max_bytes)


def _json_size(value: Any) -> int | None:
    """Compact UTF-8 JSON size of the original ``value``, at the C encoder's speed."""
    try:
        text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=_safe_repr)
        return len(text.encode("utf-8", "surrogatepass"))
    except Exception:  # cycles, nesting beyond the interpreter's limit, NaN in a key...
        return None


def _marker(text: str, original_bytes: int | None, max_bytes: int) -> Stored:
    """The truncation marker of ``text``, its own text made with one encoding of the preview."""
    head = f'{{"{TRUNCATED_KEY}":true,"original_bytes":{json.dumps(original_bytes)},"preview":'
    room = max_bytes - len(head) - 3  # the preview's quotes and the closing brace
    preview = _cut_utf8(text, room) if room > 0 else ""
    encoded = _encode_json_text(preview)
    # Escapes (quotes, backslashes) grow the preview inside JSON.
    while preview and len(head) + _utf8_size(encoded) + 1 > max_bytes:
        preview = preview[: max(0, len(preview) - max(1, len(preview) // 10))]
        encoded = _encode_json_text(preview)
    marker = {TRUNCATED_KEY: True, "original_bytes": original_bytes, "preview": preview}
    return Stored(marker, f"{head}{encoded}}}", truncated=True)


_encode_string = json.encoder.encode_basestring  # what _dumps_plain writes for a str


def _encode_json_text(text: str) -> str:
    """``_encode_string(text)`` for (a piece of) JSON text that :data:`_dumps_plain` wrote, at
    twice its speed: such text holds no control character (all are escaped as ``\\n`` or
    ``\\u001f``), so only backslashes and quotes need escaping."""
    if "\\" in text:
        text = text.replace("\\", "\\\\")
    if '"' in text:
        text = text.replace('"', '\\"')
    return f'"{text}"'


class _Walker:
    """Copies a value as plain JSON types until ``budget`` characters of JSON are kept.

    ``left`` counts down a lower bound of the JSON text kept so far (each string's characters,
    each key's, a few for each scalar and separator): once it is spent, the walk stops and
    ``cut`` is set; the caller encodes what was kept and measures it exactly.
    """

    __slots__ = ("cut", "extra", "left", "path", "redact", "redactions")

    def __init__(self, redactor: Redactor | None, budget: int | None) -> None:
        self.redact = redactor is not None
        self.extra = redactor.extra_keys if redactor is not None else frozenset()
        self.left: float = math.inf if budget is None else budget
        self.cut = False
        self.path: set[int] = set()
        self.redactions = 0

    def walk(self, value: Any, depth: int) -> Any:
        # The exact types json.loads makes (most payloads) first, each as the general path
        # below would take it, without its chain of isinstance checks.
        kind = type(value)
        if kind is str:
            return self.string(value, depth)
        if kind is int:
            self.left -= 2
            return value if -_MAX_INT < value < _MAX_INT else _sanitize(value, 0, set())
        if kind is float:
            self.left -= 2
            return value if math.isfinite(value) else _sanitize(value, 0, set())
        if kind is dict or kind is list:
            if depth >= MAX_DEPTH:
                return self.string(f"<nested deeper than {MAX_DEPTH} levels>", depth)
            marker = id(value)
            if marker in self.path:
                return self.string("<cycle>", depth)
            self.path.add(marker)
            try:
                if kind is dict:
                    return self.mapping(value, value.items(), depth + 1)
                return self.sequence(value, depth + 1, pair=len(value) == 2)
            finally:
                self.path.discard(marker)
        if value is None or value is True or value is False:
            self.left -= 5
            return value
        if isinstance(value, str):
            return self.string(str(value), depth)
        if isinstance(value, enum.Enum):
            return self.walk(value.value, depth)
        if isinstance(value, int):
            self.left -= 2
            number = int(value)
            return number if abs(number) < _MAX_INT else _sanitize(number, 0, set())
        if isinstance(value, float):
            self.left -= 2
            return _sanitize(value, 0, set())
        if isinstance(value, bytes | bytearray | memoryview):
            return self.raw_bytes(value, depth)
        if isinstance(value, _SCALAR_TYPES):
            converted = _sanitize(value, 0, set())
            if isinstance(converted, str):
                return self.string(converted, depth)
            self.left -= 2
            return converted
        if depth >= MAX_DEPTH:
            # Too deep to inspect: withheld, whatever it holds.
            return self.string(f"<nested deeper than {MAX_DEPTH} levels>", depth)
        marker = id(value)
        if marker in self.path:
            return self.string("<cycle>", depth)
        self.path.add(marker)
        try:
            return self.container(value, depth + 1)
        finally:
            self.path.discard(marker)

    def container(self, value: Any, depth: int) -> Any:
        if isinstance(value, Mapping):
            return self.mapping(value, value.items(), depth)
        if isinstance(value, list | tuple | deque):
            return self.sequence(value, depth, pair=len(value) == 2)
        if isinstance(value, set | frozenset):
            items = self.sequence(value, depth, pair=False)
            # Sets have no order; a stable one makes equal sets log equal rows.
            return sorted(items, key=_dumps_plain)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            fields = {f.name: getattr(value, f.name, None) for f in dataclasses.fields(value)}
            return self.mapping(fields, fields.items(), depth)
        if isinstance(value, models.Model):
            model = {"model": value._meta.label_lower, "pk": value.pk}
            return self.mapping(model, model.items(), depth)
        model_dump = getattr(value, "model_dump", None)  # pydantic v2, without importing it
        if callable(model_dump) and not isinstance(value, type):
            try:
                dumped = model_dump(mode="json")
            except Exception:
                return self.string(_safe_repr(value), depth)
            return self.walk(dumped, depth - 1)
        return self.string(_safe_repr(value), depth)

    def mapping(self, source: Any, items: Any, depth: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        self.left -= 2
        hidden = self.record_value_keys(source)
        for raw_key, item in items:
            if self.left <= 0:
                self.cut = True
                break
            if isinstance(raw_key, str) and len(raw_key) + 4 > self.left:
                # A key longer than what is left: keep its start; its value is past the cut.
                out[clean_text(raw_key[: int(self.left) + CUT_MARGIN])] = None
                self.cut = True
                break
            key = _key(raw_key)
            self.left -= len(key) + 4
            if self.redact and (key in hidden or _is_secret(key, self.extra)):
                out[key] = REDACTED
                self.redactions += 1
                self.left -= 5
                continue
            out[key] = self.walk(item, depth)
            if self.cut:
                break
        return out

    def record_value_keys(self, source: Any) -> frozenset[str]:
        """``{"name": "X-Api-Key", "value": "abc"}``: the keys whose values are the secret."""
        if not self.redact or not isinstance(source, Mapping):
            return frozenset()
        if type(source) is dict and source.keys().isdisjoint(_RECORD_NAME_SET):
            return frozenset()  # no name key: one set operation instead of a lookup per name
        for name_key in _RECORD_NAME_KEYS:
            try:
                name = source.get(name_key)
            except Exception:
                return frozenset()
            if isinstance(name, str) and _is_secret(name, self.extra):
                return _RECORD_VALUE_KEYS
        return frozenset()

    def sequence(self, value: Any, depth: int, *, pair: bool) -> list[Any]:
        out: list[Any] = []
        self.left -= 2
        # ``["X-Api-Key", "abc"]``, ``("Authorization", "Bearer ...")``: a header as a pair.
        secret_pair = (
            pair
            and self.redact
            and isinstance(value[0], str)
            and len(value[0]) <= 256
            and _is_secret(value[0], self.extra)
        )
        for index, item in enumerate(value):
            if self.left <= 0:
                self.cut = True
                break
            if secret_pair and index == 1:
                out.append(REDACTED)
                self.redactions += 1
                self.left -= 6
                continue
            self.left -= 1
            out.append(self.walk(item, depth))
            if self.cut:
                break
        return out

    def raw_bytes(self, value: bytes | bytearray | memoryview, depth: int) -> str:
        limit = None if math.isinf(self.left) else (max(int(self.left), 0) + CUT_MARGIN) * 4
        data = bytes(value[:limit] if limit is not None else value)
        text = data.decode("utf-8", "backslashreplace")
        return self.string(text, depth, longer=limit is not None and len(value) > limit)

    def string(self, text: str, depth: int, *, longer: bool = False) -> str:
        if longer or len(text) + 2 > self.left:
            # The cap falls in this string: keep its start (and a margin), searched as cut.
            self.cut = True
            keep = text[: max(int(min(self.left, len(text))), 0) + CUT_MARGIN]
            self.left = 0
            keep = clean_text(keep)
            return redact_text(keep, self.extra, cut=True) if self.redact else keep
        self.left -= len(text) + 2
        text = clean_text(text)
        if not self.redact:
            return text
        if text and (text[0] in "{[" or text[0].isspace()):
            structured = self.json_in_text(text, depth)
            if structured is not None:
                return structured
        redacted = redact_text(text, self.extra)
        if redacted is not text:
            self.redactions += 1
        return redacted

    def json_in_text(self, text: str, depth: int) -> str | None:
        """A string holding JSON (a request body, a header dump) is redacted as JSON."""
        stripped = text.strip()
        # Empty and blank strings are no JSON: parsing each of them only raised.
        if len(stripped) < 2 or stripped[0] not in "{[" or stripped[-1] not in "}]":
            return None
        if depth >= MAX_DEPTH:
            return None
        try:
            parsed = json.loads(stripped)
        except (ValueError, RecursionError):
            return None
        inner = _Walker(None, None)
        inner.redact, inner.extra = True, self.extra
        copy = inner.walk(parsed, depth + 1)
        if not inner.redactions:
            return None
        self.redactions += 1
        return _dumps_plain(copy)


#: How far back the end kept of a cut text is searched from the start of its line (a
#: ``key: value`` runs to the end of the line): this many times the cap, at least
#: ``TAIL_LOOKBACK_MIN`` characters. The work stays a bounded multiple of what is kept.
TAIL_LOOKBACK = 16
TAIL_LOOKBACK_MIN = 262_144


def stored_text(text: str | None, max_bytes: int, redactor: Redactor | None = None) -> str | None:
    """An error message as stored: capped at ``max_bytes`` UTF-8 bytes keeping its start and
    its end, and redacted, the work bounded by what is kept.

    A text over the cap keeps its start (two thirds of the room) and its end (one third),
    joined by a note of the original size: ``... [truncated, 25000 bytes] ...``, so the last
    lines of a traceback, or the end of one long line, survive. The start is searched for
    secrets as cut (a secret running past the cut is redacted to the cut). The end is searched
    together with what precedes it on its line, so a secret that began before the end's first
    character (``password: ...`` runs to the end of its line) is redacted whole; only when
    that line began further back than ``TAIL_LOOKBACK`` caps (``TAIL_LOOKBACK_MIN``
    characters at least) does the end kept start at its next line break instead. Never raises.
    """
    if not text:
        return text
    try:
        return _stored_text(str(text), max_bytes, redactor)
    except Exception:
        return FAILED["_redacted"]


def _stored_text(text: str, max_bytes: int, redactor: Redactor | None) -> str:
    extra = redactor.extra_keys if redactor is not None else frozenset()

    def redact(part: str, *, cut: bool = False) -> str:
        return redact_text(part, extra, cut=cut) if redactor is not None else part

    if len(text) <= max_bytes:
        whole = redact(clean_text(text))
        if _utf8_size(whole) <= max_bytes:
            return whole
    size = _utf8_size(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))
    note = f" ... [truncated, {size} bytes] ... "
    room = max(0, max_bytes - len(note))
    head_bytes, tail_bytes = room - room // 3, room // 3
    head = redact(clean_text(text[: head_bytes + CUT_MARGIN]), cut=True)
    head = _cut_utf8(head, head_bytes)
    return head + note + _tail(text, max_bytes, tail_bytes, redact)


def _tail(text: str, max_bytes: int, tail_bytes: int, redact: Any) -> str:
    """The end of ``text`` in at most ``tail_bytes`` bytes, redacted with the start of its line
    (see :func:`stored_text`)."""
    if tail_bytes <= 0:
        return ""
    start = len(text) - tail_bytes
    floor = max(0, start - max(TAIL_LOOKBACK * max_bytes, TAIL_LOOKBACK_MIN))
    line = text.rfind("\n", floor, start)
    if line >= 0 or floor == 0:
        context = line + 1  # the start of the line (or of the text) the end begins in
    else:
        # That line began too far back to search: the end kept starts at its next line.
        context = text.find("\n", start)
        if context < 0:
            return ""
    # Redacted from the start of its line, then cut: a secret is replaced whole before the
    # cut, so none shows its tail.
    return _last_utf8(redact(clean_text(text[context:])), tail_bytes)
