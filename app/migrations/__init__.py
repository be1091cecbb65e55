"""The gateway's schema migrations (Alembic), configured in code: no alembic.ini, from any working directory
and from an installed package. The revisions are in versions/; app.db.migrate runs them."""

from __future__ import annotations

from pathlib import Path

from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection

SCRIPT_LOCATION = Path(__file__).resolve().parent


def alembic_config(connection: Connection) -> Config:
    """Alembic's configuration for commands run on `connection` (env.py uses it and opens none itself)."""
    config = Config()
    config.set_main_option("script_location", str(SCRIPT_LOCATION))
    config.set_main_option("path_separator", "os")
    config.set_main_option("file_template", "%%(rev)s_%%(slug)s")  # 0002_add_job_priority.py
    config.attributes["connection"] = connection
    return config


def script_directory() -> ScriptDirectory:
    """The revisions this code knows, without a connection: enough to name the head."""
    return ScriptDirectory(str(SCRIPT_LOCATION))
