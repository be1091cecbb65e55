"""The command line's registry commands, run as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.harness import SHARED_COMFYUI, cli_environment


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


def test_add_and_list_workflows(tmp_path: Path) -> None:
    assert cli(tmp_path, "migrate").returncode == 0
    graph = SHARED_COMFYUI / "workflows" / "image.template.json"
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({"type": "object", "fields": {"color": {"type": "integer", "required": True}}}))
    refused = cli(tmp_path, "add-workflow", str(graph), "--id", "mine", "--schema", str(schema))
    assert refused.returncode == 1 and "{{width}}: placeholder is neither" in refused.stderr

    defaults = tmp_path / "defaults.json"
    defaults.write_text(json.dumps({"width": 64, "height": 64, "filename_prefix": "mine"}))
    added = cli(tmp_path, "add-workflow", str(graph), "--id", "mine", "--name", "Mine", "--schema", str(schema),
                "--defaults", str(defaults))
    assert added.returncode == 0, added.stderr
    assert "registered mine version 1" in added.stdout and "node types not checked" in added.stdout
    again = cli(tmp_path, "add-workflow", str(graph), "--id", "mine", "--schema", str(schema), "--defaults", str(defaults))
    assert again.returncode == 1 and "--update" in again.stderr
    updated = cli(tmp_path, "add-workflow", str(graph), "--id", "mine", "--name", "Mine 2", "--schema", str(schema),
                  "--defaults", str(defaults), "--update")
    assert "registered mine version 2" in updated.stdout

    listing = cli(tmp_path, "list-workflows").stdout.splitlines()
    rows = {line.split()[0]: line.split(None, 2) for line in listing[1:]}
    assert rows["mine"][1:] == ["2", "Mine 2"]
    assert {"solid_color", "animated_noise_webp", "invert_image", "sdxl_realism_v1"} <= rows.keys()
