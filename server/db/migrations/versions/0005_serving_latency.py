"""Serving latency: raw serving reports, their per-minute rollups, and cumulative totals per model version.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table(
        "serving_reports",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("boot_id", sa.String(length=64), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("deployment_id", sa.String(length=64), nullable=True),
        sa.Column("profile", sa.String(length=64), nullable=False),
        sa.Column("model", sa.String(length=128), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("quantization", sa.String(length=32), nullable=False),
        sa.Column("runtime", sa.String(length=64), nullable=False),
        sa.Column("threads", sa.Integer(), nullable=False),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.Column("start_ts", sa.Float(), nullable=False),
        sa.Column("end_ts", sa.Float(), nullable=False),
        sa.Column("calls", sa.Integer(), nullable=False),
        sa.Column("errors", sa.Integer(), nullable=False),
        sa.Column("samples", sa.Integer(), nullable=False),
        sa.Column("invoke", sa.JSON(), nullable=False),
        sa.Column("e2e", sa.JSON(), nullable=False),
        sa.Column("p50_ms", sa.Float(), nullable=True),
        sa.Column("p90_ms", sa.Float(), nullable=True),
        sa.Column("p99_ms", sa.Float(), nullable=True),
        sa.Column("load_1m", sa.Float(), nullable=True),
        sa.Column("cpu_percent", sa.Float(), nullable=True),
        sa.Column("rss_bytes", sa.BigInteger(), nullable=True),
        sa.Column("temperature_c", sa.Float(), nullable=True),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("device_id", "boot_id", "seq"),
    )
    op.create_index("ix_serving_reports_device_end", "serving_reports", ["device_id", "end_ts"])
    op.create_index("ix_serving_reports_profile_end", "serving_reports", ["profile", "end_ts"])
    op.create_index("ix_serving_reports_model_end", "serving_reports", ["model", "version", "end_ts"])
    op.create_index("ix_serving_reports_end", "serving_reports", ["end_ts"])
    op.create_table(
        "serving_rollups",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("profile", sa.String(length=64), nullable=False),
        sa.Column("model", sa.String(length=128), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.Column("bucket", sa.BigInteger(), nullable=False),
        sa.Column("calls", sa.BigInteger(), nullable=False),
        sa.Column("errors", sa.BigInteger(), nullable=False),
        sa.Column("samples", sa.BigInteger(), nullable=False),
        sa.Column("invoke", sa.JSON(), nullable=False),
        sa.Column("e2e", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("device_id", "model", "version", "source", "bucket"),
    )
    op.create_index("ix_serving_rollups_device_bucket", "serving_rollups", ["device_id", "bucket"])
    op.create_index("ix_serving_rollups_profile_bucket", "serving_rollups", ["profile", "bucket"])
    op.create_index("ix_serving_rollups_model_bucket", "serving_rollups", ["model", "version", "bucket"])
    op.create_index("ix_serving_rollups_bucket", "serving_rollups", ["bucket"])
    op.create_table(
        "serving_totals",
        sa.Column("profile", sa.String(length=64), nullable=False),
        sa.Column("model", sa.String(length=128), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("calls", sa.BigInteger(), nullable=False),
        sa.Column("errors", sa.BigInteger(), nullable=False),
        sa.Column("invoke", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("profile", "model", "version"),
    )


def downgrade() -> None:
    op.drop_table("serving_totals")
    for index in ("ix_serving_rollups_bucket", "ix_serving_rollups_model_bucket", "ix_serving_rollups_profile_bucket",
                  "ix_serving_rollups_device_bucket"):
        op.drop_index(index, table_name="serving_rollups")
    op.drop_table("serving_rollups")
    for index in ("ix_serving_reports_end", "ix_serving_reports_model_end", "ix_serving_reports_profile_end",
                  "ix_serving_reports_device_end"):
        op.drop_index(index, table_name="serving_reports")
    op.drop_table("serving_reports")
