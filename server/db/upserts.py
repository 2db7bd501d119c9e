"""Inserts that never fail on a row another transaction just added: ``INSERT … ON CONFLICT DO NOTHING``.

On SQLite the write lock already serialises writers; on PostgreSQL (READ COMMITTED) two transactions can
both see "no row yet" and both insert, and the second would fail with a unique violation. Both dialects
speak ``ON CONFLICT``, so one statement serves both (on PostgreSQL fed by one JSON document, see below). Table and
column names come from the models, never from input.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Table, TextClause, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from server.db.models import Base


def insert_new(session: Session, model: type[Base], rows: Sequence[Mapping[str, Any]], unique: Sequence[str],
               *, returning: Sequence[str] = ()) -> list[tuple[Any, ...]]:
    """Insert ``rows`` (one statement), skipping any whose ``unique`` columns match a stored row (or an
    earlier one of ``rows``); the ``returning`` columns of the rows inserted, in no set order. Every row
    names the same columns."""
    if not rows:
        return []
    table = model.__table__
    if session.get_bind().dialect.name == "postgresql":
        return _insert_new_postgresql(session, table, rows, unique, returning)
    # The Core table, not the ORM class: an ORM bulk insert would sort through every row's attributes.
    statement = sqlite.insert(cast(Table, table)).on_conflict_do_nothing(index_elements=list(unique))
    # Executed with a list of rows, SQLAlchemy sends them as one multi-row VALUES (its "insertmanyvalues",
    # up to 1000 rows a statement) and compiles the statement once per process, not once per batch.
    if returning:
        return [tuple(row) for row in session.execute(statement.returning(*(table.c[c] for c in returning)),
                                                      list(rows))]
    session.execute(statement, list(rows))
    return []


def _insert_new_postgresql(session: Session, table: Any, rows: Sequence[Mapping[str, Any]], unique: Sequence[str],
                           returning: Sequence[str]) -> list[tuple[Any, ...]]:
    """The rows as one JSON parameter, turned back into rows by ``json_to_recordset``: the statement's text
    is the same for every batch (parsed once), and one string is far cheaper for psycopg to send than a
    multi-row VALUES of thousands of parameters or one array per column."""
    sql = _recordset_insert_sql(table, tuple(rows[0]), tuple(unique), tuple(returning))
    result = session.execute(sql, {"rows": json.dumps(list(rows), default=_json_value)})
    return [tuple(row) for row in result] if returning else []


def _json_value(value: object) -> str:
    if isinstance(value, datetime):
        return value.isoformat()  # timestamptz reads ISO 8601, offset included
    raise TypeError(f"cannot send {type(value).__name__} in a JSON recordset")


_RECORDSET_SQL: dict[tuple[str, tuple[str, ...], tuple[str, ...], tuple[str, ...]], TextClause] = {}


def _recordset_insert_sql(table: Any, columns: tuple[str, ...], unique: tuple[str, ...],
                          returning: tuple[str, ...]) -> TextClause:
    key = (table.name, columns, unique, returning)
    if key not in _RECORDSET_SQL:
        dialect = postgresql.dialect()  # type: ignore[no-untyped-call]
        names = ", ".join(columns)
        record = ", ".join(f"{c} {table.c[c].type.compile(dialect=dialect)}" for c in columns)
        sql = (f"INSERT INTO {table.name} ({names}) SELECT {names} FROM json_to_recordset(CAST(:rows AS JSON)) "
               f"AS r({record}) ON CONFLICT ({', '.join(unique)}) DO NOTHING")
        if returning:
            sql += f" RETURNING {', '.join(returning)}"
        _RECORDSET_SQL[key] = text(sql)
    return _RECORDSET_SQL[key]
