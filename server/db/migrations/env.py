"""Alembic environment for the registry.

Migrations run only through :meth:`server.db.Database.upgrade`, which lends an
open connection (already inside ``BEGIN IMMEDIATE``) via
``config.attributes["connection"]``; there is no alembic.ini and no offline mode.

To write the next revision, autogenerate against a database at head and tidy the result::

    db = open_database(sqlite_url(tmp)); db.upgrade()
    with db.engine.begin() as conn:
        command.revision(_alembic_config(conn), "what changed", autogenerate=True, rev_id="0002")
"""

from __future__ import annotations

from alembic import context

from server.db.models import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations with server.db.Database.upgrade(), which supplies the connection")

# Batch mode: SQLite's ALTER TABLE cannot change most things, so Alembic rebuilds the table.
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
