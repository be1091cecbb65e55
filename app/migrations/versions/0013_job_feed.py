"""The feed of all jobs' changes (`GET /events`, `WS /ws`): job_feed, written with each change of a job's row.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-02

- job_feed: id (the feed's event id, never reused: AUTOINCREMENT on SQLite), the job, its owner, batch and
  template, the event's name and the job's status, when, and the event's data; ix_job_feed_at for its pruning.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "job_feed",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True),
        sa.Column("job_id", sa.String(length=64), nullable=False),
        sa.Column("owner", sa.String(length=128), nullable=True),
        sa.Column("batch_id", sa.String(length=64), nullable=True),
        sa.Column("template_id", sa.String(length=128), nullable=True),
        sa.Column("event", sa.String(length=16), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("data", sa.JSON(), nullable=False),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_job_feed_at", "job_feed", ["at"])


def downgrade() -> None:
    op.drop_index("ix_job_feed_at", table_name="job_feed")
    op.drop_table("job_feed")
