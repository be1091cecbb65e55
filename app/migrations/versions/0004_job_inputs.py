"""The staged input images each job uses, for retention.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01

- job_inputs (job_id, storage_key, created_at): inline images are stored once per content and shared by the
  jobs that sent them; retention deletes one only when no job left refers to it. Jobs submitted before this
  revision have no rows here, so the images they staged are never deleted by retention.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "job_inputs",
        sa.Column("job_id", sa.String(length=64), nullable=False),
        sa.Column("storage_key", sa.String(length=255), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("job_id", "storage_key"),
    )
    op.create_index("ix_job_inputs_storage_key", "job_inputs", ["storage_key"])


def downgrade() -> None:
    op.drop_index("ix_job_inputs_storage_key", table_name="job_inputs")
    op.drop_table("job_inputs")
