"""Indexes tuned for PostgreSQL that stay plain B-trees on the other databases.

Every index costs each insert, and the log table takes many; on PostgreSQL two cheaper kinds
serve the documented queries as well (``BENCHMARKS.md``, ingest). Elsewhere they are ordinary
indexes: MariaDB has no partial indexes (Django would silently drop the index), and SQLite's
planner cannot prove ``status = 'failed'`` implies ``status <> 'success'``.
"""

from __future__ import annotations

from typing import Any

from django.db import models
from django.db.backends.base.schema import BaseDatabaseSchemaEditor
from django.db.backends.ddl_references import Statement


class HashIndex(models.Index):
    """``USING hash`` on PostgreSQL: equality lookups only, smaller and cheaper to keep than
    a B-tree on long random keys (the correlation id)."""

    def create_sql(
        self,
        model: type[models.Model],
        schema_editor: BaseDatabaseSchemaEditor,
        using: str = "",
        **kwargs: Any,
    ) -> Statement:
        if schema_editor.connection.vendor == "postgresql":
            using = " USING hash"
        return super().create_sql(model, schema_editor, using=using, **kwargs)


class PartialIndex(models.Index):
    """An index of the rows matching ``where`` on PostgreSQL; of every row elsewhere.

    For a condition that leaves out most rows (successful calls), so the common insert skips
    the index altogether.
    """

    def __init__(self, *, where: models.Q, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.where = where

    def deconstruct(self) -> Any:
        path, args, kwargs = super().deconstruct()
        kwargs["where"] = self.where
        return path, args, kwargs

    def create_sql(
        self,
        model: type[models.Model],
        schema_editor: BaseDatabaseSchemaEditor,
        using: str = "",
        **kwargs: Any,
    ) -> Statement:
        if schema_editor.connection.vendor == "postgresql":
            partial = models.Index(fields=self.fields, name=self.name, condition=self.where)
            return partial.create_sql(model, schema_editor, using=using, **kwargs)
        return super().create_sql(model, schema_editor, using=using, **kwargs)
