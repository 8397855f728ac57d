"""Exact percentiles where the database has no ordered-set aggregate: MySQL, MariaDB, SQLite.

PostgreSQL computes ``percentile_cont(f) WITHIN GROUP (ORDER BY x)`` itself (see
:class:`~django_rpc_audit.querysets.PercentileCont`). MariaDB has ``PERCENTILE_CONT`` only as
a window function, MySQL 8 has none, SQLite neither; all three have the window functions
``ROW_NUMBER()`` and ``COUNT()``. :func:`window_percentiles` ranks the values in the database
(one sort per group, as PostgreSQL's aggregate does), fetches only the few ranks around each
percentile's position, and interpolates between them with
:func:`~django_rpc_audit.querysets.percentile_cont`: the same numbers as PostgreSQL's, exactly,
without reading every value into Python.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, overload

from django.db import connections, models
from django.db.models import Count, F, Func, Value, Window
from django.db.models.functions import RowNumber

#: Aliases of the ranked subquery's columns (not model fields, so they never collide).
_GROUP, _VALUE, _RANK, _COUNT = "pct_group", "pct_value", "pct_rank", "pct_count"


class WeightString(Func):
    """MySQL's and MariaDB's ``WEIGHT_STRING(text)``: the key the column's collation compares
    by. Two names are one group in ``GROUP BY`` exactly when their weight strings are equal,
    so it pairs a grouped row with its ranks whatever the collation folds (case, accents)."""

    function = "WEIGHT_STRING"
    output_field = models.BinaryField()


def group_key(field: str, using: str) -> F | WeightString:
    """The expression that identifies ``GROUP BY field``'s groups on the database ``using``:
    the column itself, or on MySQL and MariaDB its :class:`WeightString` (their default
    collations are case- and accent-insensitive, so ``"Ping"`` and ``"ping"`` are one group,
    which the name alone cannot tell). Grouping by it as well also keeps their optimizers
    from grouping in index order by reading a whole ``(field, created_at)`` index."""
    if connections[using].vendor == "mysql":
        return WeightString(field)
    return F(field)


@overload
def window_percentiles(
    queryset: models.QuerySet[Any],
    field: str,
    fractions: Sequence[float],
    *,
    group_by: None = None,
) -> dict[None, list[float | None]]: ...


@overload
def window_percentiles(
    queryset: models.QuerySet[Any],
    field: str,
    fractions: Sequence[float],
    *,
    group_by: F | Func,
) -> dict[Any, list[float | None]]: ...


def window_percentiles(
    queryset: models.QuerySet[Any],
    field: str,
    fractions: Sequence[float],
    *,
    group_by: F | Func | None = None,
) -> dict[Any, list[float | None]]:
    """PostgreSQL's ``percentile_cont`` of ``field`` over the rows of ``queryset``, for each
    fraction in ``fractions``, in one query.

    Without ``group_by`` the result is ``{None: [one value per fraction]}``; with it, one such
    list per value of the ``group_by`` expression (groups whose values are all ``NULL`` are
    absent). ``NULL`` values are left out, as the aggregate does. ::

        window_percentiles(RPCLog.objects.recent(), "duration_ms", [0.5, 0.95])
        # {None: [54.9, 2023.3]}
    """
    from django_rpc_audit.querysets import percentile_cont

    if not all(0 <= fraction <= 1 for fraction in fractions):
        raise ValueError("fractions must be between 0 and 1.")
    if not fractions:
        return {}
    connection = connections[queryset.db]
    partition = [group_by] if group_by is not None else None
    ranked = (
        queryset.filter(**{f"{field}__isnull": False})
        .order_by()
        .values(
            **{
                _GROUP: group_by if group_by is not None else Value(0),
                _VALUE: F(field),
                _RANK: Window(RowNumber(), partition_by=partition, order_by=F(field).asc()),
                _COUNT: Window(Count(field), partition_by=partition),
            }
        )
    )
    sql, params = ranked.query.get_compiler(using=queryset.db).as_sql()
    quote = connection.ops.quote_name
    rank, count = quote(_RANK), quote(_COUNT)
    # Percentile f of n values interpolates the ranks floor(f*(n-1))+1 and the next one.
    # The database computes f*(n-1) in its own arithmetic (MySQL: exact decimals), so the
    # window is one rank wider on each side; Python then picks the two ranks with its own
    # floats, as percentile_cont() and PostgreSQL do.
    near = " OR ".join(
        f"({rank} BETWEEN %s * ({count} - 1) - 1 AND %s * ({count} - 1) + 3)" for _ in fractions
    )
    # The inner query is the ORM's, with its parameters; the outer one binds the fractions.
    outer = (
        f"SELECT {quote(_GROUP)}, {count}, {rank}, {quote(_VALUE)} "  # noqa: S608
        f"FROM ({sql}) ranked WHERE {near}"
    )
    bound = [*params, *(float(f) for fraction in fractions for f in (fraction, fraction))]
    values: dict[Any, dict[int, float]] = defaultdict(dict)
    counts: dict[Any, int] = {}
    with connection.cursor() as cursor:
        cursor.execute(outer, bound)
        for label, n, position, value in cursor.fetchall():
            group = None if group_by is None else as_key(label)
            values[group][int(position)] = float(value)
            counts[group] = int(n)
    return {
        group: [percentile_cont(_Ranked(ranks, counts[group]), fraction) for fraction in fractions]
        for group, ranks in values.items()
    }


def as_key(label: Any) -> Any:
    """A group label as :func:`window_percentiles` keys it: binary values (weight strings)
    as ``bytes``, anything else as it is."""
    return bytes(label) if isinstance(label, memoryview | bytearray) else label


class _Ranked(Sequence[float]):
    """The sorted values of one group as :func:`percentile_cont` reads them (index ``i`` is
    rank ``i + 1``), of which only the ranks it will read were fetched."""

    def __init__(self, ranks: Mapping[int, float], count: int) -> None:
        self._ranks = ranks
        self._count = count

    def __len__(self) -> int:
        return self._count

    @overload
    def __getitem__(self, index: int) -> float: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[float]: ...

    def __getitem__(self, index: int | slice) -> float | Sequence[float]:
        if isinstance(index, slice):
            raise TypeError("only single ranks were fetched")
        return self._ranks[index + 1]

    def __iter__(self) -> Iterator[float]:
        raise TypeError("only single ranks were fetched")
