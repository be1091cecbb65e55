"""Authentication, roles, ownership and the audit log, against the API alone (no Temporal: the jobs are rows
a finished job's workflow would have written, and a request that reaches Temporal fails the test)."""

from __future__ import annotations

import base64
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from pydantic import ValidationError
from sqlmodel import Session

from app.auth import Principal, Role, key_fingerprint, parse_api_key
from app.db import make_engine
from app.jobstore import record_job
from app.metrics import AUTH_FAILURES
from app.models import JobEventInput, JobState, JobStatus, OutputRef, RecordJobInput
from app.settings import Settings
from app.storage import build_storage
from tests.harness import api_alone, api_alone_settings, asgi_client, error_of
from tests.template_bodies import registration

ADMIN_KEY = "admin-key-7f3a9c2e51d04b8a"
ALICE_KEY = "alice-key-0c1d2e3f4a5b6c7d"
BOB_KEY = "bob-key-9e8d7c6b5a4f3e2d"
NAMELESS_KEY = "nameless-key-1234567890ab"
JWT_SECRET = "j" * 32
API_KEYS = f"{ADMIN_KEY}:admin:ops,{ALICE_KEY}:user:alice,{BOB_KEY}:user:bob,{NAMELESS_KEY}"

ADMIN = {"X-API-Key": ADMIN_KEY}
ALICE = {"X-API-Key": ALICE_KEY}
BOB = {"X-API-Key": BOB_KEY}


def settings_for(tmp_path: Path, **overrides: Any) -> Settings:
    return api_alone_settings(tmp_path, **overrides)


async def _client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with api_alone(settings) as app, asgi_client(app) as client:
        yield client


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    async for client in _client(settings_for(tmp_path, api_keys=API_KEYS, jwt_secret=JWT_SECRET)):
        yield client


def token(claims: dict[str, Any], secret: str = JWT_SECRET, algorithm: str = "HS256") -> dict[str, str]:
    return {"Authorization": f"Bearer {jwt.encode(claims, secret, algorithm=algorithm)}"}


def claims(**changes: Any) -> dict[str, Any]:
    return {"sub": "carol", "role": "user", "exp": int(time.time()) + 300, **changes}


def _b64(part: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(part).encode()).rstrip(b"=").decode()


def unsigned_token(payload: dict[str, Any]) -> dict[str, str]:
    """`alg: none`, made by hand: pyjwt refuses to make one that claims admin."""
    return {"Authorization": f"Bearer {_b64({'alg': 'none', 'typ': 'JWT'})}.{_b64(payload)}."}


# --- authentication ------------------------------------------------------------------------------------------

REFUSED_CREDENTIALS = {
    "none": {},
    "unknown key": {"X-API-Key": "not-a-key"},
    "a prefix of a key": {"X-API-Key": ADMIN_KEY[:-1]},
    "a key with its role": {"X-API-Key": f"{ADMIN_KEY}:admin"},
    "empty key": {"X-API-Key": ""},
    "expired token": token(claims(exp=int(time.time()) - 60, role="admin")),
    "wrong signature": token(claims(role="admin"), secret="k" * 32),
    "alg none": unsigned_token(claims(role="admin")),
    "HS512": token(claims(role="admin"), secret=JWT_SECRET + JWT_SECRET, algorithm="HS512"),
    "no exp": token({"sub": "carol", "role": "admin"}),
    "no sub": token({"role": "admin", "exp": int(time.time()) + 300}),
    "no role": token({"sub": "carol", "exp": int(time.time()) + 300}),
    "unknown role": token(claims(role="root")),
    "a role that is not a string": token(claims(role=["admin"])),
    "a sub longer than an owner can be": token(claims(sub="x" * 129)),
    "malformed token": {"Authorization": "Bearer not.a.jwt"},
    "not a bearer": {"Authorization": f"Basic {base64.b64encode(b'ops:x').decode()}"},
}


@pytest.mark.parametrize("headers", REFUSED_CREDENTIALS.values(), ids=REFUSED_CREDENTIALS.keys())
async def test_missing_or_invalid_credentials_are_one_and_the_same_401(api: httpx.AsyncClient, headers: dict) -> None:
    failures_before = sum(sample.value for sample in AUTH_FAILURES.collect()[0].samples
                          if sample.name.endswith("_total"))
    for method, path in (("GET", "/jobs"), ("POST", "/jobs"), ("GET", f"/jobs/{uuid.uuid4()}"),
                         ("GET", "/workflows"), ("DELETE", "/workflows/solid_color"), ("GET", "/audit"),
                         ("GET", "/capabilities"), ("GET", f"/outputs/{uuid.uuid4()}/a.png")):
        response = await api.request(method, path, headers=headers, json={"workflowId": "solid_color"}
                                      if method == "POST" else None)
        assert response.status_code == 401, (method, path, response.text)
        assert error_of(response) == {
            "code": "AUTH_FAILED", "details": {},
            "message": "authentication failed: send a valid X-API-Key or Authorization: Bearer token"}
        assert response.headers["WWW-Authenticate"] == 'ApiKey realm="comfyui-gateway", Bearer realm="comfyui-gateway"'
    failures_after = sum(sample.value for sample in AUTH_FAILURES.collect()[0].samples if sample.name.endswith("_total"))
    assert failures_after - failures_before == 8  # counted, for the operator


