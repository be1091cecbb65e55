"""`comfyui-gateway dev` as a user runs it: one process tree, a clean stop, jobs that survive a restart, no
process left behind however dev dies, no Temporal but its own, and parts restarted when they die."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from temporalio.client import Client

from tests.harness import DONE, REPO_ROOT, SimulatorProcess, free_port, recorded_workflow


def dev_environment(tmp_path: Path, comfyui_url: str) -> dict[str, str]:
    return {
        **os.environ,
        "DATA_DIR": str(tmp_path / "gateway"),
        "PORT": str(free_port()),
        "COMFYUI_URL": comfyui_url,
        "TEMPORAL_ADDRESS": f"127.0.0.1:{free_port()}",
        "TEMPORAL_UI_PORT": str(free_port()),
        "COMFYUI_TIMEOUT_MS": "120000",
    }


def temporal_port(env: dict[str, str]) -> int:
    return int(env["TEMPORAL_ADDRESS"].rsplit(":", 1)[1])


def start_dev(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as output:  # the child keeps its own handle
        process = subprocess.Popen([sys.executable, "-m", "app.cli", "dev"], cwd=REPO_ROOT, env=env,
                                   stdout=output, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            httpx.get(f"http://127.0.0.1:{env['PORT']}/health", timeout=2)
            return process
        except httpx.TransportError:
            time.sleep(0.2)
    process.kill()
    raise AssertionError(f"the gateway did not start; see {log}")


def descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the process ended while we looked
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def part_of_dev(pid: int) -> str:
    """"temporal", "worker" or "api": what a process of dev's tree runs, from its command line."""
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "gone"
    return "temporal" if b"start-dev" in command else command[-2].decode()  # [..., "app.cli", "worker", ""]


def part_pids(dev: subprocess.Popen[bytes], part: str) -> set[int]:
    return {pid for pid in descendants(dev.pid) if alive(pid) and part_of_dev(pid) == part}


def port_is_free(port: int) -> bool:
    try:
        socket.create_server(("127.0.0.1", port)).close()
    except OSError:
        return False
    return True


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not {what} after {timeout} s"
        time.sleep(0.1)


def run_dev_until_it_exits(env: dict[str, str]) -> tuple[int, str, float]:
    """Exit code, output and seconds taken by a dev that is meant to refuse to start."""
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "app.cli", "dev"], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=30)
    return result.returncode, result.stdout + result.stderr, time.monotonic() - started


def stop_dev(process: subprocess.Popen[bytes]) -> list[int]:
    """SIGTERM the gateway; returns the processes of its tree still alive afterwards."""
    tree = descendants(process.pid)
    assert len(tree) >= 3  # Temporal, the worker and the API
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0
    return [pid for pid in tree if alive(pid)]


def test_dev_runs_everything_stops_cleanly_and_jobs_survive_a_restart(tmp_path: Path) -> None:
    (tmp_path / "comfyui").mkdir()
    simulator = SimulatorProcess(tmp_path / "comfyui")
    env = dev_environment(tmp_path, simulator.url)  # not running yet: the job has to wait for it
    api = f"http://127.0.0.1:{env['PORT']}"
    gateway = start_dev(env, tmp_path / "dev.log")
    try:
        health = httpx.get(f"{api}/health").json()
        assert health["temporal"]["reachable"] is True and health["comfyui"]["reachable"] is False
        ui = httpx.get(f"http://127.0.0.1:{env['TEMPORAL_UI_PORT']}/")
        assert ui.status_code == 200  # the Temporal Web UI
        job_id = httpx.post(f"{api}/jobs", json={"workflowJson": recorded_workflow("image.json")}).json()["jobId"]
        time.sleep(1)
        assert httpx.get(f"{api}/jobs/{job_id}").json()["status"] == "queued"
    finally:
        survivors = stop_dev(gateway)
    assert survivors == []

    simulator.start()
    gateway = start_dev(env, tmp_path / "dev.log")
    try:
        deadline = time.monotonic() + 60
        while (job := httpx.get(f"{api}/jobs/{job_id}").json())["status"] in ("queued", "running"):
            assert time.monotonic() < deadline, job
            time.sleep(0.2)
        assert job["status"] == "succeeded" and len(job["outputs"]) == 1
        assert httpx.get(f"{api}{job['outputs'][0]['url']}").status_code == 200
    finally:
        assert stop_dev(gateway) == []
        simulator.kill()


