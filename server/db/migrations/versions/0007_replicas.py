"""Replicas: the leases one server replica holds at a time (the rollout engine's), and the registry of replicas
(each one's broker identity is derived from its name).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-14
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    leases = op.create_table(
        "server_leases",
        sa.Column("name", sa.String(length=32), nullable=False),
        sa.Column("holder", sa.String(length=128), nullable=False),
        sa.Column("expires_at", sa.Float(), nullable=False),
        sa.Column("acquired_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )
    # The row exists from the start, so taking the lease is always an UPDATE (never a racing INSERT).
    op.bulk_insert(leases, [{"name": "engine", "holder": "", "expires_at": 0.0, "acquired_at": 0.0}])
    op.create_table(
        "server_replicas",
        sa.Column("name", sa.String(length=32), nullable=False),
        sa.Column("host", sa.String(length=255), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )


def downgrade() -> None:
    op.drop_table("server_replicas")
    op.drop_table("server_leases")
