"""A job's webhook: how its delivery has fared.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01

- jobs.webhook: {delivered, attempts, lastStatus} of the job's webhook, written by its delivery activity at each
  attempt; NULL for a job without a callbackUrl (and every job from before).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as jobs:
        jobs.add_column(sa.Column("webhook", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as jobs:
        jobs.drop_column("webhook")
