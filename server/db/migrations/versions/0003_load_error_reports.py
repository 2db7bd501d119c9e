"""Load errors are reports, one per deployment, instead of one verdict per (model file, runtime).

A single device's word used to block a variant for its runtime fleet-wide;
now each report is kept (who, which deployment, why) and the rule in
``server/load_errors.py`` decides. The old rows become reports; the
deployment each came from is looked up (same device, same model file, same
reason), so that outcome arriving again later is not counted twice.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | None = None
depends_on: str | None = None

_DEPLOYMENT_OF_OLD_ROW = """
    SELECT d.id FROM deployments d JOIN releases r ON r.id = d.release_id
    WHERE d.device_id = ri.device_id AND r.model_sha256 = ri.model_sha256 AND d.reason = ri.reason
    ORDER BY d.created_at LIMIT 1
"""


def upgrade() -> None:
    op.create_table(
        "load_error_reports",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("model_sha256", sa.String(length=64), nullable=False),
        sa.Column("runtime", sa.String(length=64), nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("deployment_id", sa.String(length=64), nullable=True),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("model_sha256", "runtime", "deployment_id"),
    )
    op.execute(
        "INSERT INTO load_error_reports (model_sha256, runtime, device_id, deployment_id, reason, created_at) "
        f"SELECT ri.model_sha256, ri.runtime, ri.device_id, ({_DEPLOYMENT_OF_OLD_ROW}), ri.reason, ri.created_at "
        "FROM runtime_incompatibilities ri"
    )
    op.drop_table("runtime_incompatibilities")


def downgrade() -> None:
    # 0002 kept one row per (model file, runtime) and refused on it: keep the oldest report of each pair.
    op.create_table(
        "runtime_incompatibilities",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("model_sha256", sa.String(length=64), nullable=False),
        sa.Column("runtime", sa.String(length=64), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("model_sha256", "runtime"),
    )
    op.execute(
        "INSERT INTO runtime_incompatibilities (model_sha256, runtime, reason, device_id, created_at) "
        "SELECT l.model_sha256, l.runtime, l.reason, l.device_id, l.created_at FROM load_error_reports l "
        "WHERE l.id = (SELECT min(o.id) FROM load_error_reports o "
        "WHERE o.model_sha256 = l.model_sha256 AND o.runtime = l.runtime)"
    )
    op.drop_table("load_error_reports")