async def test_health_ready_and_the_docs_are_public(api: httpx.AsyncClient) -> None:
    for path in ("/health", "/ready", "/docs", "/redoc", "/openapi.json"):
        assert (await api.get(path)).status_code in (200, 503), path
    schemes = (await api.get("/openapi.json")).json()["components"]["securitySchemes"]
    assert {scheme["type"] for scheme in schemes.values()} == {"apiKey", "http"}  # Swagger UI's Authorize


@pytest.mark.parametrize("headers", [ALICE, token(claims(sub="alice")), {"X-API-Key": NAMELESS_KEY}])
async def test_a_valid_key_or_token_is_let_in(api: httpx.AsyncClient, headers: dict) -> None:
    assert (await api.get("/jobs", headers=headers)).status_code == 200
    assert (await api.get("/workflows", headers=headers)).status_code == 200  # templates are read by everyone


BAD_TOKENS = {name: REFUSED_CREDENTIALS[name]
              for name in ("expired token", "wrong signature", "alg none", "no role", "malformed token")}


@pytest.mark.parametrize("bad_token", BAD_TOKENS.values(), ids=BAD_TOKENS.keys())
async def test_a_bad_token_is_refused_even_beside_a_good_key(api: httpx.AsyncClient, bad_token: dict) -> None:
    response = await api.get("/jobs", headers={**ALICE, **bad_token})
    assert response.status_code == 401 and error_of(response)["code"] == "AUTH_FAILED", response.text
    assert error_of(response) == error_of(await api.get("/jobs", headers=bad_token))  # the same identical 401


async def test_a_key_and_a_token_must_both_verify_and_name_one_caller(api: httpx.AsyncClient) -> None:
    assert (await api.get("/jobs", headers={**ALICE, **token(claims(sub="alice"))})).status_code == 200
    for headers in ({"X-API-Key": "not-a-key", **token(claims(sub="alice"))},  # a bad key beside a good token
                    {**ALICE, **token(claims(sub="bob"))}, {**ALICE, **token(claims(sub="alice", role="admin"))}):
        response = await api.get("/jobs", headers=headers)
        assert response.status_code == 401 and error_of(response)["code"] == "AUTH_FAILED", (headers, response.text)


async def test_a_jwt_is_refused_when_only_keys_are_configured(tmp_path: Path) -> None:
    async for client in _client(settings_for(tmp_path, api_keys=API_KEYS)):
        response = await client.get("/jobs", headers=token(claims(role="admin")))
        assert response.status_code == 401 and response.headers["WWW-Authenticate"] == 'ApiKey realm="comfyui-gateway"'
        assert (await client.get("/jobs", headers=ALICE)).status_code == 200
        assert (await client.get("/jobs", headers={**ALICE, **token(claims(sub="alice"))})).status_code == 401


async def test_every_configured_key_is_compared_in_constant_time(
    api: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    compared: list[tuple[bytes, bytes]] = []
    constant_time = hmac.compare_digest

    def compare_digest(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return constant_time(a, b)

    monkeypatch.setattr("api.auth.hmac.compare_digest", compare_digest)
    assert (await api.get("/jobs", headers=ADMIN)).status_code == 200  # the first key matches ...
    assert len(compared) == 4 and all(given == ADMIN_KEY.encode() for _, given in compared)  # ... all are compared


def test_api_keys_name_their_principal_never_by_the_key() -> None:
    assert parse_api_key("k1:admin:ops").principal == Principal("ops", Role.admin)
    assert parse_api_key("k2").principal == Principal(key_fingerprint("k2"), Role.user)  # the least role
    assert key_fingerprint("k2").startswith("key-") and len(key_fingerprint("k2")) == 12
    assert "k2" not in repr(parse_api_key("k2:user")) and "k2" not in repr(Settings(_env_file=None, api_keys="k2"))


@pytest.mark.parametrize("entry", ["secret-value:root", "secret-value:admin:a:b", "secret-value:admin:",
                                   "secret-value:user:" + "n" * 129,
                                   ":admin", "secret-value,secret-value"])
def test_a_bad_api_keys_entry_is_refused_without_showing_the_key(entry: str) -> None:
    with pytest.raises(ValidationError) as refused:
        Settings(_env_file=None, api_keys=entry)
    assert "API_KEYS" in str(refused.value) or "key" in str(refused.value)
    assert "secret-value" not in str(refused.value)


# --- production -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("settings", "message"), [
    ({}, "refuses to run open"),
    ({"jwt_secret": "s" * 31}, "JWT_SECRET shorter than 32 bytes"),
    ({"api_keys": "k1:admin", "jwt_secret": "short"}, "JWT_SECRET shorter than 32 bytes"),
])
def test_production_refuses_to_start_open_or_with_a_short_jwt_secret(settings: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message) as refused:
        Settings(_env_file=None, env="production", **settings)
    assert "short" not in str(refused.value).replace("shorter", "")  # the secret itself is not shown


