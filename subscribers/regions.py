"""The region scope, in SQL: the one rule for which records a person limited to some regions
may see, used by every list and every fetch by id, so that counts and pages are right however
small their region is.

A scope is a tuple of region keys, or None for every region (an admin). A record is in scope:
- when it has one region (a subscriber, and through them a bounce or a delivery): that region
  is one of the scope's;
- when it has an audience, a JSON list of regions where an empty list means every region (an
  edition, the alerts about it): the audience is every region, or shares a region with the
  scope. Acting on such a record needs more (covering all of its audience: `Actor.covers`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import JSON, Boolean, ColumnElement, false, true
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.expression import ColumnClause, bindparam

Scope = tuple[str, ...] | None


def within(scope: Scope, column: Any) -> ColumnElement[bool]:
    """The condition that a record's region (`column`) or audience (a JSON `column`) is in
    `scope`."""
    if scope is None:
        return true()
    if not scope:
        return false()
    if isinstance(getattr(column, "type", None), JSON):
        return _AudienceWithin(column, scope)
    return column.in_(list(scope))  # type: ignore[no-any-return]


class _AudienceWithin(ColumnElement[bool]):
    """An audience list that is empty (every region) or shares a region with the scope. JSON
    arrays are unpacked differently on each backend, so it compiles per dialect."""

    inherit_cache = False
    type = Boolean()

    def __init__(self, column: ColumnClause[Any], scope: Sequence[str]) -> None:
        self.column = column
        self.scope = list(scope)


def _values(element: _AudienceWithin, compiler: SQLCompiler, **kw: Any) -> str:
    return ", ".join(compiler.process(bindparam(None, value=r, unique=True), **kw)
                     for r in element.scope)


@compiles(_AudienceWithin, "sqlite")
def _sqlite(element: _AudienceWithin, compiler: SQLCompiler, **kw: Any) -> str:
    # Only a compiled column name and bound parameters are formatted in: no values.
    col = compiler.process(element.column, **kw)
    return (f"(coalesce(json_array_length({col}), 0) = 0 OR EXISTS (SELECT 1 FROM "  # noqa: S608
            f"json_each({col}) WHERE json_each.value IN ({_values(element, compiler, **kw)})))")


@compiles(_AudienceWithin, "postgresql")
def _postgresql(element: _AudienceWithin, compiler: SQLCompiler, **kw: Any) -> str:
    col = f"CAST({compiler.process(element.column, **kw)} AS JSONB)"
    return (f"(jsonb_typeof({col}) IS DISTINCT FROM 'array' OR jsonb_array_length({col}) = 0 "
            f"OR {col} ?| ARRAY[{_values(element, compiler, **kw)}]::text[])")
