"""The Docker image, rehearsed without Docker (this machine has no daemon, and no registry to pull the base
image from): the package built from only what the Dockerfile's build stage copies from the context (after
.dockerignore), installed into a fresh virtual environment, and its `migrate`, `api`, `worker` and
`health --worker` run as the image runs them (the runtime stage's ENV, working directory and entrypoint, found
on its PATH; nothing of the checkout's) through one bundled template job to its output, downloaded through the
API. What it cannot show: the base image's own system (python:3.11-slim, the unprivileged user) and the compose
cluster."""

from __future__ import annotations

import json
import os
import posixpath
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path

import httpx
from PIL import Image
from temporalio.client import Client

from app.migrations import script_directory
from tests.harness import DONE, REPO_ROOT, ComfyUITarget, assert_eventually, free_port, wait_for_job


@dataclass
class Stage:
    name: str | None
    # (keyword, arguments) of each instruction after FROM, continuation lines joined.
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def arguments(self, keyword: str) -> list[str]:
        return [arguments for found, arguments in self.instructions if found == keyword]


def dockerfile_stages(text: str) -> list[Stage]:
    # Docker drops comment lines before it joins a line ending in a backslash with the next.
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    stages: list[Stage] = []
    for instruction in re.sub(r"\\\n", " ", "\n".join(lines)).splitlines():
        if not instruction.strip():
            continue
        keyword, arguments = instruction.strip().split(None, 1)
        if keyword.upper() == "FROM":
            named = re.fullmatch(r"\S+\s+AS\s+(\S+)", arguments, flags=re.IGNORECASE)
            stages.append(Stage(named.group(1) if named else None))
        else:
            stages[-1].instructions.append((keyword.upper(), arguments.strip()))
    return stages


