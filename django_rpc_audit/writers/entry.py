"""Log stream entries: a stored row as one compact, exact Redis Stream entry, and back.

The stream writer adds one entry per call; the ingest worker reads them. An entry holds the
row as the sink stores it (:func:`~django_rpc_audit.writers.sink.event_row_values` with
``for_copy``): values already sanitized and capped, JSON columns as their JSON text, the user
as its primary key, the deterministic row id. So the worker only writes, and a row is the
same whichever process wrote it.

The entry has one field, ``r``: the values joined by NUL characters, positional to stay
small and to split in one C call. No stored value holds a NUL (the sink replaces it in text,
JSON escapes it), so the separator is unambiguous. The first value is the layout version;
then the columns of :data:`STARTED_COLUMNS`, and for a finished call those of
:data:`OUTCOME_COLUMNS`. ``NULL`` is the empty string (no nullable column has an empty
value); the user key is ``i<int>`` or ``s<text>``; floats are ``repr()``'s shortest exact
text; datetimes ISO 8601 with microseconds (and the UTC offset when aware), which
:meth:`datetime.fromisoformat` turns back into the same instant.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from django_rpc_audit.writers.sink import OUTCOME_KEYS

#: The only field of an entry.
FIELD = "r"
#: Version of the entry layout, first in the entry; a worker refuses versions it does not know.
VERSION = "1"
SEPARATOR = "\x00"

#: Columns every entry carries, in order.
STARTED_COLUMNS: tuple[str, ...] = (
    "id",
    "correlation_id",
    "method",
    "params",
    "user_id",
    "caller_ip",
    "user_agent",
    "created_at",
)
#: Columns a finished call's entry carries after :data:`STARTED_COLUMNS` (named as the
#: ``rpc_finished`` keys they come from).
OUTCOME_COLUMNS: tuple[str, ...] = OUTCOME_KEYS
_ALL_COLUMNS = STARTED_COLUMNS + OUTCOME_COLUMNS
_PENDING_LENGTH = 1 + len(STARTED_COLUMNS)
_FINISHED_LENGTH = 1 + len(_ALL_COLUMNS)
#: Columns that may be NULL (the empty string in an entry).
_NULLABLE = frozenset({"response", "duration_ms", "user_id", "caller_ip", "completed_at"})


class MalformedEntry(ValueError):
    """A stream entry that is not a row of a layout this version knows."""


def _text(name: str, value: Any) -> str:
    if value is None:
        if name not in _NULLABLE:
            raise ValueError(f"{name} is None")
        return ""
    if name == "user_id":
        text = f"i{value}" if isinstance(value, int) else f"s{value}"
    elif isinstance(value, datetime):
        return value.isoformat()
    elif isinstance(value, float):
        return repr(value)
    else:
        text = value if isinstance(value, str) else str(value)
    if SEPARATOR in text:  # never from the sink; replaced as the sink would
        text = text.replace(SEPARATOR, "\ufffd")
    return text


def encode_row(row: Mapping[str, Any]) -> str:
    """The entry text of a stored row (``status`` absent or ``pending``: a pending row)."""
    finished = row.get("status", "pending") != "pending"
    columns = _ALL_COLUMNS if finished else STARTED_COLUMNS
    return SEPARATOR.join([VERSION, *(_text(name, row.get(name)) for name in columns)])


def decode_row(text: str | bytes) -> dict[str, Any]:
    """The stored row of an entry's text.

    :raises MalformedEntry: not a known layout, or a value that does not parse.
    """
    if isinstance(text, bytes):
        try:
            text = text.decode()
        except UnicodeDecodeError as exc:
            raise MalformedEntry(f"not UTF-8: {exc}") from None
    values = text.split(SEPARATOR)
    if values[0] != VERSION:
        raise MalformedEntry(f"unknown entry version {values[0][:40]!r}")
    if len(values) not in (_PENDING_LENGTH, _FINISHED_LENGTH):
        raise MalformedEntry(
            f"{len(values)} values, expected {_PENDING_LENGTH} or {_FINISHED_LENGTH}"
        )
    try:
        (_, id_, correlation_id, method, params, user, ip, agent, created) = values[:9]
        row: dict[str, Any] = {
            "id": id_,
            "correlation_id": correlation_id,
            "method": method,
            "params": params,
            "user_id": _user_key(user),
            "caller_ip": ip or None,
            "user_agent": agent,
            "created_at": datetime.fromisoformat(created),
        }
        if len(values) == _FINISHED_LENGTH:
            (status, response, code, message, duration, completed, rate) = values[9:]
            row.update(
                status=status,
                response=response or None,
                error_code=code,
                error_message=message,
                duration_ms=float(duration) if duration else None,
                completed_at=datetime.fromisoformat(completed) if completed else None,
                sample_rate=float(rate),
            )
    except ValueError as exc:
        raise MalformedEntry(str(exc)) from None
    return row


def _user_key(text: str) -> int | str | None:
    if not text:
        return None
    if text[0] == "i":
        return int(text[1:])
    if text[0] == "s":
        return text[1:]
    raise ValueError(f"user key {text[:40]!r}")
