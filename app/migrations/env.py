"""Alembic's environment, run by app.db.migrate and by `python -m app.migrations`.

It never opens a connection of its own: the caller hands one in (config.attributes["connection"]), already in
the transaction that holds the migration lock, and with whatever schema or search_path the caller chose.
"""

from __future__ import annotations

from typing import Any

from alembic import context
from alembic.autogenerate.api import AutogenContext
from sqlmodel import SQLModel
from sqlmodel.sql.sqltypes import AutoString

from app import tables  # noqa: F401  (registers the table models on SQLModel.metadata, for autogenerate)


def _render_item(kind: str, item: Any, _autogen: AutogenContext) -> str | bool:
    # SQLModel's str columns are AutoString, which is VARCHAR; spelt as sa.String a revision needs no sqlmodel.
    if kind == "type" and isinstance(item, AutoString):
        return f"sa.String(length={item.length})" if item.length else "sa.String()"
    return False


context.configure(
    connection=context.config.attributes["connection"],
    target_metadata=SQLModel.metadata,
    # SQLite alters a table by copying it; batch mode does that for every ALTER a later revision makes.
    render_as_batch=True,
    render_item=_render_item,
)
with context.begin_transaction():
    context.run_migrations()
