"""What the benchmarks share: the simulator (one or several) and `comfyui-gateway dev` started as a user starts
them, a zero-length ComfyUI job and one that runs for a set time, percentiles."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.harness import REPO_ROOT, SimulatorProcess, free_port

ZERO_LENGTH_PROMPT = {
    "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0}},
    "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "bench"}},
}
WARM_UP_JOBS = 3


def timed_prompt(seconds: float, steps: int = 1) -> dict:
    """A job ComfyUI runs for about SECONDS, reporting STEPS progress steps: TestSleepProgress is never cached, so
    it and the SaveImage after it run every time, where ZERO_LENGTH_PROMPT's nodes come from ComfyUI's cache after
    its first run."""
    return {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0}},
        "2": {"class_type": "TestSleepProgress", "inputs": {"image": ["1", 0], "seconds": seconds, "steps": steps}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "bench"}},
    }


async def submit_prompts(api: httpx.AsyncClient, prompt: dict, count: int) -> list[str]:
    """COUNT jobs of PROMPT posted one after the other; their ids."""
    job_ids = []
    for _ in range(count):
        response = await api.post("/jobs", json={"workflowJson": prompt})
        response.raise_for_status()
        job_ids.append(response.json()["jobId"])
    return job_ids


def cpu_seconds(root_pids: list[int]) -> dict[str, float]:
    """CPU time (user + system) spent so far by each process under ROOT_PIDS and their descendants, summed by
    part: `dev`, `worker`, `api` (the gateway's `app.cli` commands), `simulator`, or the program's name (the
    Temporal dev server is `temporal`). Linux only: read from /proc."""
    parents: dict[int, int] = {}
    ticks: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        pid = int(stat.parent.name)
        parents[pid], ticks[pid] = int(fields[1]), int(fields[11]) + int(fields[12])
    tree, frontier = set(), [pid for pid in root_pids if pid in ticks]
    while frontier:
        pid = frontier.pop()
        tree.add(pid)
        frontier.extend(child for child, parent in parents.items() if parent == pid and child not in tree)
    by_part: dict[str, float] = {}
    for pid in tree:
        try:
            argv = (Path("/proc") / str(pid) / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        words = [word.decode(errors="replace") for word in argv if word]
        if "app.cli" in words and words.index("app.cli") + 1 < len(words):
            part = words[words.index("app.cli") + 1]
        elif "app.simulator" in words:
            part = "simulator"
        else:
            part = Path(words[0]).name if words else "?"
        by_part[part] = by_part.get(part, 0.0) + ticks[pid] / os.sysconf("SC_CLK_TCK")
    return by_part


def cpu_per_job(cpu: dict[str, float], jobs: int) -> str:
    """CPU seconds by part, as milliseconds per job, the largest first: `worker 52.0, api 11.0 (all 63.0 ms)`."""
    per_job = sorted(((part, seconds * 1000 / jobs) for part, seconds in cpu.items()), key=lambda item: -item[1])
    shown = ", ".join(f"{part} {ms:.1f}" for part, ms in per_job if ms >= 0.05)
    return f"{shown} (all {sum(ms for _, ms in per_job):.1f} ms)"


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def _start_gateway(
    root: Path, comfyui_env: Mapping[str, str], temporal_address: str, repo_root: Path
) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {
        **os.environ,
        "DATA_DIR": str(root / "gateway"),
        "PORT": str(port),
        "TEMPORAL_ADDRESS": temporal_address,
        "TEMPORAL_UI_PORT": str(free_port()),
        "LOG_LEVEL": "WARNING",
        "PYTHONPATH": str(repo_root),  # that checkout's code, whatever is installed
        **comfyui_env,
    }
    with open(root / "gateway.log", "wb") as log:  # the child keeps its own handle
        process = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "dev"], cwd=repo_root, env=env, stdout=subprocess.DEVNULL, stderr=log,
        )
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base_url}/health", timeout=2).status_code == 200:
                return process, base_url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    process.kill()
    process.wait()
    # The log goes with the scratch directory: show its end (a refused setting is named there).
    tail = (root / "gateway.log").read_text(errors="replace").splitlines()[-15:]
    raise SystemExit("the gateway did not become healthy; the end of its log:\n" + "\n".join(tail))


def gateway_reads_backend_list() -> bool:
    """Whether the gateway these benchmarks start (this checkout's) knows COMFYUI_URLS."""
    from app.settings import Settings

    return "comfyui_urls" in Settings.model_fields


@dataclass(frozen=True)
class Stack:
    api_url: str
    simulators: list[SimulatorProcess]
    gateway_pid: int  # `comfyui-gateway dev`, parent of the Temporal dev server, the worker and the API

    def cpu_seconds(self) -> dict[str, float]:
        """CPU time each part of the stack has spent so far (see `cpu_seconds`)."""
        return cpu_seconds([self.gateway_pid, *(simulator.process.pid for simulator in self.simulators
                                                  if simulator.process is not None)])


@contextmanager
def simulated_stack(
    simulators: int = 1, backend_list: bool = False, gateway_env: Mapping[str, str] | None = None,
    temporal_address: str | None = None, repo_root: Path = REPO_ROOT,
) -> Iterator[Stack]:
    """SIMULATORS simulator processes and `comfyui-gateway dev` on a scratch DATA_DIR, for the block.

    The gateway reaches them through COMFYUI_URL (the first) or, with BACKEND_LIST, through COMFYUI_URLS as
    `sim1=URL,sim2=URL,...`; a release from before COMFYUI_URLS (benchmarked for comparison) gets COMFYUI_URL
    and so only the first. GATEWAY_ENV is added to the gateway's environment last (e.g. MAX_CONCURRENCY). Its
    Temporal listens at TEMPORAL_ADDRESS (host:port) when given, for a benchmark that reads histories; the
    gateway is the code of REPO_ROOT (another checkout, for a benchmark that compares two versions)."""
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        processes: list[SimulatorProcess] = []
        gateway: subprocess.Popen[bytes] | None = None
        try:
            for number in range(1, simulators + 1):
                data_dir = root / f"sim{number}" / "comfyui"  # each its own log: the directory's parent
                data_dir.mkdir(parents=True)
                processes.append(SimulatorProcess(data_dir))
                processes[-1].start()
            if backend_list and gateway_reads_backend_list():
                comfyui_env = {"COMFYUI_URLS": ",".join(
                    f"sim{number}={process.url}" for number, process in enumerate(processes, 1))}
            else:
                comfyui_env = {"COMFYUI_URL": processes[0].url}
            gateway, base_url = _start_gateway(
                root, {**comfyui_env, **(gateway_env or {})}, temporal_address or f"127.0.0.1:{free_port()}", repo_root
            )
            yield Stack(base_url, processes, gateway.pid)
        finally:
            if gateway is not None:
                gateway.send_signal(signal.SIGTERM)
                gateway.wait(timeout=30)
            for process in processes:
                process.kill()


@contextmanager
def simulated_gateway(temporal_address: str | None = None, repo_root: Path = REPO_ROOT) -> Iterator[str]:
    """The simulator and `comfyui-gateway dev` on a scratch DATA_DIR, for the block; yields the API's URL
    (for TEMPORAL_ADDRESS and REPO_ROOT see `simulated_stack`)."""
    with simulated_stack(temporal_address=temporal_address, repo_root=repo_root) as stack:
        yield stack.api_url
