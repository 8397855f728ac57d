"""Make anything a caller passes storable as JSON, and cap what is stored, without ever raising."""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import enum
import json
import math
import re
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

from django.db import models
from django.utils.functional import Promise

#: Containers nested deeper than this are stored as a marker string. 31: MariaDB's JSON
#: columns refuse a document with more nested arrays and objects than that.
MAX_DEPTH = 31
#: Integers with more digits than this are stored as strings (JSON readers lose precision).
MAX_INT_DIGITS = 300
#: Longest ``repr`` kept for an object without a JSON form.
MAX_REPR_CHARS = 1000

TRUNCATED_KEY = "_truncated"

_MAX_INT = 10**MAX_INT_DIGITS

# Any surrogate code point in a Python str is a lone one as far as UTF-8 is concerned.
_SURROGATES = re.compile("[\ud800-\udfff]")
_REPLACEMENT = "\ufffd"


def clean_text(text: str) -> str:
    """``text`` with what PostgreSQL refuses replaced by U+FFFD: NUL and lone surrogates."""
    if text.isascii():  # no surrogates: skip the regular expression
        return text.replace("\x00", _REPLACEMENT) if "\x00" in text else text
    if "\x00" in text:
        text = text.replace("\x00", _REPLACEMENT)
    return _SURROGATES.sub(_REPLACEMENT, text)


def _safe_repr(value: object) -> str:
    try:
        text = repr(value)
    except Exception:  # a broken __repr__ must not lose the row
        text = f"<unrepresentable {type(value).__qualname__}>"
    if len(text) > MAX_REPR_CHARS:
        text = text[:MAX_REPR_CHARS] + "..."
    return clean_text(text)


def _key(key: object) -> str:
    if isinstance(key, str):
        return clean_text(key)
    if key is None or isinstance(key, bool | int | float):
        # The text json.dumps would give these keys.
        return json.dumps(key) if not isinstance(key, float) or math.isfinite(key) else str(key)
    return _safe_repr(key) if not isinstance(key, Promise | uuid.UUID) else str(key)


def sanitize(value: Any) -> Any:
    """A copy of ``value`` made only of JSON types that PostgreSQL's JSONB accepts.

    Never raises. Dates, times, decimals, UUIDs and lazy strings become strings (as Django's
    ``DjangoJSONEncoder`` writes them); sets, tuples and deques become lists; bytes are
    decoded (invalid UTF-8 escaped); dataclasses, pydantic models and model instances become
    objects; NaN and infinities become strings; NUL characters and lone surrogates become
    U+FFFD; cycles and nesting deeper than :data:`MAX_DEPTH` become marker strings; anything
    else becomes its ``repr``. ::

        >>> sanitize({"at": datetime.date(2026, 1, 2), "tags": {"a"}, "x": float("nan")})
        {'at': '2026-01-02', 'tags': ['a'], 'x': 'NaN'}
    """
    try:
        return _sanitize(value, 0, set())
    except Exception:  # RecursionError from an exotic object, or a bug: keep the row anyway
        return _safe_repr(value)


def _sanitize(value: Any, depth: int, path: set[int]) -> Any:
    if value is None or value is True or value is False:
        return value
    if isinstance(value, str):
        return clean_text(str(value))
    if isinstance(value, enum.Enum):
        return _sanitize(value.value, depth, path)
    if isinstance(value, int):
        number = int(value)
        if abs(number) >= _MAX_INT:
            # str() of a huge int may itself refuse (sys.int_info.str_digits_check_threshold).
            return f"<integer of {number.bit_length()} bits>"
        return number
    if isinstance(value, float):
        real = float(value)
        if math.isnan(real):
            return "NaN"
        if math.isinf(real):
            return "Infinity" if real > 0 else "-Infinity"
        return real
    if isinstance(value, decimal.Decimal | uuid.UUID | Promise):
        return clean_text(str(value))
    if isinstance(value, datetime.datetime):
        text = value.isoformat()
        return text[:-6] + "Z" if text.endswith("+00:00") else text
    if isinstance(value, datetime.date | datetime.time):
        return value.isoformat()
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    if isinstance(value, bytes | bytearray | memoryview):
        return clean_text(bytes(value).decode("utf-8", "backslashreplace"))
    if depth >= MAX_DEPTH:
        return f"<nested deeper than {MAX_DEPTH} levels>"
    marker = id(value)
    if marker in path:
        return "<cycle>"
    path.add(marker)
    try:
        return _sanitize_container(value, depth + 1, path)
    finally:
        path.discard(marker)