@pytest.mark.parametrize("settings", [{"api_keys": "k1:admin"}, {"jwt_secret": "s" * 32}])
def test_production_starts_with_authentication(settings: dict) -> None:
    assert not Settings(_env_file=None, env="production", **settings).open_mode


async def test_open_mode_lets_everyone_in_as_admin_and_says_so_loudly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="api.auth"):
        async for client in _client(settings_for(tmp_path)):
            assert (await client.get("/audit")).status_code == 200
            assert (await client.get("/audit", headers={"X-API-Key": "anything"})).status_code == 200
    assert any("OPEN MODE" in record.message and record.levelno == logging.WARNING for record in caplog.records)


async def test_no_open_mode_warning_with_keys(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="api.auth"):
        async for _ in _client(settings_for(tmp_path / "keys", api_keys=API_KEYS)):
            pass
    assert not any("OPEN MODE" in record.message for record in caplog.records)


# --- roles and ownership ------------------------------------------------------------------------------------

def finished_job(settings: Settings, owner: str | None) -> str:
    """A succeeded job of `owner` with one output, as its workflow records it."""
    job_id = str(uuid.uuid4())
    key = f"{job_id}/0/out.png"
    build_storage(settings).put_bytes(key, b"png!", "image/png")
    output = OutputRef(filename="out.png", storage_key=key, size=4, sha256="00", content_type="image/png", node_id="2")
    now = datetime.now(timezone.utc)
    state = JobState(job_id=job_id, status=JobStatus.succeeded, template_id="solid_color", template_version=1,
                     created_at=now, completed_at=now, outputs=[output], owner=owner)
    engine = make_engine(settings.resolved_database_url)
    with Session(engine) as session:
        record_job(session, RecordJobInput(job=state, backend="comfyui-1", events=[
            JobEventInput(key="wf:1", at=now, kind="status", message="done")]))
    engine.dispose()
    return job_id


@pytest.fixture
async def owned(tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, dict[str, str]]]:
    settings = settings_for(tmp_path, api_keys=API_KEYS, jwt_secret=JWT_SECRET)
    async for client in _client(settings):
        yield client, {owner or "nobody": finished_job(settings, owner) for owner in ("alice", "bob", None)}


JOB_ROUTES = [("GET", "/jobs/{}"), ("GET", "/jobs/{}/logs"), ("POST", "/jobs/{}/cancel"), ("GET", "/outputs/{}"),
              ("GET", "/outputs/{}/out.png"), ("GET", "/outputs/{}/out.png?format=base64")]


@pytest.mark.parametrize(("method", "route"), JOB_ROUTES, ids=[f"{m} {r}" for m, r in JOB_ROUTES])
async def test_a_user_reaches_its_own_jobs_and_another_s_is_no_job_at_all(
    owned: tuple[httpx.AsyncClient, dict[str, str]], method: str, route: str
) -> None:
    api, jobs = owned
    own = await api.request(method, route.format(jobs["alice"]), headers=ALICE)
    assert own.status_code == (409 if method == "POST" else 200), own.text  # a finished job cannot be cancelled
    for other in (jobs["bob"], jobs["nobody"]):  # another's, and one from before auth (admins' only)
        response = await api.request(method, route.format(other), headers=ALICE)
        assert response.status_code == 404, response.text
        # Word for word the answer for an id that names no job (api.job_reader.job_not_found): nothing tells
        # that the job exists.
        assert error_of(response) == {"code": "JOB_NOT_FOUND", "message": f"no job with id {other}",
                                      "details": {"jobId": other}}
        by_admin = await api.request(method, route.format(other), headers=ADMIN)
        assert by_admin.status_code == own.status_code


