"""`comfyui-gateway api` and `worker` started while Temporal is unreachable, as an operator's stack starts them:
the wait is bounded (TEMPORAL_CONNECT_TIMEOUT_S, then exit 69), a SIGTERM ends it at once, and the API holds
its port from before the wait (a port in use: exit 78, which `dev` does not restart)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from app.child_processes import PartMisconfigured, RestartingPart
from tests.harness import REPO_ROOT, cli_environment, free_port, migrated_database


def environment(tmp_path: Path, **variables: str) -> dict[str, str]:
    """A gateway's settings with a migrated database and nothing listening at TEMPORAL_ADDRESS."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    database_url = f"sqlite:///{data_dir / 'gateway.db'}"
    migrated_database(database_url)
    return cli_environment(data_dir, DATABASE_URL=database_url, TEMPORAL_ADDRESS=f"127.0.0.1:{free_port()}",
                           PORT=str(free_port()), LOG_FORMAT="text", LOG_LEVEL="INFO", **variables)


def start(command: str, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "app.cli", command], cwd=REPO_ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def read_until(process: subprocess.Popen[str], wanted: str) -> str:
    """The process's output up to the first line that has `wanted` (the reads block: the test's timeout bounds them)."""
    assert process.stdout is not None
    seen = []
    for line in process.stdout:
        seen.append(line)
        if wanted in line:
            return "".join(seen)
    raise AssertionError(f"{wanted!r} never came; output:\n{''.join(seen)}")


def test_the_worker_gives_up_on_temporal_after_the_connect_timeout_with_exit_69(tmp_path: Path) -> None:
    env = environment(tmp_path, TEMPORAL_CONNECT_TIMEOUT_S="2")
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "app.cli", "worker"], cwd=REPO_ROOT, env=env, text=True,
                          capture_output=True, timeout=60)
    took = time.monotonic() - started
    assert done.returncode == os.EX_UNAVAILABLE, done.stderr
    assert (f"Temporal at {env['TEMPORAL_ADDRESS']} (TEMPORAL_ADDRESS) did not answer within 2 s "
            "(TEMPORAL_CONNECT_TIMEOUT_S); last error:") in done.stderr
    assert took < 15, took  # about 2 s of waiting on top of the process's start
    assert "Traceback" not in done.stderr


def test_a_sigterm_while_the_api_waits_for_temporal_stops_it_at_once_and_its_port_is_held_meanwhile(
    tmp_path: Path,
) -> None:
    env = environment(tmp_path, TEMPORAL_CONNECT_TIMEOUT_S="600")
    api = start("api", env)
    try:
        read_until(api, "waiting for Temporal")
        # Held from before the wait: another server (SO_REUSEADDR, as uvicorn's) cannot take it meanwhile.
        with pytest.raises(OSError, match="Address already in use"):
            socket.create_server(("127.0.0.1", int(env["PORT"]))).close()
        api.send_signal(signal.SIGTERM)
        stopped = time.monotonic()
        assert api.wait(timeout=10) == 0
        assert time.monotonic() - stopped < 3  # not after the attempts left, nor after the timeout
        assert "stopped before Temporal answered" in api.stdout.read()
    finally:
        api.kill()
        api.wait()


def test_the_api_on_a_port_in_use_exits_78_at_once_naming_the_port(tmp_path: Path) -> None:
    env = environment(tmp_path, TEMPORAL_CONNECT_TIMEOUT_S="600")
    with socket.create_server(("127.0.0.1", int(env["PORT"]))):
        done = subprocess.run([sys.executable, "-m", "app.cli", "api"], cwd=REPO_ROOT, env=env, text=True,
                              capture_output=True, timeout=60)
    assert done.returncode == os.EX_CONFIG, done.stderr
    assert f"cannot listen on 127.0.0.1:{env['PORT']} (HOST, PORT): Address already in use" in done.stderr
    assert "waiting for Temporal" not in done.stderr


def test_dev_does_not_restart_a_part_that_exited_with_a_configuration_error() -> None:
    part = RestartingPart("api", [sys.executable, "-c", f"raise SystemExit({os.EX_CONFIG})"])
    part.start()
    deadline = time.monotonic() + 20
    try:
        while time.monotonic() < deadline:
            part.keep_running()  # raises once the part has exited with 78, instead of scheduling a restart
            time.sleep(0.05)
        raise AssertionError("the part was not reported as misconfigured")
    except PartMisconfigured as reported:
        assert str(reported).startswith("api exited with code 78 (EX_CONFIG")
    finally:
        part.stop(timeout=5)
