"""Log stream entries: a stored row as one compact, exact Redis Stream entry, and back.

The stream writer adds one entry per call; the ingest worker reads them. An entry holds the
row as the sink stores it (:func:`~django_rpc_audit.writers.sink.event_row_values` with
``for_copy``): values already sanitized and capped, JSON columns as their JSON text, the user
as its primary key, the deterministic row id. So the worker only writes, and a row is the
same whichever process wrote it. It also carries what the row's alerts need beyond the row:
the slow-call verdict (:class:`~django_rpc_audit.alerts.slow.SlowVerdict`), whose numbers an
``rpc.slow`` webhook shows.

The columns are those of the ``RPCLog`` model (its concrete fields, in the model's order), each
converted by its field's type (:func:`layout`), so a column added to the model travels without
a change here; a field of a type no conversion knows stops the first entry with a
``TypeError`` naming it. The entry has one field, ``r``: the values joined by NUL characters,
positional to stay small and to split in one C call. No stored value holds a NUL (the sink
replaces it in text, JSON escapes it), so the separator is unambiguous.

The first value names the layout: its version and a fingerprint of the columns and their
types (``2.3f9a1c0e``); a worker refuses an entry of another layout (a web process of another
release: the entry is dead-lettered with the reason, for a worker of that release to replay),
so a column is never read as another. Then one value per column, tagged: ``=`` and the
value's text, ``-`` for ``NULL``, or nothing when the row does not have the column (a pending
row has no outcome yet; the database's default fills it). Last the slow verdict: nothing, or
``=`` and its JSON. Floats are ``repr()``'s shortest exact text; datetimes ISO 8601 with
microseconds (and the UTC offset when aware), which :meth:`datetime.fromisoformat` turns back
into the same instant; a foreign key ``i<int>`` or ``s<text>``.
"""

from __future__ import annotations

import decimal
import functools
import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import astuple, dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, NamedTuple

from django.db import models

from django_rpc_audit.alerts.slow import SlowVerdict

if TYPE_CHECKING:
    from django_rpc_audit.models import RPCLog

#: The only field of an entry.
FIELD = "r"
#: Version of the entry format, first in each entry with the columns' fingerprint.
VERSION = "2"
SEPARATOR = "\x00"
_VALUE = "="
#: A NULL column's whole text.
_NULL_VALUE = "-"
_ABSENT = object()


class MalformedEntry(ValueError):
    """A stream entry that is not a row of the layout this process knows."""


def _text(value: Any) -> str:
    text = value if isinstance(value, str) else str(value)
    if SEPARATOR in text:  # never from the sink; replaced as the sink would
        text = text.replace(SEPARATOR, "\ufffd")
    return text


def _bool_text(value: Any) -> str:
    return "1" if value else "0"


def _bool(text: str) -> bool:
    if text not in ("0", "1"):
        raise ValueError(f"not a boolean: {text[:40]!r}")
    return text == "1"


def _key_text(value: Any) -> str:
    return f"i{value}" if isinstance(value, int) else f"s{_text(value)}"


def _key(text: str) -> int | str:
    if text[:1] == "i":
        return int(text[1:])
    if text[:1] == "s":
        return text[1:]
    raise ValueError(f"user key {text[:40]!r}")


def _datetime_text(value: datetime) -> str:
    return value.isoformat()


#: ``(kind, to text, from text)`` by field type, most specific first. ``None``: the text as
#: it is. The kind names the conversion in the layout's fingerprint.
_Conversion = tuple[str, Callable[[Any], str], Callable[[str], Any] | None]
_CONVERSIONS: tuple[tuple[type[models.Field[Any, Any]], _Conversion], ...] = (
    (models.ForeignKey, ("key", _key_text, _key)),
    (models.BooleanField, ("bool", _bool_text, _bool)),
    (models.DateTimeField, ("datetime", _datetime_text, datetime.fromisoformat)),
    (models.FloatField, ("float", repr, float)),
    (models.DecimalField, ("decimal", str, decimal.Decimal)),
    (models.IntegerField, ("int", str, int)),  # and its subclasses, AutoField included
    # Text as the sink stores it for COPY: JSON as its JSON text, the id as its hex digits.
    (models.JSONField, ("text", _text, None)),
    (models.UUIDField, ("text", _text, None)),
    (models.GenericIPAddressField, ("text", _text, None)),
    (models.CharField, ("text", _text, None)),
    (models.TextField, ("text", _text, None)),
)


@dataclass(frozen=True, slots=True)
class Layout:
    """The columns an entry carries and how each travels as text."""

    #: Column (attribute) names, in the model's order.
    columns: tuple[str, ...]
    #: Each column's conversion kind (``text``, ``float``, ``key``, ...).
    kinds: tuple[str, ...]
    #: The first value of an entry of this layout: version and fingerprint.
    header: str
    to_text: tuple[Callable[[Any], str], ...]
    from_text: tuple[Callable[[str], Any] | None, ...]
    #: Positions of the columns whose text is converted (not text as it is).
    converted: tuple[int, ...]