async def test_a_user_lists_only_its_own_jobs_and_an_admin_every_job(
    owned: tuple[httpx.AsyncClient, dict[str, str]]
) -> None:
    api, jobs = owned
    mine = (await api.get("/jobs", headers=ALICE)).json()
    assert [(job["jobId"], job["owner"]) for job in mine["jobs"]] == [(jobs["alice"], "alice")] and mine["count"] == 1
    assert (await api.get("/jobs", headers=token(claims(sub="dave")))).json() == {"jobs": [], "count": 0}
    every = (await api.get("/jobs", headers=ADMIN)).json()
    assert every["count"] == 3 and {job["owner"] for job in every["jobs"]} == {"alice", "bob", None}


async def test_a_user_may_not_manage_templates_or_read_the_audit_log(api: httpx.AsyncClient) -> None:
    body = registration("users_template")
    for method, path, json_body in (("POST", "/workflows", body), ("PUT", "/workflows/solid_color", {"name": "x"}),
                                    ("DELETE", "/workflows/solid_color", None), ("GET", "/audit", None)):
        for headers in (ALICE, token(claims(sub="carol"))):
            response = await api.request(method, path, headers=headers, json=json_body)
            assert response.status_code == 403, (method, path, response.text)
            assert error_of(response) == {"code": "FORBIDDEN", "message": "this needs the admin role",
                                          "details": {"role": "user"}}
    assert (await api.get("/workflows/solid_color", headers=ALICE)).status_code == 200  # still there
    assert (await api.get("/audit", headers=ADMIN)).json() == {"entries": [], "count": 0}  # nothing was done


async def test_a_role_not_in_raw_workflow_roles_may_not_send_a_graph(tmp_path: Path) -> None:
    async for client in _client(settings_for(tmp_path, api_keys=API_KEYS, raw_workflow_roles="admin")):
        graph = {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}}}
        response = await client.post("/jobs", headers=ALICE, json={"workflowJson": graph})
        assert response.status_code == 403, response.text  # and Temporal was never asked (UnusableTemporal)
        error = error_of(response)
        assert error["code"] == "WORKFLOW_JSON_NOT_ALLOWED" and error["details"] == {"field": "workflowJson",
                                                                                       "role": "user"}
        assert error["message"].startswith("workflowJson:")


# --- the audit log ----------------------------------------------------------------------------------------------

async def test_template_changes_are_audited_and_the_log_is_filtered(api: httpx.AsyncClient) -> None:
    start = datetime.now(timezone.utc)
    assert (await api.post("/workflows", headers=ADMIN, json=registration("audited"))).status_code == 201
    assert (await api.put("/workflows/audited", headers=ADMIN, json={"name": "Audited"})).status_code == 200
    assert (await api.put("/workflows/audited", headers=ADMIN, json={})).status_code == 200  # changes nothing
    admin_token = token(claims(sub="root-by-token", role="admin"))
    assert (await api.delete("/workflows/audited", headers=admin_token)).status_code == 204
    assert (await api.delete("/workflows/audited", headers=ADMIN)).status_code == 404  # nothing done: not audited

    log = (await api.get("/audit", headers=ADMIN)).json()
    assert log["count"] == 3
    assert [(e["actor"], e["role"], e["action"], e["target"]) for e in log["entries"]] == [
        ("root-by-token", "admin", "template.delete", "audited"),
        ("ops", "admin", "template.update", "audited"),
        ("ops", "admin", "template.create", "audited"),
    ]
    assert log["entries"][1]["details"] == {"version": 2, "fields": ["name"]}
    assert all(start <= datetime.fromisoformat(e["at"]) <= datetime.now(timezone.utc) for e in log["entries"])

    async def actions(**params: Any) -> list[str]:
        response = await api.get("/audit", headers=ADMIN, params=params)
        assert response.status_code == 200, response.text
        return [entry["action"] for entry in response.json()["entries"]]

    assert await actions(actor="ops") == ["template.update", "template.create"]
    assert await actions(action="template.delete") == ["template.delete"]
    assert await actions(target="audited", limit=1, offset=1) == ["template.update"]
    assert await actions(target="solid_color") == []
    assert await actions(after=start.isoformat()) == ["template.delete", "template.update", "template.create"]
    assert await actions(before=start.isoformat()) == []
    assert await actions(before=(datetime.now(timezone.utc) + timedelta(seconds=1)).isoformat(), actor="root-by-token") \
        == ["template.delete"]
    refused = await api.get("/audit", headers=ADMIN, params={"limit": 0})
    assert refused.status_code == 400 and error_of(refused)["details"]["fields"][0]["field"] == "limit"
