"""Deployments indexed by device (and directive number) and by rollout: every state report and event looked up
its device's open deployments, and the engine each rollout's, by scanning the whole table.

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-30
"""

from __future__ import annotations

from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_index("ix_deployments_device_seq", "deployments", ["device_id", "seq"])
    op.create_index("ix_deployments_rollout", "deployments", ["rollout_id"])


def downgrade() -> None:
    op.drop_index("ix_deployments_rollout", table_name="deployments")
    op.drop_index("ix_deployments_device_seq", table_name="deployments")
