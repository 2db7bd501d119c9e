"""Compression studio: profile recipes and limits, per-variant reports, artifact recipe,
runtime incompatibilities, and the files each release names.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    with op.batch_alter_table("profiles") as batch:
        batch.add_column(sa.Column("quantizations", sa.String(length=200), nullable=False, server_default=sa.text("''")))
        batch.add_column(sa.Column("recipe", sa.String(length=200), nullable=False, server_default="auto"))
        batch.add_column(sa.Column("objective", sa.String(length=16), nullable=False, server_default="latency"))
        batch.add_column(sa.Column("accuracy_budget", sa.Float(), nullable=False, server_default="0.01"))
        batch.add_column(sa.Column("max_model_bytes", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("max_ram_bytes", sa.BigInteger(), nullable=True))
    with op.batch_alter_table("model_versions") as batch:
        batch.add_column(sa.Column("train_sha256", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("full_eval_sha256", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("eval_labelled", sa.Boolean(), nullable=False, server_default=sa.true()))
    with op.batch_alter_table("artifacts") as batch:
        batch.add_column(sa.Column("recipe", sa.String(length=200), nullable=False, server_default=sa.text("''")))
        batch.add_column(sa.Column("gzip_bytes", sa.BigInteger(), nullable=True))
    with op.batch_alter_table("releases") as batch:
        batch.add_column(sa.Column("model_sha256", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("eval_sha256", sa.String(length=64), nullable=True))
        batch.create_index("ix_releases_model_sha256", ["model_sha256"])
        batch.create_index("ix_releases_eval_sha256", ["eval_sha256"])
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
    op.create_table(
        "variants",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("model_version_id", sa.Integer(), nullable=False),
        sa.Column("profile_name", sa.String(length=64), nullable=False),
        sa.Column("recipe", sa.String(length=200), nullable=False),
        sa.Column("quantization", sa.String(length=32), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=True),
        sa.Column("size_bytes", sa.BigInteger(), nullable=True),
        sa.Column("gzip_bytes", sa.BigInteger(), nullable=True),
        sa.Column("accuracy", sa.Float(), nullable=True),
        sa.Column("agreement", sa.Float(), nullable=True),
        sa.Column("p50_ms", sa.Float(), nullable=True),
        sa.Column("p95_ms", sa.Float(), nullable=True),
        sa.Column("peak_rss_bytes", sa.BigInteger(), nullable=True),
        sa.Column("details", sa.JSON(), nullable=False),
        sa.Column("verdict", sa.String(length=32), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("chosen", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["model_version_id"], ["model_versions.id"]),
        sa.ForeignKeyConstraint(["profile_name"], ["profiles.name"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("model_version_id", "profile_name", "recipe"),
    )


def downgrade() -> None:
    op.drop_table("variants")
    op.drop_table("runtime_incompatibilities")
    with op.batch_alter_table("releases") as batch:
        batch.drop_index("ix_releases_eval_sha256")
        batch.drop_index("ix_releases_model_sha256")
        batch.drop_column("eval_sha256")
        batch.drop_column("model_sha256")
    with op.batch_alter_table("artifacts") as batch:
        batch.drop_column("gzip_bytes")
        batch.drop_column("recipe")
    with op.batch_alter_table("model_versions") as batch:
        batch.drop_column("eval_labelled")
        batch.drop_column("full_eval_sha256")
        batch.drop_column("train_sha256")
    with op.batch_alter_table("profiles") as batch:
        for column in ("max_ram_bytes", "max_model_bytes", "accuracy_budget", "objective", "recipe", "quantizations"):
            batch.drop_column(column)
