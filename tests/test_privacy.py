"""Privacy mode and encryption (ENCRYPTION_KEYS): the payload codec, its key rotation, the redaction of free-text
inputs, the /codec endpoints of the Temporal Web UI, and the proof on the dev server's raw history."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import subprocess
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from httpx import ASGITransport
from pydantic import ValidationError
from sqlalchemy import text
from temporalio.api.common.v1 import Payload
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.converter import DefaultFailureConverterWithEncodedAttributes
from temporalio.worker import Replayer

from api.deps import get_principal
from app.auth import Principal, Role
from api.main import create_app
from app.codec import KEY_ID_METADATA, EncryptionCodec, PayloadDecryptionError, parse_encryption_keys
from app.db import make_engine
from app.devserver import temporal_cli, ui_codec_arguments
from app.models import GenerationInput
from app.redaction import REDACTED, Redactor, free_texts
from app.settings import Settings
from app.temporal_client import gateway_data_converter
from tests.harness import (
    HISTORIES, ComfyUITarget, Gateway, api_client, assert_eventually, committed_history, free_port, gateway_settings,
    migrate_database,
)
from worker.main import running_worker
from workflows_temporal.generation import GenerationWorkflow
from workflows_temporal.retention import RetentionWorkflow


def new_key(key_id: str, size: int = 32) -> str:
    return f"{key_id}:{base64.b64encode(os.urandom(size)).decode()}"


def codec_of(keys: str) -> EncryptionCodec:
    return EncryptionCodec(parse_encryption_keys(keys))


# --- the codec -------------------------------------------------------------------------------------------


async def test_codec_round_trip_hides_the_payload_and_names_its_key() -> None:
    codec = codec_of(new_key("k1") + "," + new_key("k0", 16))
    original = Payload(metadata={"encoding": b"json/plain"}, data=b'{"prompt": "a secret lighthouse"}')
    [sealed] = await codec.encode([original])
    assert sealed.metadata["encoding"] == b"binary/encrypted" and sealed.metadata[KEY_ID_METADATA] == b"k1"
    assert b"lighthouse" not in sealed.SerializeToString()
    [again] = await codec.encode([original])
    assert again.data[:12] != sealed.data[:12]  # a fresh nonce per payload
    assert await codec.decode([sealed, again]) == [original, original]


async def test_rotation_new_key_encrypts_old_key_still_decrypts() -> None:
    key_a, key_b = new_key("A"), new_key("B", 24)
    [under_a] = await codec_of(key_a).encode([Payload(metadata={"encoding": b"json/plain"}, data=b'"x"')])
    rotated = codec_of(f"{key_b},{key_a}")
    assert (await rotated.decode([under_a]))[0].data == b'"x"'
    [under_b] = await rotated.encode([Payload(data=b'"y"')])
    assert under_b.metadata[KEY_ID_METADATA] == b"B"
    with pytest.raises(PayloadDecryptionError, match="key id 'B'.*does not list"):
        await codec_of(key_a).decode([under_b])  # key B dropped before its payloads were gone


async def test_unencrypted_payloads_pass_through_and_altered_ones_fail() -> None:
    codec = codec_of(new_key("k1"))
    plain = Payload(metadata={"encoding": b"json/plain"}, data=b'"older job"')
    assert await codec.decode([plain]) == [plain]
    [sealed] = await codec.encode([plain])
    sealed.data = sealed.data[:-1] + bytes([sealed.data[-1] ^ 1])
    with pytest.raises(PayloadDecryptionError, match="does not open"):
        await codec.decode([sealed])
    other = codec_of(new_key("k1"))  # another key under the same id
    with pytest.raises(PayloadDecryptionError):
        await other.decode(await codec.encode([plain]))


# --- settings ---------------------------------------------------------------------------------------------


def test_privacy_mode_without_keys_refuses_to_start() -> None:
    with pytest.raises(ValidationError, match="PRIVACY_MODE=true needs ENCRYPTION_KEYS"):
        Settings(_env_file=None, privacy_mode=True)
    assert Settings(_env_file=None, privacy_mode=True, encryption_keys=new_key("k1")).privacy_mode


@pytest.mark.parametrize("keys, complaint", [
    ("k1", "not id:base64key"),
    ("k1:", "not id:base64key"),
    ("k1:not*base64", "not valid base64"),
    ("k1:" + base64.b64encode(b"short").decode(), "5 bytes"),
    (",", "lists no key"),
    ("same:" + base64.b64encode(bytes(16)).decode() + ",same:" + base64.b64encode(bytes(32)).decode(), "twice"),
])
def test_bad_encryption_keys_are_a_clear_error_that_never_quotes_the_key(keys: str, complaint: str) -> None:
    with pytest.raises(ValidationError, match="encryption_keys") as refused:
        Settings(_env_file=None, encryption_keys=keys)
    assert complaint in str(refused.value)
    secret = keys.partition(":")[2]
    assert not secret or secret not in str(refused.value)


def test_keys_are_secret_in_settings_and_turn_on_the_encrypting_converter() -> None:
    keys = new_key("k1")
    settings = Settings(_env_file=None, encryption_keys=keys)
    assert keys.partition(":")[2] not in repr(settings) + str(settings.encryption_key_ring)
    converter = gateway_data_converter(settings)
    assert isinstance(converter.payload_codec, EncryptionCodec)
    assert isinstance(converter.failure_converter, DefaultFailureConverterWithEncodedAttributes)  # failures' messages and traces encrypted too
    assert gateway_data_converter(Settings(_env_file=None)) is pydantic_data_converter
    # The dev server's Web UI decodes through the gateway when encryption is on.
    assert ui_codec_arguments(settings) == ["--ui-codec-endpoint", "http://127.0.0.1:3000/codec"]
    assert ui_codec_arguments(Settings(_env_file=None)) == []


# --- redaction --------------------------------------------------------------------------------------------


def test_redactor_finds_free_texts_as_written_escaped_and_shortened() -> None:
    prompt = 'a "quiet" harbour at dawn, oil on canvas, very detailed'
    texts = free_texts({"prompt": prompt, "width": 512, "tags": ["moonlit pier"]},
                       {"1": {"class_type": "TestFlaky", "inputs": {"key": "graph secret", "image": ["2", 0]}}})
    assert texts == sorted([prompt, "moonlit pier", "graph secret"])
    redactor = Redactor(texts)
    assert redactor.text(f"bad value: {prompt!r}") == f"bad value: '{REDACTED}'"
    assert redactor.text(json.dumps({"p": prompt})) == json.dumps({"p": REDACTED})
    assert redactor.text(f"x: {prompt[:30]}… (99 more characters)") == f"x: {REDACTED}… (99 more characters)"
    assert redactor.value({"m": ["moonlit pier!"], "n": 5}) == {"m": [f"{REDACTED}!"], "n": 5}
    assert not Redactor([]) and Redactor([]).text(prompt) == prompt
    assert Redactor(["ab"]).text("ab abc") == "ab abc"  # too short to look for
    # Redacted twice (the job's error, then the log event quoting it), it reads as once.
    twice = Redactor(["act", "moonlit pier"])
    once = twice.text("a moonlit pier, act two")
    assert once == f"a {REDACTED}, {REDACTED} two" and twice.text(once) == once


# --- the committed histories through the codec ------------------------------------------------------------


@pytest.mark.parametrize("path", HISTORIES, ids=[path.stem for path in HISTORIES])
async def test_histories_from_before_encryption_replay_through_the_codec(path: Path) -> None:
    converter = gateway_data_converter(Settings(_env_file=None, encryption_keys=new_key("k1")))
    replayer = Replayer(workflows=[GenerationWorkflow, RetentionWorkflow], data_converter=converter)
    result = await replayer.replay_workflow(committed_history(path))
    assert result.replay_failure is None


# --- the codec endpoints ----------------------------------------------------------------------------------


@asynccontextmanager
async def codec_api(settings: Settings, temporal: Client, principal: Principal | None = None) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings, temporal)
    if principal is not None:
        app.dependency_overrides[get_principal] = lambda: principal
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=ASGITransport(app=app), base_url="http://gateway") as client:
            yield client


def as_json(payload: Payload) -> dict[str, Any]:
    return {"metadata": {k: base64.b64encode(v).decode() for k, v in payload.metadata.items()},
            "data": base64.b64encode(payload.data).decode()}


async def test_codec_endpoints_round_trip_for_the_web_ui(temporal_client: Client, tmp_path: Path) -> None:
    settings = gateway_settings(temporal_client, "http://127.0.0.1:9", tmp_path, "unused", encryption_keys=new_key("k1"))
    migrate_database(settings)
    plain = Payload(metadata={"encoding": b"json/plain"}, data=b'{"prompt":"a secret"}')
    origin = "http://localhost:8233"
    async with codec_api(settings, temporal_client) as api:
        preflight = await api.options("/codec/decode", headers={
            "Origin": origin, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type,x-namespace,authorization"})
        assert preflight.status_code == 200, preflight.text
        assert preflight.headers["access-control-allow-origin"] == origin
        assert preflight.headers["access-control-allow-credentials"] == "true"
        encoded = await api.post("/codec/encode", json={"payloads": [as_json(plain)]}, headers={"X-Namespace": "default"})
        assert encoded.status_code == 200, encoded.text
        [sealed] = encoded.json()["payloads"]
        assert base64.b64decode(sealed["metadata"]["encoding"]) == b"binary/encrypted"
        decoded = await api.post("/codec/decode", json=encoded.json(), headers={"Origin": origin})
        assert decoded.status_code == 200 and decoded.headers["access-control-allow-origin"] == origin
        assert decoded.json() == {"payloads": [as_json(plain)]}
        # Another origin gets no CORS grant, and the rest of the API none from CODEC_CORS_ORIGINS.
        elsewhere = await api.post("/codec/decode", json=encoded.json(), headers={"Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in elsewhere.headers
        health = await api.get("/health", headers={"Origin": origin})
        assert "access-control-allow-origin" not in health.headers
        [foreign] = await codec_of(new_key("zz")).encode([plain])
        unknown = await api.post("/codec/decode", json={"payloads": [as_json(foreign)]})
        assert unknown.status_code == 400 and "key id 'zz'" in unknown.json()["error"]["details"]["fields"][0]["message"]
        garbage = await api.post("/codec/decode", json={"payloads": [{"data": "***"}]})
        assert garbage.status_code == 400
        # Each decode that showed payloads in the clear is in the audit log, with who and how many.
        audit = (await api.get("/audit", params={"action": "codec.decode"})).json()["entries"]
        assert [(entry["actor"], entry["target"], entry["details"]) for entry in audit] == [
            ("anonymous", "default", {"payloads": 1})] * 2
    async with codec_api(settings, temporal_client, Principal("alice", Role.user)) as api:
        for route in ("/codec/encode", "/codec/decode"):
            refused = await api.post(route, json={"payloads": [as_json(plain)]})
            assert refused.status_code == 403 and refused.json()["error"]["code"] == "FORBIDDEN"


# --- end to end: a job under privacy mode, its raw history, its rows, logs and log lines --------------------


@asynccontextmanager
async def encrypted_gateway(
    temporal_client: Client, comfyui: ComfyUITarget, data_dir: Path, **overrides: Any
) -> AsyncIterator[tuple[Gateway, Client]]:
    """Worker and API as the gateway runs them with ENCRYPTION_KEYS: every Temporal client with the codec."""
    settings = gateway_settings(temporal_client, comfyui.url, data_dir, f"test-{uuid.uuid4()}", **overrides)
    migrate_database(settings)
    client = Client(temporal_client.service_client, namespace=temporal_client.namespace,
                    data_converter=gateway_data_converter(settings))
    async with running_worker(client, settings), api_client(settings, client) as api:
        yield Gateway(api, settings, comfyui), client


def flaky_graph(marker: str, fail_times: int) -> dict[str, Any]:
    """TestFlaky quotes its `key` in the error it raises: ComfyUI echoing an input, as custom nodes do."""
    return {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
        "2": {"class_type": "TestFlaky", "inputs": {"image": ["1", 0], "fail_times": fail_times, "key": marker}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "gw"}},
    }


def rejected_graph(marker: str) -> dict[str, Any]:
    """A combo value ComfyUI refuses, quoting it: "Value not in list: mode: '<marker>' not in [...]"."""
    return {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
        "2": {"class_type": "TestFail", "inputs": {"image": ["1", 0], "mode": marker}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "gw"}},
    }


def raw_history(client: Client, job_id: str) -> dict[str, Any]:
    """The job's history as Temporal's own CLI shows it (`temporal workflow show -o json`)."""
    shown = subprocess.run(
        [temporal_cli(), "workflow", "show", "--workflow-id", job_id, "-o", "json",
         "--address", client.service_client.config.target_host, "--namespace", client.namespace],
        capture_output=True, text=True, timeout=30, check=True,
    )
    return json.loads(shown.stdout)


def history_texts(history: Any) -> list[str]:
    """Every string of the history, and what each base64 one decodes to (the payloads' data and metadata)."""
    found: list[str] = []

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            for item in value.values():
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)
        elif isinstance(value, str):
            found.append(value)
            try:
                found.append(base64.b64decode(value, validate=True).decode("utf-8", errors="replace"))
            except ValueError:
                pass

    walk(history)
    return found


