"""Copy a registry from one database to another (SQLite to PostgreSQL), for templates the tests clone.

Building the template data directory's digits variants takes many seconds; copying its rows into a
PostgreSQL database takes a fraction of one, so both back-ends start every test from the same content.
"""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import Integer

from server.db import open_database
from server.db.models import Base


def copy_registry(source_url: str, target_url: str) -> None:
    """Migrate ``target_url`` to head and fill it with every row of ``source_url`` (same schema)."""
    source, target = open_database(source_url), open_database(target_url)
    try:
        target.upgrade()
        with source.engine.connect() as read, target.engine.begin() as write:
            for table in reversed(Base.metadata.sorted_tables):  # rows the migrations seeded (e.g. the lease)
                write.execute(table.delete())
            for table in Base.metadata.sorted_tables:
                rows = [{k: _aware(v) for k, v in row._mapping.items()} for row in read.execute(table.select())]
                if rows:
                    write.execute(table.insert(), rows)
            if target.engine.dialect.name == "postgresql":  # rows came with their ids: move the sequences past them
                for table in Base.metadata.sorted_tables:
                    for column in table.primary_key.columns:
                        if isinstance(column.type, Integer) and column.autoincrement in (True, "auto"):
                            write.exec_driver_sql(
                                f"SELECT setval(pg_get_serial_sequence('{table.name}', '{column.name}'), "
                                f"coalesce(max({column.name}), 0) + 1, false) FROM {table.name}")
    finally:
        source.close()
        target.close()


def _aware(value: object) -> object:
    """SQLite hands timestamps back naive; they are UTC."""
    if isinstance(value, datetime) and value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value
