"""The result cache and idempotent submission.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01

- jobs.cache_key (indexed): the result cache key of a cacheable job; a hit is the latest succeeded job with it.
- jobs.cache_hit, jobs.cached_from (indexed): a job that took an earlier job's outputs, and which job that was
  (its files are that job's files).
- jobs.request_fingerprint: the SHA-256 of the request of a job submitted with an idempotency key.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as jobs:
        jobs.add_column(sa.Column("cache_key", sa.String(length=64), nullable=True))
        jobs.add_column(sa.Column("cache_hit", sa.Boolean(), nullable=False, server_default=sa.false()))
        jobs.add_column(sa.Column("cached_from", sa.String(length=64), nullable=True))
        jobs.add_column(sa.Column("request_fingerprint", sa.String(length=64), nullable=True))
        jobs.create_index("ix_jobs_cache_key", ["cache_key"])
        jobs.create_index("ix_jobs_cached_from", ["cached_from"])
    # The default was only for the rows already there; the model has none.
    with op.batch_alter_table("jobs") as jobs:
        jobs.alter_column("cache_hit", existing_type=sa.Boolean(), server_default=None, existing_nullable=False)


def downgrade() -> None:
    with op.batch_alter_table("jobs") as jobs:
        jobs.drop_index("ix_jobs_cached_from")
        jobs.drop_index("ix_jobs_cache_key")
        jobs.drop_column("request_fingerprint")
        jobs.drop_column("cached_from")
        jobs.drop_column("cache_hit")
        jobs.drop_column("cache_key")