def layout_of(fields: Sequence[models.Field[Any, Any]]) -> Layout:
    """The layout carrying ``fields`` (concrete model fields).

    :raises TypeError: a field of a type no conversion knows (add it to ``_CONVERSIONS``).
    """
    columns, kinds, to_text, from_text = [], [], [], []
    for field in fields:
        conversion = next((c for t, c in _CONVERSIONS if isinstance(field, t)), None)
        if conversion is None:
            raise TypeError(
                f"The log stream entry cannot carry column {field.attname!r}: no conversion "
                f"for {type(field).__name__} in django_rpc_audit.writers.entry."
            )
        kind, encode, decode = conversion
        columns.append(field.attname)
        kinds.append(kind)
        to_text.append(encode)
        from_text.append(decode)
    described = ",".join(f"{c}:{k}" for c, k in zip(columns, kinds, strict=True))
    fingerprint = hashlib.sha1(described.encode(), usedforsecurity=False).hexdigest()[:8]
    return Layout(
        columns=tuple(columns),
        kinds=tuple(kinds),
        header=f"{VERSION}.{fingerprint}",
        to_text=tuple(to_text),
        from_text=tuple(from_text),
        converted=tuple(i for i, decode in enumerate(from_text) if decode is not None),
    )


@functools.cache
def layout(model: type[RPCLog] | None = None) -> Layout:
    """The layout of ``RPCLog``'s rows (or ``model``'s), made once."""
    if model is None:
        from django_rpc_audit.models import RPCLog

        model = RPCLog
    return layout_of(list(model._meta.concrete_fields))


def encode_row(row: Mapping[str, Any], slow: SlowVerdict | None = None) -> str:
    """The entry text of a stored row, with the call's slow verdict if it was slow."""
    plan = layout()
    values = [plan.header]
    get = row.get
    for name, to_text in zip(plan.columns, plan.to_text, strict=True):
        value = get(name, _ABSENT)
        if value is _ABSENT:
            values.append("")
        elif value is None:
            values.append(_NULL_VALUE)
        else:
            values.append(_VALUE + to_text(value))
    values.append("" if slow is None else _VALUE + json.dumps(astuple(slow)))
    return SEPARATOR.join(values)


class Entry(NamedTuple):
    """A decoded entry: the stored row, and the slow verdict of a slow call."""

    row: dict[str, Any]
    slow: SlowVerdict | None = None


def decode_entry(text: str | bytes) -> Entry:
    """The stored row (and slow verdict) of an entry's text.

    :raises MalformedEntry: not this layout, or a value that does not parse.
    """
    if isinstance(text, bytes):
        try:
            text = text.decode()
        except UnicodeDecodeError as exc:
            raise MalformedEntry(f"not UTF-8: {exc}") from None
    plan = layout()
    values = text.split(SEPARATOR)
    if values[0] != plan.header:
        raise MalformedEntry(
            f"unknown entry version {values[0][:40]!r} (this process writes {plan.header!r}: "
            "web processes and ingest workers of different releases?)"
        )
    expected = len(plan.columns) + 2
    if len(values) != expected:
        raise MalformedEntry(f"{len(values)} values, expected {expected}")
    body = values[1:-1]
    columns = plan.columns
    # In C where it can be: the tagged values' texts, then the few conversions and NULLs.
    row: dict[str, Any] = {n: v[1:] for n, v in zip(columns, body, strict=True) if v[:1] == _VALUE}
    nulls = body.count(_NULL_VALUE)
    if len(row) + nulls + body.count("") != len(body):
        name, value = next(
            (n, v)
            for n, v in zip(columns, body, strict=True)
            if v and v != _NULL_VALUE and v[0] != _VALUE
        )
        raise MalformedEntry(f"{name}: untagged value {value[:40]!r}")
    try:
        for position in plan.converted:
            name = columns[position]
            if name in row:
                row[name] = plan.from_text[position](row[name])  # type: ignore[misc]
        if nulls:
            for name, value in zip(columns, body, strict=True):
                if value == _NULL_VALUE:
                    row[name] = None
        verdict = values[-1]
        if verdict and verdict[0] != _VALUE:
            raise ValueError(f"slow verdict: untagged value {verdict[:40]!r}")
        slow = SlowVerdict(*json.loads(verdict[1:])) if verdict else None
    except (ValueError, TypeError, decimal.InvalidOperation) as exc:
        raise MalformedEntry(str(exc)) from None
    return Entry(row, slow)


def decode_row(text: str | bytes) -> dict[str, Any]:
    """The stored row of an entry's text (:func:`decode_entry` without the verdict)."""
    return decode_entry(text).row
