"""What the benchmarks share: the simulator and `comfyui-gateway dev` started as a user starts them, a
zero-length ComfyUI job, percentiles."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from tests.harness import REPO_ROOT, SimulatorProcess, free_port

ZERO_LENGTH_PROMPT = {
    "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0}},
    "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "bench"}},
}
WARM_UP_JOBS = 3


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def _start_gateway(
    root: Path, comfyui_url: str, temporal_address: str, repo_root: Path
) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {
        **os.environ,
        "DATA_DIR": str(root / "gateway"),
        "PORT": str(port),
        "COMFYUI_URL": comfyui_url,
        "TEMPORAL_ADDRESS": temporal_address,
        "TEMPORAL_UI_PORT": str(free_port()),
        "LOG_LEVEL": "WARNING",
        "PYTHONPATH": str(repo_root),  # that checkout's code, whatever is installed
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
    raise SystemExit(f"the gateway did not become healthy; see {root / 'gateway.log'}")


@contextmanager
def simulated_gateway(temporal_address: str | None = None, repo_root: Path = REPO_ROOT) -> Iterator[str]:
    """The simulator and `comfyui-gateway dev` on a scratch DATA_DIR, for the block; yields the API's URL.
    Its Temporal listens at `temporal_address` (host:port) when given, for a benchmark that reads histories;
    the gateway is the code of `repo_root` (another checkout, for a benchmark that compares two versions)."""
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        (root / "comfyui").mkdir()
        simulator = SimulatorProcess(root / "comfyui")
        simulator.start()
        gateway, base_url = _start_gateway(
            root, simulator.url, temporal_address or f"127.0.0.1:{free_port()}", repo_root
        )
        try:
            yield base_url
        finally:
            gateway.send_signal(signal.SIGTERM)
            gateway.wait(timeout=30)
            simulator.kill()
