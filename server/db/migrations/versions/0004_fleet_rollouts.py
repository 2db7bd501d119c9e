"""Fleet rollouts: device tags and removal, waves with gates, per-profile releases, reverts, the audit log.

A removed device keeps its row (its deployments' history names it), so the
unique device name becomes a partial unique index over devices not removed.
Existing rollouts get an empty selection and the default policy (one wave).

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | None = None
depends_on: str | None = None

# 0001 left the unique constraint on devices.name unnamed; SQLite batch mode reflects it under this name.
_NAMING = {"uq": "uq_%(table_name)s_%(column_0_name)s"}


def _unique_name_constraint() -> str:
    return "uq_devices_name" if op.get_bind().dialect.name == "sqlite" else "devices_name_key"


def upgrade() -> None:
    with op.batch_alter_table("devices", naming_convention=_NAMING) as batch:
        batch.drop_constraint(_unique_name_constraint(), type_="unique")
        batch.add_column(sa.Column("tags", sa.JSON(), nullable=False, server_default=sa.text("'{}'")))
        batch.add_column(sa.Column("removed_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("reported_seq", sa.Integer(), nullable=True))
    op.create_index("ix_devices_live_name", "devices", ["name"], unique=True,
                    sqlite_where=sa.text("removed_at IS NULL"), postgresql_where=sa.text("removed_at IS NULL"))
    with op.batch_alter_table("rollouts") as batch:
        batch.add_column(sa.Column("selection", sa.JSON(), nullable=False, server_default=sa.text("'{}'")))
        batch.add_column(sa.Column("policy", sa.JSON(), nullable=False, server_default=sa.text("'{}'")))
        batch.add_column(sa.Column("state_reason", sa.Text(), nullable=False, server_default=sa.text("''")))
        batch.add_column(sa.Column("actor", sa.String(length=128), nullable=False, server_default=sa.text("''")))
    with op.batch_alter_table("deployments") as batch:
        batch.add_column(sa.Column("wave", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("kind", sa.String(length=16), nullable=False, server_default="install"))
        batch.add_column(sa.Column("reverts_id", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("previous_release_id", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("previous_accuracy", sa.Float(), nullable=True))
        batch.add_column(sa.Column("previous_p95_ms", sa.Float(), nullable=True))
        batch.add_column(sa.Column("timed_out_at", sa.DateTime(timezone=True), nullable=True))
        batch.create_foreign_key("fk_deployments_previous_release", "releases", ["previous_release_id"], ["id"])
    op.create_table(
        "rollout_releases",
        sa.Column("rollout_id", sa.String(length=64), nullable=False),
        sa.Column("profile_name", sa.String(length=64), nullable=False),
        sa.Column("release_id", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(["rollout_id"], ["rollouts.id"]),
        sa.ForeignKeyConstraint(["profile_name"], ["profiles.name"]),
        sa.ForeignKeyConstraint(["release_id"], ["releases.id"]),
        sa.PrimaryKeyConstraint("rollout_id", "profile_name"),
    )
    op.create_table(
        "waves",
        sa.Column("rollout_id", sa.String(length=64), nullable=False),
        sa.Column("index", sa.Integer(), nullable=False),
        sa.Column("spec", sa.String(length=16), nullable=False),
        sa.Column("state", sa.String(length=32), nullable=False),
        sa.Column("target_count", sa.Integer(), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("decided_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("gates", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(["rollout_id"], ["rollouts.id"]),
        sa.PrimaryKeyConstraint("rollout_id", "index"),
    )
    op.create_table(
        "audit_events",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("ts", sa.DateTime(timezone=True), nullable=False),
        sa.Column("kind", sa.String(length=64), nullable=False),
        sa.Column("actor", sa.String(length=128), nullable=False),
        sa.Column("rollout_id", sa.String(length=64), nullable=True),
        sa.Column("device_id", sa.String(length=64), nullable=True),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("data", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_audit_events_rollout_id", "audit_events", ["rollout_id"])
    op.create_index("ix_audit_events_device_id", "audit_events", ["device_id"])
    # Rollouts from before waves: one wave holding every device they already have.
    op.execute("INSERT INTO waves (rollout_id, \"index\", spec, state, gates) "
               "SELECT id, 0, '100%', CASE WHEN state = 'running' THEN 'running' "
               "WHEN state = 'succeeded' THEN 'passed' ELSE 'failed' END, '[]' FROM rollouts")
    op.execute("UPDATE deployments SET wave = 0")


def downgrade() -> None:
    op.drop_index("ix_audit_events_device_id", table_name="audit_events")
    op.drop_index("ix_audit_events_rollout_id", table_name="audit_events")
    op.drop_table("audit_events")
    op.drop_table("waves")
    op.drop_table("rollout_releases")
    with op.batch_alter_table("deployments") as batch:
        batch.drop_constraint("fk_deployments_previous_release", type_="foreignkey")
        for column in ("timed_out_at", "previous_p95_ms", "previous_accuracy", "previous_release_id", "reverts_id",
                       "kind", "wave"):
            batch.drop_column(column)
    with op.batch_alter_table("rollouts") as batch:
        for column in ("actor", "state_reason", "policy", "selection"):
            batch.drop_column(column)
    op.drop_index("ix_devices_live_name", table_name="devices")
    op.execute("DELETE FROM devices WHERE removed_at IS NOT NULL AND name IN "
               "(SELECT name FROM devices WHERE removed_at IS NULL)")  # 0003 allows one row per name
    with op.batch_alter_table("devices") as batch:
        for column in ("reported_seq", "removed_at", "tags"):
            batch.drop_column(column)
        batch.create_unique_constraint(_unique_name_constraint(), ["name"])  # the name upgrade() drops