def _sanitize_container(value: Any, depth: int, path: set[int]) -> Any:
    if isinstance(value, Mapping):
        return {_key(k): _sanitize(v, depth, path) for k, v in list(value.items())}
    if isinstance(value, list | tuple | deque):
        return [_sanitize(item, depth, path) for item in list(value)]
    if isinstance(value, set | frozenset):
        items = [_sanitize(item, depth, path) for item in list(value)]
        # Sets have no order; a stable one makes equal sets log equal rows.
        return sorted(items, key=lambda item: json.dumps(item, sort_keys=True))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: _sanitize(getattr(value, f.name, None), depth, path)
            for f in dataclasses.fields(value)
        }
    if isinstance(value, models.Model):
        return {"model": value._meta.label_lower, "pk": _sanitize(value.pk, depth, path)}
    model_dump = getattr(value, "model_dump", None)  # pydantic v2, without importing it
    if callable(model_dump) and not isinstance(value, type):
        try:
            dumped = model_dump(mode="json")
        except Exception:
            return _safe_repr(value)
        return _sanitize(dumped, depth, path)
    return _safe_repr(value)


def _is_plain(value: Any, depth: int) -> bool:
    """True if ``value`` is made only of exact JSON types that :func:`sanitize` returns as they
    are: ``dict`` with ``str`` keys, ``list``, ``str``, ``int`` below the size limit, ``float``,
    ``bool``, ``None``, nested at most :data:`MAX_DEPTH` levels (which also ends any cycle).

    Subclasses (enums, named tuples, ``str`` subclasses) are not plain: :func:`sanitize` may
    change them. NaN, infinities, NUL and lone surrogates are found in the JSON text instead.
    """
    kind = type(value)
    if kind is str or kind is float or kind is bool or value is None:
        return True
    if kind is int:
        return bool(-_MAX_INT < value < _MAX_INT)
    if depth >= MAX_DEPTH:
        return False
    depth += 1
    if kind is dict:
        for key, item in value.items():
            if type(key) is not str or not _is_plain(item, depth):
                return False
        return True
    if kind is list:
        return all(_is_plain(item, depth) for item in value)
    return False


def _plain_encoder() -> Callable[[Any], str]:
    """``json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)``, made
    without building an encoder per call: the C encoder, made once, when the interpreter has it.

    No circular-reference markers: :func:`_is_plain` has bounded the nesting already.
    """
    encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:
        return encoder.encode
    probe = {"a": [1.5, None, True, -(10**20), 'é\x00\\"']}
    try:
        iterencode = make(
            None, None, json.encoder.encode_basestring, None, ":", ",", False, False, False
        )
        fast = "".join(iterencode(probe, 0))
    except Exception:  # another interpreter's private signature: the public encoder
        return encoder.encode
    if fast != encoder.encode(probe):
        return encoder.encode

    def dumps(value: Any) -> str:
        return "".join(iterencode(value, 0))

    return dumps


_dumps_plain = _plain_encoder()


def plain_json_text(value: Any) -> str | None:
    """The compact JSON text of ``value`` if :func:`sanitize` would return it unchanged, else
    ``None``: the fast path for the common case, one walk and one ``json.dumps`` instead of a
    copy and two dumps. The text is exactly what :func:`cap_json` measures for ``sanitize(value)``.
    """
    try:
        if not _is_plain(value, 0):
            return None
        # NaN and infinities raise; sanitize() would have turned them into strings.
        text = _dumps_plain(value)
    except Exception:  # NaN (ValueError), a dict changed by another thread...: the slow path
        return None
    # NUL is escaped as \u0000 (a literal backslash-u0000 text matches too: slow path, same
    # result); lone surrogates are copied as they are.
    if "\\u0000" in text or _SURROGATES.search(text) is not None:
        return None
    return text


