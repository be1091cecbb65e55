"""Write a new revision: `python -m app.migrations revision -m "add job priority" [--autogenerate]`.

The revision gets the next number (0002, 0003, ...). --autogenerate diffs the SQLModel tables against a scratch
SQLite database upgraded to the current head, so the revision holds what the models changed since the last
one, whatever database the developer has at hand. Review what it wrote: autogenerate misses renames and
server-side defaults.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from alembic import command

from app.db import make_engine, migrate
from app.migrations import alembic_config, script_directory


def next_revision_id() -> str:
    return f"{int(script_directory().get_current_head()) + 1:04d}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m app.migrations", description="The gateway's schema revisions.")
    commands = parser.add_subparsers(dest="command", required=True)
    revision = commands.add_parser("revision", help="write a new revision into app/migrations/versions")
    revision.add_argument("-m", "--message", required=True, help="what the revision changes")
    revision.add_argument("--autogenerate", action="store_true", help="fill it in from the models' changes")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as scratch:
        engine = make_engine(f"sqlite:///{Path(scratch) / 'head.db'}")
        migrate(engine)
        with engine.begin() as connection:
            command.revision(  # prints the file it writes
                alembic_config(connection), message=args.message, autogenerate=args.autogenerate,
                rev_id=next_revision_id(),
            )
        engine.dispose()


if __name__ == "__main__":
    main()
