"""`comfyui-gateway dev` as a user runs it: one process tree, a clean stop, jobs that survive a restart, no
process left behind however dev dies, no Temporal but its own, and parts restarted when they die."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from temporalio.client import Client

from app.cli import DEV_WORKER_METRICS_ADDRESS
from tests.harness import (
    DONE,
    REPO_ROOT,
    SUITE_HEARTBEAT_TIMEOUT_S,
    SUITE_STICKY_TIMEOUT_S,
    SimulatorProcess,
    assert_eventually,
    free_port,
    recorded_workflow,
)


def dev_environment(tmp_path: Path, comfyui_url: str) -> dict[str, str]:
    return {
        **os.environ,
        "DATA_DIR": str(tmp_path / "gateway"),
        "PORT": str(free_port()),
        "COMFYUI_URL": comfyui_url,
        "TEMPORAL_ADDRESS": f"127.0.0.1:{free_port()}",
        "TEMPORAL_UI_PORT": str(free_port()),
        "COMFYUI_TIMEOUT_MS": "120000",
        # The suite's waits for a worker that is gone (tests.harness.gateway_settings), not the defaults.
        "COMFYUI_HEARTBEAT_TIMEOUT_S": str(SUITE_HEARTBEAT_TIMEOUT_S),
        "TEMPORAL_STICKY_TIMEOUT_S": str(SUITE_STICKY_TIMEOUT_S),
    }


def temporal_port(env: dict[str, str]) -> int:
    return int(env["TEMPORAL_ADDRESS"].rsplit(":", 1)[1])


async def start_dev(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as output:  # the child keeps its own handle
        process = subprocess.Popen([sys.executable, "-m", "app.cli", "dev"], cwd=REPO_ROOT, env=env,
                                   stdout=output, stderr=subprocess.STDOUT)
    async with httpx.AsyncClient(timeout=2) as client:

        async def api_answers() -> bool:
            try:
                await client.get(f"http://127.0.0.1:{env['PORT']}/health")
            except httpx.TransportError:
                return False
            return True

        try:
            await assert_eventually(api_answers, timeout=60, interval=0.2, what=f"the gateway answering (log: {log})")
        except AssertionError:
            process.kill()
            raise
    return process


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
    if command == [b""]:
        return "gone"  # exiting: a killed process gives up its memory, command line included, before it is a zombie
    return "temporal" if b"start-dev" in command else command[-2].decode()  # [..., "app.cli", "worker", ""]


def part_pids(dev: subprocess.Popen[bytes], part: str) -> set[int]:
    return {pid for pid in descendants(dev.pid) if alive(pid) and part_of_dev(pid) == part}


def port_is_free(port: int) -> bool:
    try:
        socket.create_server(("127.0.0.1", port)).close()
    except OSError:
        return False
    return True


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


async def test_dev_runs_everything_stops_cleanly_keeps_jobs_across_a_restart_and_restarts_a_killed_worker(
    tmp_path: Path,
) -> None:
    """The second dev run, with ComfyUI up, also has its worker killed: each dev start takes seconds, so the
    checks of a running dev share the runs this test makes anyway."""
    (tmp_path / "comfyui").mkdir()
    simulator = SimulatorProcess(tmp_path / "comfyui")
    env = dev_environment(tmp_path, simulator.url)  # not running yet: the job has to wait for it
    gateway = await start_dev(env, tmp_path / "dev.log")
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{env['PORT']}") as api:
            health = (await api.get("/health")).json()
            assert health["temporal"]["reachable"] is True and health["comfyui"]["reachable"] is False
            ui = await api.get(f"http://127.0.0.1:{env['TEMPORAL_UI_PORT']}/")
            assert ui.status_code == 200  # the Temporal Web UI
            submitted = await api.post("/jobs", json={"workflowJson": recorded_workflow("image.json")})
            job_id = submitted.json()["jobId"]

            async def waiting_for_comfyui() -> dict | None:
                job = (await api.get(f"/jobs/{job_id}")).json()
                return job if job["warning"] else None

            # The worker has the job and waits for ComfyUI: the restart interrupts a job in progress.
            job = await assert_eventually(waiting_for_comfyui, timeout=20, what="the job waiting for ComfyUI")
            assert job["status"] == "queued" and job["warning"]["code"] == "COMFYUI_UNREACHABLE"
            # Its history in the dev server's Web UI, which dev links every job to.
            ui_url = f"http://127.0.0.1:{env['TEMPORAL_UI_PORT']}/namespaces/default"
            assert job["temporalUiUrl"] == f"{ui_url}/workflows/{job_id}"
            await the_worker_serves_its_metrics_unless_the_port_is_taken(tmp_path / "dev.log")
    finally:
        survivors = stop_dev(gateway)
    assert survivors == []
    assert (tmp_path / "dev.log").read_text().count("OPEN MODE") == 1  # the API's warning, not dev's as well

    simulator.start()
    gateway = await start_dev(env, tmp_path / "dev.log")
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{env['PORT']}", timeout=5) as api:

            async def finished() -> dict:
                job = (await api.get(f"/jobs/{job_id}")).json()
                assert job["status"] in DONE, job
                return job

            job = await assert_eventually(finished, timeout=60, interval=0.2)
            assert job["status"] == "succeeded" and len(job["outputs"]) == 1
            assert (await api.get(job["outputs"][0]["url"])).status_code == 200
            await a_killed_worker_is_restarted_while_the_api_keeps_answering(gateway, api)
    finally:
        simulator.kill()
        assert stop_dev(gateway) == []  # the restarted worker stops with the rest
    assert "worker was killed by SIGKILL; restarting it in 1 s" in (tmp_path / "dev.log").read_text()


async def the_worker_serves_its_metrics_unless_the_port_is_taken(log: Path) -> None:
    """dev's default WORKER_METRICS_ADDRESS (README "Metrics"); another program on its port (another dev's
    worker, on a shared machine) leaves the worker without metrics, as dev says."""
    host, port = DEV_WORKER_METRICS_ADDRESS
    if f"worker metrics off: {host}:{port} is not free" in log.read_text():
        return
    assert f"worker metrics on http://{host}:{port}/metrics" in log.read_text()
    async with httpx.AsyncClient() as client:

        async def scraped() -> httpx.Response | None:
            try:
                return await client.get(f"http://{host}:{port}/metrics")
            except httpx.TransportError:
                return None  # the worker is not serving yet

        metrics = await assert_eventually(scraped, timeout=20, what="the worker's metrics")
    assert metrics.status_code == 200 and "gateway_jobs_created_total" in metrics.text


async def a_killed_worker_is_restarted_while_the_api_keeps_answering(
    gateway: subprocess.Popen[bytes], api: httpx.AsyncClient
) -> None:
    async def healthy() -> bool:
        return (await api.get("/health")).status_code == 200

    async def still_healthy(when: str) -> None:
        # pytest.fail, not assert: assert_eventually takes an AssertionError for "not yet" and polls on.
        if not await healthy():
            pytest.fail(f"the API stopped answering {when}")

    # the API connects to Temporal on its own time
    await assert_eventually(healthy, timeout=20, interval=0.1, what="healthy")
    [killed] = part_pids(gateway, "worker")
    os.kill(killed, signal.SIGKILL)

    async def restarted() -> bool:
        await still_healthy("while the worker was down")
        return len(part_pids(gateway, "worker") - {killed}) == 1

    await assert_eventually(restarted, timeout=20, interval=0.1, what="a new worker")
    submitted = await api.post("/jobs", json={"workflowJson": recorded_workflow("image.json")})
    job_id = submitted.json()["jobId"]

    async def done() -> bool:
        await still_healthy("while the job ran")
        return (await api.get(f"/jobs/{job_id}")).json()["status"] in DONE

    await assert_eventually(done, timeout=30, interval=0.1, what="the job done")
    assert (await api.get(f"/jobs/{job_id}")).json()["status"] == "succeeded"


async def test_a_killed_dev_takes_temporal_the_worker_and_the_api_with_it(tmp_path: Path) -> None:
    env = dev_environment(tmp_path, comfyui_url=f"http://127.0.0.1:{free_port()}")
    gateway = await start_dev(env, tmp_path / "dev.log")
    tree = descendants(gateway.pid)
    try:
        assert sorted(part_of_dev(pid) for pid in tree) == ["api", "temporal", "worker"]
        gateway.kill()
        gateway.wait()
        await assert_eventually(lambda: not any(alive(pid) for pid in tree), timeout=10, interval=0.1,
                                what="all of dev's tree gone")
        ports = [int(env["PORT"]), temporal_port(env), int(env["TEMPORAL_UI_PORT"])]
        await assert_eventually(lambda: all(port_is_free(port) for port in ports), timeout=5, interval=0.1,
                                what="all ports free")
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


def test_dev_whose_api_port_is_taken_stops_with_exit_78_and_does_not_restart_the_api(tmp_path: Path) -> None:
    env = dev_environment(tmp_path, comfyui_url=f"http://127.0.0.1:{free_port()}")
    with socket.create_server(("127.0.0.1", int(env["PORT"]))):  # another program on the API's port
        code, output, seconds = run_dev_until_it_exits(env)
    assert code == os.EX_CONFIG and seconds < 25, (code, seconds, output)
    assert f"cannot listen on 127.0.0.1:{env['PORT']} (HOST, PORT): Address already in use" in output
    assert "api exited with code 78 (EX_CONFIG" in output and "restarting it in" not in output


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
