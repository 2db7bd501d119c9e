"""Several replicas writing at once: deployments carry a version counter (one replica's ingest and the
leader's engine may change the same deployment at once; the ORM then refuses the second write instead of
letting it overwrite the first), and devices the time of their last hello (a device is taken for reset only
when it started afresh after its deployment committed, not when a replica applied an older state late).

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    with op.batch_alter_table("deployments") as batch:
        batch.add_column(sa.Column("row_version", sa.Integer(), nullable=False, server_default=sa.text("1")))
    with op.batch_alter_table("devices") as batch:
        batch.add_column(sa.Column("last_hello_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("devices") as batch:
        batch.drop_column("last_hello_at")
    with op.batch_alter_table("deployments") as batch:
        batch.drop_column("row_version")