def payload_key_ids(history: dict[str, Any]) -> set[str]:
    ids: set[str] = set()

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            metadata = value.get("metadata")
            if isinstance(metadata, dict) and KEY_ID_METADATA in metadata:
                ids.add(base64.b64decode(metadata[KEY_ID_METADATA]).decode())
            for item in value.values():
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)

    walk(history)
    return ids


def rows_text(settings: Settings, job_ids: list[str]) -> str:
    engine = make_engine(settings.resolved_database_url)
    with engine.connect() as connection:
        rows = [dict(row._mapping) for table in ("jobs", "job_events", "job_feed") for row in connection.execute(
            text(f"SELECT * FROM {table} WHERE job_id IN ({','.join(repr(job_id) for job_id in job_ids)})"))]
    engine.dispose()
    return json.dumps(rows, default=str)


async def test_privacy_mode_keeps_inputs_out_of_history_rows_logs_and_log_lines(
    temporal_client: Client, comfyui: ComfyUITarget, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)  # every log line the worker and the API write, at any level
    marker = f"marker-{uuid.uuid4().hex}"
    key_a = new_key("A")
    async with encrypted_gateway(
        temporal_client, comfyui, tmp_path, privacy_mode=True, encryption_keys=key_a
    ) as (gateway, client):
        # Fails once quoting the marker (a retry event), then succeeds; and one ComfyUI refuses, quoting it.
        retried = await gateway.run({"workflowJson": flaky_graph(marker, 1),
                                     "retry": {"maxAttempts": 2, "backoffSeconds": 0, "retryOn": ["COMFYUI_NODE_ERROR"]}})
        rejected = await gateway.run({"workflowJson": rejected_graph(marker)})
        assert retried["status"] == "succeeded", retried
        assert rejected["status"] == "failed" and rejected["error"]["code"] == "VALIDATION_ERROR", rejected
        assert REDACTED in json.dumps(rejected["error"])  # ComfyUI's words stay, the value goes
        answers = [json.dumps(retried), json.dumps(rejected)]
        for job in (retried, rejected):
            logs = await gateway.api.get(f"/jobs/{job['jobId']}/logs")
            assert logs.status_code == 200
            answers.append(logs.text)
        assert any(REDACTED in answer for answer in answers[2:])
        for answer in answers:
            assert marker not in answer
        assert marker not in rows_text(gateway.settings, [retried["jobId"], rejected["jobId"]])

        for job in (retried, rejected):
            history = raw_history(client, job["jobId"])
            assert not [found for found in history_texts(history) if marker in found], job["jobId"]
            assert payload_key_ids(history) == {"A"}
        failed_event = [event for event in raw_history(client, rejected["jobId"])["events"]
                        if "workflowExecutionFailedEventAttributes" in event]
        assert failed_event[0]["workflowExecutionFailedEventAttributes"]["failure"]["message"] == "Encoded failure"
    assert caplog.records and marker not in caplog.text  # every line the worker and the API logged, tracebacks too

    # Rotation: B first, A kept. Jobs sealed with A still read and replay; new payloads use B.
    async with encrypted_gateway(
        temporal_client, comfyui, tmp_path, privacy_mode=True, encryption_keys=f"{new_key('B')},{key_a}"
    ) as (gateway, client):
        again = await gateway.api.get(f"/jobs/{retried['jobId']}")
        assert again.status_code == 200 and again.json()["status"] == "succeeded"
        old = await client.get_workflow_handle(retried["jobId"]).fetch_history()
        replayer = Replayer(workflows=[GenerationWorkflow], data_converter=client.data_converter)
        assert (await replayer.replay_workflow(old)).replay_failure is None
        [started] = await client.data_converter.decode(
            old.events[0].workflow_execution_started_event_attributes.input.payloads, [GenerationInput])
        assert started.workflow_json is not None and started.workflow_json["2"]["inputs"]["key"] == marker
        fresh = await gateway.run({"workflowJson": flaky_graph(f"{marker}-b", 0)})
        assert fresh["status"] == "succeeded"
        assert payload_key_ids(raw_history(client, fresh["jobId"])) == {"B"}


