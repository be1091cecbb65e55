"""Indexes for the outputs across jobs (`GET /outputs`), newest first.

Revision ID: 0012
Revises: 0010
Create Date: 2026-12-02

- ix_jobs_owner_completed (owner, completed_at): a user's outputs, walked in the order they were made.
- ix_jobs_completed (completed_at): everyone's, for an admin.
Without them each page sorts every job of the caller (of everyone, for an admin): at 100,000 jobs the page
itself (its count apart) took about 400 ms on SQLite for an admin without them, a few ms with them.
"""

from __future__ import annotations

from alembic import op

revision = "0012"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.create_index("ix_jobs_owner_completed", ["owner", "completed_at"])
        batch.create_index("ix_jobs_completed", ["completed_at"])


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_index("ix_jobs_completed")
        batch.drop_index("ix_jobs_owner_completed")
