"""A job's priority and backend tag on its row, for its place in line.

Revision ID: 0010
Revises: 0008
Create Date: 2026-12-02

- jobs.priority (1 highest … 5 lowest; 3 for jobs from before priorities) and jobs.backend_tag (the tag its
  prompt waits for; none: any backend): which waiting jobs are ahead of a job (app.queue_estimates). Indexed
  with the status, which every such count filters on first.
- ix_jobs_recent_runs (template_id, status, completed_at): a template's latest successes, its run time.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("priority", sa.Integer(), nullable=False, server_default="3"))
        batch.add_column(sa.Column("backend_tag", sa.String(length=32), nullable=True))
        batch.create_index("ix_jobs_status_priority", ["status", "priority"])
        batch.create_index("ix_jobs_recent_runs", ["template_id", "status", "completed_at"])


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_index("ix_jobs_recent_runs")
        batch.drop_index("ix_jobs_status_priority")
        batch.drop_column("backend_tag")
        batch.drop_column("priority")
