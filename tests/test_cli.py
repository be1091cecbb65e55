"""The command line's set-up commands, run as a user runs them (its commands for people: test_cli_gateway.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.harness import cli_environment


def cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "app.cli", *args], cwd=tmp_path, capture_output=True,
                          env=cli_environment(tmp_path / "data"), text=True, timeout=60)


def test_init_writes_folders_and_a_commented_env_example(tmp_path: Path) -> None:
    result = cli(tmp_path, "init")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "data" / "outputs").is_dir()
    example = (tmp_path / ".env.example").read_text()
    assert "# COMFYUI_URL=http://127.0.0.1:8188" in example and "# MAX_CONCURRENCY=1" in example
    assert all(line == "" or line.startswith("#") for line in example.splitlines())
    # The committed one, beside docker-compose.yml, is what init writes (tests/test_deployment.py: every setting).
    assert example == (Path(__file__).resolve().parents[1] / ".env.example").read_text()
    (tmp_path / ".env.example").write_text("mine")
    assert cli(tmp_path, "init").returncode == 0 and (tmp_path / ".env.example").read_text() == "mine"
