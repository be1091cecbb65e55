"""The command line's commands for people, run as a user runs them (a process of their own, GATEWAY_URL and
GATEWAY_API_KEY), against a real gateway: the API on a port, the worker, the session's simulator."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from comfyui_gateway_client import AsyncGatewayClient, JobFailed, JobStatus, NotFound
from tests.harness import REPO_ROOT, SHARED_COMFYUI, assert_eventually, free_port
from tests.test_auth import ADMIN_KEY, ALICE_KEY
from tests.test_client import FAILING_TEMPLATE, SLOW_TEMPLATE, seconds, served  # noqa: F401 - `served` is this module's gateway too
from tests.test_e2e_sse import Served


@dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str


async def cli(url: str, *args: str, api_key: str = ALICE_KEY, cwd: Path = REPO_ROOT, **variables: str) -> Ran:
    """`comfyui-gateway ARGS` in a process of its own, while this test's event loop serves the gateway."""
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "GATEWAY_URL": url, "GATEWAY_API_KEY": api_key,
                   **variables}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "app.cli", *args, cwd=cwd, env=environment,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    return Ran(process.returncode, stdout.decode(), stderr.decode())


async def test_generate_shows_progress_and_downloads_the_outputs(served: Served, tmp_path: Path) -> None:
    # FORCE_COLOR: rich draws its live bar as on a terminal, so what it showed is in stderr.
    picture = tmp_path / "in.png"
    Image.new("RGB", (8, 8), (255, 0, 0)).save(picture)
    ran, scripted, inverted, failing = await asyncio.gather(
        cli(served.url, "generate", SLOW_TEMPLATE, "--input", f"seconds={seconds(served.comfyui, 1.0)}",
            "--out", str(tmp_path / "out"), FORCE_COLOR="1"),
        cli(served.url, "generate", "solid_color", "-i", "width=8", "-i", "height=8", "-i", "color=255",
            "--priority", "1", "--out", str(tmp_path / "json"), "--json"),
        cli(served.url, "generate", "invert_image", "-i", f"image=@{picture}", "--out", str(tmp_path / "inverted")),
        cli(served.url, "generate", FAILING_TEMPLATE, "--out", str(tmp_path / "none")))
    assert ran.returncode == 0, ran.stderr
    [printed] = ran.stdout.splitlines()
    assert Path(printed).parent == tmp_path / "out" and Path(printed).read_bytes().startswith(b"\x89PNG")
    assert "running node 2" in ran.stderr and "succeeded" in ran.stderr
    assert "httpx" not in ran.stderr and "HTTP Request" not in ran.stderr

    # A file given as @path went inline; what came back is the picture inverted.
    assert inverted.returncode == 0, inverted.stderr
    assert Image.open(inverted.stdout.strip()).convert("RGB").getpixel((0, 0)) == (0, 255, 255)
    assert failing.returncode == 5 and "COMFYUI_OOM" in failing.stderr, failing.stderr
    assert not (tmp_path / "none").exists()

    assert scripted.returncode == 0, scripted.stderr
    answer = json.loads(scripted.stdout)
    assert answer["job"]["status"] == "succeeded" and answer["job"]["workflowId"] == "solid_color"
    assert answer["job"]["priority"] == 1
    assert [Path(path).name for path in answer["files"]] == [answer["job"]["outputs"][0]["filename"]]
    job_id = answer["job"]["jobId"]

    listed, shown, logs, cancel = await asyncio.gather(
        cli(served.url, "jobs", "list", "--workflow", "solid_color", "--json"),
        cli(served.url, "jobs", "show", job_id),
        cli(served.url, "jobs", "logs", job_id),
        cli(served.url, "jobs", "cancel", job_id),
    )
    assert job_id in {job["jobId"] for job in json.loads(listed.stdout)["jobs"]}
    assert f"job       {job_id}" in shown.stdout and "status    succeeded" in shown.stdout
    assert "succeeded" in logs.stdout and logs.returncode == 0
    assert cancel.returncode == 1 and "JOB_ALREADY_FINISHED" in cancel.stderr