def test_a_killed_dev_takes_temporal_the_worker_and_the_api_with_it(tmp_path: Path) -> None:
    env = dev_environment(tmp_path, comfyui_url=f"http://127.0.0.1:{free_port()}")
    gateway = start_dev(env, tmp_path / "dev.log")
    tree = descendants(gateway.pid)
    try:
        assert sorted(part_of_dev(pid) for pid in tree) == ["api", "temporal", "worker"]
        gateway.kill()
        gateway.wait()
        wait_until(lambda: not any(alive(pid) for pid in tree), timeout=10, what="all of dev's tree gone")
        ports = [int(env["PORT"]), temporal_port(env), int(env["TEMPORAL_UI_PORT"])]
        wait_until(lambda: all(port_is_free(port) for port in ports), timeout=5, what="all ports free")
    finally:
        for pid in filter(alive, tree):  # what the gateway left behind must not outlive the test
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("taken", ["TEMPORAL_ADDRESS", "TEMPORAL_UI_PORT"])
def test_dev_refuses_to_start_when_a_temporal_port_is_taken(tmp_path: Path, taken: str) -> None:
    env = dev_environment(tmp_path, comfyui_url=f"http://127.0.0.1:{free_port()}")
    port = temporal_port(env) if taken == "TEMPORAL_ADDRESS" else int(env["TEMPORAL_UI_PORT"])
    with socket.create_server(("127.0.0.1", port)):  # a listener that is no Temporal at all
        code, output, seconds = run_dev_until_it_exits(env)
    assert code != 0 and seconds < 10, (code, seconds, output)
    assert f"127.0.0.1:{port} ({taken}) is not free: Address already in use" in output


def test_dev_never_uses_a_temporal_it_did_not_start(tmp_path: Path, temporal_client: Client) -> None:
    env = dev_environment(tmp_path, comfyui_url=f"http://127.0.0.1:{free_port()}")
    env["TEMPORAL_ADDRESS"] = temporal_client.service_client.config.target_host  # the test session's Temporal
    code, output, seconds = run_dev_until_it_exits(env)
    assert code != 0 and seconds < 10, (code, seconds, output)
    assert f"{env['TEMPORAL_ADDRESS']} (TEMPORAL_ADDRESS) is not free" in output
    assert "worker polling" not in output


def test_dev_whose_temporal_fails_to_start_exits_at_once_with_the_reason(tmp_path: Path) -> None:
    env = dev_environment(tmp_path, comfyui_url=f"http://127.0.0.1:{free_port()}")
    (tmp_path / "gateway" / "temporal.db").mkdir(parents=True)  # a database Temporal cannot open
    code, output, seconds = run_dev_until_it_exits(env)
    assert code != 0 and seconds < 15, (code, seconds, output)
    assert "Temporal exited with code 1: Error:" in output and "unable to open database file" in output


def test_dev_restarts_a_killed_worker_while_the_api_keeps_answering(tmp_path: Path) -> None:
    (tmp_path / "comfyui").mkdir()
    simulator = SimulatorProcess(tmp_path / "comfyui")
    simulator.start()
    env = dev_environment(tmp_path, simulator.url)
    api = f"http://127.0.0.1:{env['PORT']}"

    def healthy() -> bool:
        return httpx.get(f"{api}/health", timeout=5).status_code == 200

    gateway = start_dev(env, tmp_path / "dev.log")
    try:
        wait_until(healthy, timeout=20, what="healthy")  # the API connects to Temporal on its own time
        [killed] = part_pids(gateway, "worker")
        os.kill(killed, signal.SIGKILL)

        def restarted() -> bool:
            assert healthy(), "the API stopped answering while the worker was down"
            return len(part_pids(gateway, "worker") - {killed}) == 1

        wait_until(restarted, timeout=20, what="a new worker")
        job_id = httpx.post(f"{api}/jobs", json={"workflowJson": recorded_workflow("image.json")}).json()["jobId"]

        def done() -> bool:
            assert healthy()
            return httpx.get(f"{api}/jobs/{job_id}").json()["status"] in DONE

        wait_until(done, timeout=30, what="the job done")
        assert httpx.get(f"{api}/jobs/{job_id}").json()["status"] == "succeeded"
    finally:
        simulator.kill()
        assert stop_dev(gateway) == []
    assert "worker was killed by SIGKILL; restarting it in 1 s" in (tmp_path / "dev.log").read_text()
