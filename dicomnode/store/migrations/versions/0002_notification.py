"""Notification outbox (urgent webhooks)

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-06 06:50:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import dicomnode.store.models

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "notification",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_pk", sa.Integer(), nullable=True),
        sa.Column("study_uid", sa.String(length=64), nullable=False),
        sa.Column("channel", sa.String(length=16), nullable=False),
        sa.Column("target", sa.String(length=1024), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", dicomnode.store.models.UTCDateTime(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", dicomnode.store.models.UTCDateTime(), nullable=False),
        sa.Column("sent_at", dicomnode.store.models.UTCDateTime(), nullable=True),
        sa.ForeignKeyConstraint(["job_pk"], ["job.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("notification", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_notification_job_pk"), ["job_pk"], unique=False)
        batch_op.create_index("ix_notification_state_next", ["state", "next_attempt_at"],
                              unique=False)


def downgrade() -> None:
    with op.batch_alter_table("notification", schema=None) as batch_op:
        batch_op.drop_index("ix_notification_state_next")
        batch_op.drop_index(batch_op.f("ix_notification_job_pk"))
    op.drop_table("notification")
