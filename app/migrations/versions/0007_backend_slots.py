"""Slot leases of the ComfyUI backends, and a template's backend tag.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02

- backend_slots (backend, slot, holder, prompt_id, expires_at): one row per slot of a backend that a worker process
  holds for a prompt. Every worker process sharing a backend list claims a backend's slots here, so that together
  they never keep more prompts on it than it has slots; a holder that stops renewing (it crashed) loses them when
  they expire.
- workflow_templates.backend_tag: the template's jobs run only on a backend with this tag (none before).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "backend_slots",
        sa.Column("backend", sa.String(length=32), nullable=False),
        sa.Column("slot", sa.Integer(), nullable=False),
        sa.Column("holder", sa.String(length=128), nullable=False),
        sa.Column("prompt_id", sa.String(length=64), nullable=True),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("backend", "slot"),
    )
    with op.batch_alter_table("workflow_templates") as batch:
        batch.add_column(sa.Column("backend_tag", sa.String(length=32), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("workflow_templates") as batch:
        batch.drop_column("backend_tag")
    op.drop_table("backend_slots")
