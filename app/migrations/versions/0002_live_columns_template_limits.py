"""Live columns on jobs, a template's own limits, 64-bit seeds.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01

- jobs.current_node, queue_position, warning: what the prompt activity keeps current while a job runs, so that
  lists agree with a job read on its own.
- workflow_templates.limits: a template's own maxImageSize/maxBatchSize. Limits are now checked on the rendered
  graph of every job; the bundled animated_noise_webp sets its frames as a batch, which its schema allowed up
  to 32 before the check, so its rows get the limit its bundled file now carries.
- jobs.seed: seeds reach 2**48, past PostgreSQL's INTEGER.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as jobs:
        jobs.add_column(sa.Column("current_node", sa.String(length=64), nullable=True))
        jobs.add_column(sa.Column("queue_position", sa.Integer(), nullable=True))
        jobs.add_column(sa.Column("warning", sa.JSON(), nullable=True))
        jobs.alter_column("seed", existing_type=sa.Integer(), type_=sa.BigInteger(), existing_nullable=True)

    with op.batch_alter_table("workflow_templates") as templates:
        templates.add_column(sa.Column("limits", sa.JSON(), nullable=True))
    workflow_templates = sa.table("workflow_templates", sa.column("template_id"), sa.column("limits", sa.JSON))
    op.execute(workflow_templates.update().values(limits={}))
    op.execute(
        workflow_templates.update()
        .where(workflow_templates.c.template_id == "animated_noise_webp")
        .values(limits={"maxBatchSize": 32})
    )
    with op.batch_alter_table("workflow_templates") as templates:
        templates.alter_column("limits", existing_type=sa.JSON(), nullable=False)


def downgrade() -> None:
    with op.batch_alter_table("workflow_templates") as templates:
        templates.drop_column("limits")
    with op.batch_alter_table("jobs") as jobs:
        jobs.alter_column("seed", existing_type=sa.BigInteger(), type_=sa.Integer(), existing_nullable=True)
        jobs.drop_column("warning")
        jobs.drop_column("queue_position")
        jobs.drop_column("current_node")