async def test_without_encryption_the_raw_history_shows_the_inputs(gateway: Gateway, temporal_client: Client) -> None:
    """The control of the proof above: the same look at the history finds the marker when encryption is off."""
    marker = f"marker-{uuid.uuid4().hex}"
    job = await gateway.run({"workflowJson": flaky_graph(marker, 0)})
    assert job["status"] == "succeeded"
    assert [found for found in history_texts(raw_history(temporal_client, job["jobId"])) if marker in found]


async def test_temporal_cli_reads_an_encrypted_history_through_the_codec_endpoint(
    temporal_client: Client, comfyui: ComfyUITarget, tmp_path: Path
) -> None:
    """What an admin does (`--codec-endpoint <gateway>/codec`), with the real CLI against the API on a port."""
    marker = f"marker-{uuid.uuid4().hex}"
    async with encrypted_gateway(
        temporal_client, comfyui, tmp_path, privacy_mode=True, encryption_keys=new_key("A")
    ) as (gateway, client):
        job = await gateway.run({"workflowJson": flaky_graph(marker, 0)})
        port = free_port()
        server = uvicorn.Server(uvicorn.Config(
            create_app(gateway.settings, client), host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
        serving = asyncio.create_task(server.serve())
        try:
            await assert_eventually(lambda: server.started, what="the API serving")
            shown = await asyncio.to_thread(subprocess.run, [
                temporal_cli(), "workflow", "show", "--workflow-id", job["jobId"], "-o", "json",
                "--address", client.service_client.config.target_host, "--namespace", client.namespace,
                "--codec-endpoint", f"http://127.0.0.1:{port}/codec",
            ], capture_output=True, text=True, timeout=30, check=True)
        finally:
            server.should_exit = True
            await serving
        audit = (await gateway.api.get("/audit", params={"action": "codec.decode"})).json()["entries"]
    assert [found for found in history_texts(json.loads(shown.stdout)) if marker in found]
    assert audit and {entry["actor"] for entry in audit} == {"anonymous"}  # every decode audited