async def test_workflows_are_managed_through_the_api(served: Served, tmp_path: Path) -> None:
    graph = SHARED_COMFYUI / "workflows" / "image.template.json"  # {{width}}, {{height}}, {{filename_prefix}}
    schema, defaults = tmp_path / "schema.json", tmp_path / "defaults.json"
    schema.write_text(json.dumps({"type": "object", "fields": {"color": {"type": "integer", "required": True}}}))
    defaults.write_text(json.dumps({"width": 64, "height": 64, "filename_prefix": "mine"}))
    template = f"cli_{uuid.uuid4().hex[:8]}"
    # From another folder than the gateway's: nothing here is a database; the API is what is changed.
    ui_export = tmp_path / "ui.json"
    ui_export.write_text(json.dumps({"last_node_id": 1, "nodes": [{"id": 1, "type": "EmptyImage"}], "links": []}))
    forbidden, undeclared, from_the_editor = await asyncio.gather(
        cli(served.url, "workflows", "add", str(graph), "--id", template, cwd=tmp_path),
        cli(served.url, "workflows", "add", str(graph), "--id", template, "--schema", str(schema), "--json",
            api_key=ADMIN_KEY),
        cli(served.url, "workflows", "add", str(ui_export), "--id", "from_the_editor", api_key=ADMIN_KEY))
    assert forbidden.returncode == 4 and "FORBIDDEN" in forbidden.stderr
    error = json.loads(undeclared.stdout)["error"]
    assert undeclared.returncode == 1 and error["code"] == "VALIDATION_ERROR", undeclared
    assert "placeholder is neither" in error["details"]["fields"][0]["message"]
    assert from_the_editor.returncode == 1 and '"Export (API)"' in from_the_editor.stderr
    assert from_the_editor.stderr.count("workflowJson") == 1, from_the_editor.stderr  # one hint, not one per key

    added = await cli(served.url, "workflows", "add", str(graph), "--id", template, "--name", "Mine",
                      "--schema", str(schema), "--defaults", str(defaults), api_key=ADMIN_KEY, cwd=tmp_path)
    assert added.returncode == 0 and f"registered {template} version 1" in added.stdout, added.stderr
    updated = await cli(served.url, "workflows", "update", template, "--description", "second", api_key=ADMIN_KEY)
    assert f"updated {template} version 2" in updated.stdout, updated.stderr
    again = await cli(served.url, "workflows", "update", template, "--description", "second", api_key=ADMIN_KEY)
    assert again.returncode == 0 and again.stdout == f"unchanged {template} version 2\n", again
    listed, shown = await asyncio.gather(cli(served.url, "workflows", "list"),
                                         cli(served.url, "workflows", "show", template))
    rows = {line.split()[0]: line.split(None, 2)[1:] for line in listed.stdout.splitlines()[1:]}
    assert rows[template] == ["2", "Mine"] and {"solid_color", "invert_image"} <= rows.keys(), listed.stdout
    assert shown.stdout.splitlines()[:2] == [f"{template} version 2: Mine", "second"], shown.stdout
    assert "--input color=...  integer, required" in shown.stdout, shown.stdout
    deleted = await cli(served.url, "workflows", "delete", template, api_key=ADMIN_KEY)
    assert deleted.returncode == 0 and f"deleted {template}" in deleted.stdout
    async with AsyncGatewayClient(served.url, api_key=ADMIN_KEY) as admin:
        with pytest.raises(NotFound):
            await admin.get_workflow(template)


async def test_clear_errors_for_an_absent_gateway_and_refused_credentials(served: Served) -> None:
    nowhere = f"http://127.0.0.1:{free_port()}"
    absent, schemeless, refused, version, misspelt = await asyncio.gather(
        cli(nowhere, "jobs", "list"),
        cli(nowhere.removeprefix("http://"), "jobs", "list"),
        cli(served.url, "jobs", "list", api_key="not-a-key"),
        cli(served.url, "--version"),
        cli(served.url, "generate", "solid_color", "--input", "width"),
    )
    assert misspelt.returncode == 2 and "--input 'width': write KEY=VALUE" in misspelt.stderr
    assert absent.returncode == 3 and nowhere in absent.stderr and "GATEWAY_UNREACHABLE" in absent.stderr
    assert schemeless.returncode == 2 and f"e.g. {nowhere} (--url or GATEWAY_URL)" in schemeless.stderr, schemeless
    assert refused.returncode == 4 and "AUTH_FAILED" in refused.stderr and "--api-key" in refused.stderr
    assert version.returncode == 0 and version.stdout.startswith("comfyui-gateway ")


async def test_jobs_cancel_cancels_a_running_job(served: Served) -> None:
    async with AsyncGatewayClient(served.url, api_key=ALICE_KEY) as alice:
        submitted = await alice.submit(SLOW_TEMPLATE, {"seconds": seconds(served.comfyui, 60.0)})
        await assert_eventually(lambda: running(alice, submitted.job_id), what="the job running")
        cancel = await cli(served.url, "jobs", "cancel", submitted.job_id, "--reason", "changed my mind")
        assert cancel.returncode == 0, cancel.stderr
        assert cancel.stdout.startswith(f"job {submitted.job_id} "), cancel.stdout
        with pytest.raises(JobFailed) as ended:
            await asyncio.wait_for(alice.wait(submitted.job_id), timeout=30)
    assert ended.value.job.status is JobStatus.cancelled


async def running(client: AsyncGatewayClient, job_id: str) -> bool:
    return (await client.get_job(job_id)).status is JobStatus.running