def dockerignore_rules(text: str) -> list[tuple[bool, re.Pattern[str]]]:
    """(re-included, pattern) per line: `*` within a path segment, `**` across segments, `!` re-includes."""
    rules = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = posixpath.normpath(line.removeprefix("!").lstrip("/"))
        translated = re.sub(r"\*\*/|\*\*|\*|\?|[^*?]+", lambda part: {
            "**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(part[0]) or re.escape(part[0]), pattern)
        rules.append((negated, re.compile(translated)))
    return rules


def excluded_from_context(relative: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """As Docker decides it: the last rule matching the path, or a folder it is in, wins."""
    parts = relative.split("/")
    ancestry = ["/".join(parts[:end]) for end in range(1, len(parts) + 1)]
    excluded = False
    for negated, pattern in rules:
        if any(pattern.fullmatch(path) for path in ancestry):
            excluded = not negated
    return excluded


def copy_from_context(stage: Stage, context: Path, workdir: Path) -> None:
    """The stage's COPY instructions from the build context (not `--from` another stage) into `workdir`."""
    rules = dockerignore_rules((context / ".dockerignore").read_text())
    for arguments in stage.arguments("COPY"):
        *sources, destination = shlex.split(arguments)
        if any(source.startswith("--") for source in sources):
            continue
        assert not destination.startswith("/"), f"COPY {arguments}: the rehearsal copies into WORKDIR only"
        for source in sources:
            assert not excluded_from_context(source, rules), f"COPY {source}: .dockerignore leaves it out of the context"
            origin = context / source
            if origin.is_file():
                into_folder = destination.endswith("/") or len(sources) > 1
                target = workdir / destination / origin.name if into_folder else workdir / destination
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(origin, target)
                continue
            # A folder's contents, as far as the context holds them, go into the destination.
            for path in sorted(origin.rglob("*")):
                relative = path.relative_to(context).as_posix()
                if path.is_file() and not excluded_from_context(relative, rules):
                    target = workdir / destination / path.relative_to(origin)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(path, target)


def image_environment(stage: Stage, base: dict[str, str], image_paths: dict[str, Path]) -> dict[str, str]:
    """The stage's ENV on top of `base` (the base image's), `$NAME` expanded from what came before, and the
    image's paths (`image_paths`) as this host's."""
    environment = dict(base)
    for arguments in stage.arguments("ENV"):
        before = dict(environment)
        for pair in shlex.split(arguments):
            name, value = pair.split("=", 1)
            value = re.sub(r"\$(?:\{(\w+)\}|(\w+))", lambda ref: before.get(ref[1] or ref[2], ""), value)
            environment[name] = ":".join(on_this_host(entry, image_paths) for entry in value.split(":"))
    return environment


def on_this_host(path: str, image_paths: dict[str, Path]) -> str:
    for image_path, host_path in image_paths.items():
        if path == image_path or path.startswith(f"{image_path}/"):
            return str(host_path) + path.removeprefix(image_path)
    return path


def see_installed_dependencies(site_packages: Path) -> None:
    """The venv sees this environment's installed distributions, the image's dependencies among them, as with
    `--system-site-packages`, but not their folders' own .pth files: one is this checkout's editable install,
    whose finder would answer for any package the image lacks."""
    folders = [entry for entry in sys.path if Path(entry).name in ("site-packages", "dist-packages")]
    (site_packages / "installed-dependencies.pth").write_text("".join(f"{folder}\n" for folder in folders))


def listening_addresses(port: int) -> set[str]:
    """The IPv4 addresses this host's sockets listen on at `port` (/proc/net/tcp: state 0A is LISTEN)."""
    rows = [line.split() for line in Path("/proc/net/tcp").read_text().splitlines()[1:]]
    return {socket.inet_ntoa(bytes.fromhex(local.split(":")[0])[::-1])
            for _, local, _, state, *_ in rows if int(local.split(":")[1], 16) == port and state == "0A"}


@contextmanager
def running(command: list[str], *, cwd: Path, env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with open(log, "ab") as output:  # the child keeps its own handle
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=output, stderr=subprocess.STDOUT)
    try:
        yield process
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def run(command: list[str], *, cwd: Path, env: dict[str, str] | None = None) -> str:
    ran = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0, f"{shlex.join(command)} exited {ran.returncode}:\n{ran.stdout}\n{ran.stderr}"
    return ran.stdout


async def test_the_image_built_from_its_copies_runs_a_template_job(
    temporal_client: Client, comfyui: ComfyUITarget, task_queue: str, tmp_path: Path
) -> None:
    *earlier, runtime = dockerfile_stages((REPO_ROOT / "Dockerfile").read_text())
    [venv_copy] = [arguments for arguments in runtime.arguments("COPY") if arguments.startswith("--from=")]
    build_name, venv_in_image, copied_to = re.fullmatch(r"--from=(\S+) (\S+) (\S+)", venv_copy).groups()
    assert copied_to == venv_in_image, "the venv's scripts name its own path: it must keep it"
    [build] = [stage for stage in earlier if stage.name == build_name]

    # The build stage: its copies of the context, then its venv and `pip install` of WORKDIR's package.
    [build_workdir] = build.arguments("WORKDIR")
    [install] = [" ".join(line.split()) for line in build.arguments("RUN")]
    made = re.fullmatch(rf"python -m venv {re.escape(venv_in_image)} && {re.escape(venv_in_image)}/bin/pip install"
                        r"(?: --\S+)* (\S+)", install)
    assert made, f"the rehearsal knows the build as `python -m venv V && V/bin/pip install ... PATH`: {install}"
    source = tmp_path / "build" / build_workdir.lstrip("/")
    copy_from_context(build, REPO_ROOT, source)
    # Built offline by this environment's setuptools (the test extras' pin meets [build-system] requires),
    # and installed without dependencies: nothing downloaded, and this interpreter's own install untouched.
    run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
         "--check-build-dependencies", "--disable-pip-version-check", "--wheel-dir", str(tmp_path / "wheels"),
         made.group(1)], cwd=source)
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp_path)
    site_packages = venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    see_installed_dependencies(site_packages)
    [wheel] = (tmp_path / "wheels").glob("*.whl")
    run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
         "--disable-pip-version-check", str(wheel)], cwd=tmp_path)

    # The runtime stage: its ENV over the base image's PATH (this host's standing in), in its WORKDIR, the
    # home of its user; the entrypoint as its PATH finds it.
    [workdir] = runtime.arguments("WORKDIR")
    data = tmp_path / "data"
    data.mkdir()
    environment = image_environment(runtime, {"PATH": os.environ["PATH"]}, {venv_in_image: venv, workdir: data})
    assert environment["DATA_DIR"] == str(data), "DATA_DIR is the image's WORKDIR"
    port = free_port()
    environment.update(HOME=str(data), PORT=str(port), COMFYUI_URL=comfyui.url, TEMPORAL_TASK_QUEUE=task_queue,
                       TEMPORAL_ADDRESS=temporal_client.service_client.config.target_host)
    [entrypoint] = runtime.arguments("ENTRYPOINT")
    program, *arguments = json.loads(entrypoint)
    found = shutil.which(program, path=environment["PATH"])
    assert found == str(venv / "bin" / program), found
    gateway = [found, *arguments]

    # Every package the image copied is imported from the venv, by the interpreter the entrypoint names.
    interpreter = Path(found).read_text().splitlines()[0].removeprefix("#!")
    packages = [destination for *_, destination in map(shlex.split, build.arguments("COPY"))
                if (source / destination / "__init__.py").exists()]
    probe = ("import importlib, importlib.metadata, json, sys; print(json.dumps({'prefix': sys.prefix, "
             "'dist': str(importlib.metadata.distribution('comfyui-gateway').locate_file('')), "
             f"'files': {{name: importlib.import_module(name).__file__ for name in {packages!r}}}}}))")
    imported = json.loads(run([interpreter, "-c", probe], cwd=data, env=environment))
    assert imported["prefix"] == str(venv) and imported["dist"] == str(site_packages), imported
    assert packages and all(Path(file).is_relative_to(site_packages) for file in imported["files"].values()), imported

    migrated = run([*gateway, "migrate"], cwd=data, env=environment)
    assert f"sqlite:///{data / 'gateway.db'}" in migrated
    assert f"after     {script_directory().get_current_head()}" in migrated, migrated

    logs = tmp_path / "logs"
    logs.mkdir()
    with running([*gateway, "worker"], cwd=data, env=environment, log=logs / "worker.log"), \
            running([*gateway, "api"], cwd=data, env=environment, log=logs / "api.log") as api_process:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as api:
            async def healthy() -> bool:
                assert api_process.poll() is None, (logs / "api.log").read_text()
                try:
                    return (await api.get("/health")).status_code == 200
                except httpx.TransportError:
                    return False

            await assert_eventually(healthy, timeout=60, interval=0.2, what=f"the API healthy (logs: {logs})")
            assert listening_addresses(port) == {environment["HOST"]}

            submitted = await api.post("/jobs", json={"workflowId": "solid_color",
                                                      "inputs": {"width": 8, "height": 6, "color": 0xFF8000}})
            assert submitted.status_code == 202, submitted.text
            job = await wait_for_job(api, submitted.json()["jobId"], until=DONE, timeout=60)
            assert job["status"] == "succeeded", job
            [output] = job["outputs"]
            downloaded = await api.get(output["url"])
            assert downloaded.status_code == 200 and downloaded.headers["content-type"] == "image/png"
            image = Image.open(BytesIO(downloaded.content)).convert("RGB")
            assert image.size == (8, 6) and image.getpixel((0, 0)) == (255, 128, 0)
            stored = [path.read_bytes() for path in (data / "outputs").rglob("*") if path.is_file()]
            assert downloaded.content in stored  # in DATA_DIR's outputs

            # The worker's own health check (the compose file's), from the image as the container runs it.
            health = json.loads(run([*gateway, "health", "--worker"], cwd=data, env=environment))
            assert health["worker"] == {"taskQueue": task_queue, "reachable": True}, health
