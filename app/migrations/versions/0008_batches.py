"""Batches: the batches table, and the batch a job is an item of.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02

- batches (batch_id, status, template_id, owner, priority, metadata, total, started, tally, cancel_reason, webhook,
  created_at, started_at, completed_at, updated_at): one row per batch (POST /batches), written by its
  BatchWorkflow.
- jobs.batch_id (indexed): the batch whose item the job is; None for jobs submitted on their own, and for every job
  from before this revision.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "batches",
        sa.Column("batch_id", sa.String(length=64), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("template_id", sa.String(length=128), nullable=True),
        sa.Column("owner", sa.String(length=128), nullable=True),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("metadata", sa.JSON(), nullable=False),
        sa.Column("total", sa.Integer(), nullable=False),
        sa.Column("started", sa.Integer(), nullable=False),
        sa.Column("tally", sa.JSON(), nullable=False),
        sa.Column("cancel_reason", sa.String(), nullable=True),
        sa.Column("webhook", sa.JSON(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("completed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("batch_id"),
    )
    for column in ("status", "owner", "created_at"):
        op.create_index(f"ix_batches_{column}", "batches", [column])
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("batch_id", sa.String(length=64), nullable=True))
        batch.create_index("ix_jobs_batch_id", ["batch_id"])


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_index("ix_jobs_batch_id")
        batch.drop_column("batch_id")
    for column in ("status", "owner", "created_at"):
        op.drop_index(f"ix_batches_{column}", table_name="batches")
    op.drop_table("batches")