def _utf8_size(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def stored_json_and_text(value: Any, max_bytes: int) -> tuple[Any, str]:
    """``cap_json(sanitize(value), max_bytes)`` and its compact JSON text, the same as
    ``json.dumps(..., ensure_ascii=False, separators=(",", ":"))`` of it.

    Plain JSON (:func:`plain_json_text`) that fits is returned as it is, with the text made
    once; anything else takes :func:`sanitize` and :func:`cap_json`. Never raises.
    """
    text = plain_json_text(value)
    if text is not None and _utf8_size(text) <= max_bytes:
        return value, text
    return _cap_json(sanitize(value), max_bytes)


def json_size(value: Any) -> int:
    """Bytes of ``value`` as compact UTF-8 JSON (``value`` already sanitized)."""
    return len(json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))


def cap_json(value: Any, max_bytes: int) -> Any:
    """``value`` (sanitized) itself if its JSON fits ``max_bytes``, else a marker object.

    The marker is still valid JSON and says what happened::

        {"_truncated": true, "original_bytes": 250000, "preview": "{\\"rows\\": [1, 2, ..."}

    ``preview`` is the start of the compact JSON text, cut so the whole marker fits.
    """
    return _cap_json(value, max_bytes)[0]


def _cap_json(value: Any, max_bytes: int) -> tuple[Any, str]:
    """:func:`cap_json` and the compact JSON text of what it returns."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    size = _utf8_size(text)
    if size <= max_bytes:
        return value, text
    marker: dict[str, Any] = {TRUNCATED_KEY: True, "original_bytes": size, "preview": ""}
    room = max_bytes - json_size(marker)
    if room > 0:
        preview = _cut_utf8(text, room)
        # Escapes (quotes, backslashes, control characters) grow the preview inside JSON.
        while preview and json_size({**marker, "preview": preview}) > max_bytes:
            preview = preview[: max(0, len(preview) - max(1, len(preview) // 10))]
        marker["preview"] = preview
    return marker, json.dumps(marker, ensure_ascii=False, separators=(",", ":"))


def cap_text(text: str, max_bytes: int) -> str:
    """``text`` in at most ``max_bytes`` UTF-8 bytes: if it is longer, its start and its end
    around a note of the original size, ``... [truncated, 25000 bytes] ...``.

    The work is bounded by ``max_bytes`` (and, for non-ASCII text, one C-speed pass to count
    its bytes), whatever the length of ``text``. Not redacted: see
    :func:`~django_rpc_audit.payload.stored_text` for error messages.
    """
    if len(text) <= max_bytes and _utf8_size(text) <= max_bytes:
        return text
    size = len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))
    if size <= max_bytes:
        return text
    note = f" ... [truncated, {size} bytes] ... "
    room = max(0, max_bytes - len(note))
    head, tail = room - room // 3, room // 3
    capped = _cut_utf8(text[:head], head) + note + _last_utf8(text[-tail:] if tail else "", tail)
    return capped if _utf8_size(capped) <= max_bytes else _cut_utf8(capped, max_bytes)


def _cut_utf8(text: str, max_bytes: int) -> str:
    """The longest prefix of ``text`` that is at most ``max_bytes`` bytes in UTF-8."""
    head = text[:max_bytes]
    if max_bytes >= 0 and head.isascii():  # a byte a character: already the longest
        return head
    return head.encode("utf-8", "surrogatepass")[:max_bytes].decode("utf-8", "ignore")


def _last_utf8(text: str, max_bytes: int) -> str:
    """The longest end of ``text`` that is at most ``max_bytes`` bytes in UTF-8."""
    data = text[-max_bytes:].encode("utf-8", "surrogatepass") if max_bytes else b""
    return data[max(0, len(data) - max_bytes) :].decode("utf-8", "ignore") if max_bytes else ""
