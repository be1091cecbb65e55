"""Rate limits, the unfinished-jobs cap, CORS, security headers, output paths that try to leave their job's
folder, malformed job ids and faults that must not show a stack trace: on the API alone (a migrated SQLite
database, no worker, and a Temporal any use of which fails the request)."""

from __future__ import annotations

import asyncio
import socket
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import httpx
import pytest
from fastapi import FastAPI, Request
from sqlmodel import Session

from api.deps import get_principal, get_storage
from app.auth import Principal, Role
from app.db import make_engine
from app.jobstore import count_unfinished_jobs
from app.settings import Settings
from app.storage.base import validate_key
from app.tables import JobRow
from tests.harness import api_alone, api_alone_settings, asgi_client, error_of, free_port, migrate_database

WINDOW_MS = 60_000


def limit_headers(response: httpx.Response) -> tuple[str, str, int]:
    headers = response.headers
    return headers["X-RateLimit-Limit"], headers["X-RateLimit-Remaining"], int(headers["X-RateLimit-Reset"])


# --- rate limits ---------------------------------------------------------------------------------------


async def test_each_address_gets_rate_limit_max_requests_per_window_with_headers(tmp_path: Path) -> None:
    settings = api_alone_settings(tmp_path, rate_limit_max=3, rate_limit_window_ms=WINDOW_MS)
    async with api_alone(settings) as app, asgi_client(app) as api, asgi_client(app, "10.0.0.2") as neighbour:
        answers = [await api.get("/jobs") for _ in range(3)]
        assert [response.status_code for response in answers] == [200, 200, 200]
        assert [limit_headers(response)[:2] for response in answers] == [("3", "2"), ("3", "1"), ("3", "0")]
        assert all(0 < limit_headers(response)[2] <= 60 for response in answers)
        assert "Retry-After" not in answers[0].headers

        refused = await api.get("/workflows")
        assert refused.status_code == 429
        error = error_of(refused)
        assert error["code"] == "RATE_LIMITED" and error["details"] == {"limitedBy": "address"}
        assert limit_headers(refused)[:2] == ("3", "0") and 0 < int(refused.headers["Retry-After"]) <= 60

        # Probes are never counted nor refused; another address has its own count.
        health = await api.get("/health")
        assert health.status_code != 429 and "X-RateLimit-Limit" not in health.headers
        assert (await neighbour.get("/jobs")).status_code == 200


async def test_a_window_frees_its_requests_as_they_age(tmp_path: Path) -> None:
    # 3 s: two requests in a row must fall in one window even on a loaded machine (1 s did not, once, at load 18).
    settings = api_alone_settings(tmp_path, rate_limit_max=1, rate_limit_window_ms=3000)
    async with api_alone(settings) as app, asgi_client(app) as api:
        assert (await api.get("/jobs")).status_code == 200
        refused = await api.get("/jobs")
        assert refused.status_code == 429 and 1 <= int(refused.headers["Retry-After"]) <= 3
        await asyncio.sleep(3.1)
        assert (await api.get("/jobs")).status_code == 200


async def test_each_principal_is_limited_whatever_its_address(tmp_path: Path) -> None:
    async def principal_named_by_header(request: Request) -> Principal:
        return Principal(request.headers["x-test-principal"], Role.user)

    def configure(app: FastAPI) -> None:
        app.dependency_overrides[get_principal] = principal_named_by_header

    settings = api_alone_settings(tmp_path, rate_limit_max=2, rate_limit_window_ms=WINDOW_MS)
    async with api_alone(settings, configure) as app:
        alice = {"X-Test-Principal": "alice"}
        async with asgi_client(app, "10.0.0.1") as first, asgi_client(app, "10.0.0.2") as second:
            assert (await first.get("/jobs", headers=alice)).status_code == 200
            last = await second.get("/jobs", headers=alice)
            assert last.status_code == 200 and limit_headers(last)[1] == "0"  # the tighter count: alice's
            refused = await (asgi_client(app, "10.0.0.3")).get("/jobs", headers=alice)
            assert refused.status_code == 429 and error_of(refused)["details"] == {"limitedBy": "principal"}
            assert int(refused.headers["Retry-After"]) > 0
            assert (await second.get("/jobs", headers={"X-Test-Principal": "bob"})).status_code == 200


async def test_forwarded_addresses_count_only_from_a_trusted_proxy(tmp_path: Path) -> None:
    spoofed = [{"X-Forwarded-For": f"203.0.113.{n}"} for n in range(3)]
    untrusting = api_alone_settings(tmp_path / "a", rate_limit_max=1, rate_limit_window_ms=WINDOW_MS)
    async with api_alone(untrusting) as app, asgi_client(app) as api:
        answers = [(await api.get("/jobs", headers=headers)).status_code for headers in spoofed]
        assert answers == [200, 429, 429]  # a client cannot escape its count by naming other addresses

    trusting = api_alone_settings(tmp_path / "b", rate_limit_max=1, rate_limit_window_ms=WINDOW_MS,
                            trusted_proxies="127.0.0.1,10.1.0.0/16")
    async with api_alone(trusting) as app, asgi_client(app) as proxy:
        answers = [(await proxy.get("/jobs", headers=headers)).status_code for headers in spoofed]
        assert answers == [200, 200, 200]  # three clients behind the proxy
        # What the client itself wrote in front of the proxies' entries does not count: the proxy saw .9.
        chain = {"X-Forwarded-For": "198.51.100.1, 203.0.113.9, 10.1.2.3"}
        assert [(await proxy.get("/jobs", headers=chain)).status_code for _ in range(2)] == [200, 429]
        assert (await proxy.get("/jobs", headers={"X-Forwarded-For": "203.0.113.9"})).status_code == 429


def _redis_listens() -> bool:
    with socket.socket() as probe:
        probe.settimeout(0.5)
        return probe.connect_ex(("127.0.0.1", 6379)) == 0


@pytest.mark.skipif(not _redis_listens(), reason="no Redis on 127.0.0.1:6379")
async def test_api_processes_sharing_redis_share_their_counts(tmp_path: Path) -> None:
    address = f"192.0.2.{uuid.uuid4().int % 250}-{uuid.uuid4().hex}"  # a key no earlier run has used
    shared = {"rate_limit_max": 2, "rate_limit_window_ms": WINDOW_MS,
              "rate_limit_storage_uri": "redis://127.0.0.1:6379/0"}
    async with (api_alone(api_alone_settings(tmp_path / "a", **shared)) as one,
                api_alone(api_alone_settings(tmp_path / "b", **shared)) as other):
        async with asgi_client(one, address) as first, asgi_client(other, address) as second:
            assert (await first.get("/jobs")).status_code == 200
            assert (await second.get("/jobs")).status_code == 200
            assert (await first.get("/jobs")).status_code == 429


async def test_an_unreachable_rate_limit_store_lets_requests_through(tmp_path: Path) -> None:
    settings = api_alone_settings(tmp_path, rate_limit_max=1, rate_limit_window_ms=WINDOW_MS,
                            rate_limit_storage_uri=f"redis://127.0.0.1:{free_port()}/0")
    async with api_alone(settings) as app, asgi_client(app) as api:
        assert [(await api.get("/jobs")).status_code for _ in range(3)] == [200, 200, 200]


# --- unfinished jobs per principal ---------------------------------------------------------------------


def _add_jobs(settings: Settings, owner: str | None, *statuses: str) -> None:
    engine = make_engine(settings.resolved_database_url)
    now = datetime.now(timezone.utc)
    with Session(engine) as session:
        for status in statuses:
            session.add(JobRow(job_id=str(uuid.uuid4()), status=status, backend="default", owner=owner,
                               created_at=now, updated_at=now))
        session.commit()
    engine.dispose()


async def test_a_principal_with_max_active_jobs_unfinished_cannot_submit_more(tmp_path: Path) -> None:
    settings = api_alone_settings(tmp_path, max_active_jobs_per_principal=2)
    migrate_database(settings)
    _add_jobs(settings, "anonymous", "queued", "running", "succeeded", "failed")
    _add_jobs(settings, "someone-else", "queued", "running")
    _add_jobs(settings, None, "queued")  # from before jobs had owners
    engine = make_engine(settings.resolved_database_url)
    with Session(engine) as session:
        counts = [count_unfinished_jobs(session, owner) for owner in ("anonymous", "someone-else", "nobody")]
    engine.dispose()
    assert counts == [2, 2, 0]
    async with api_alone(settings) as app, asgi_client(app) as api:
        refused = await api.post("/jobs", json={"workflowId": "solid_color"})  # refused before Temporal is used
        assert refused.status_code == 429
        error = error_of(refused)
        assert error["code"] == "TOO_MANY_ACTIVE_JOBS" and error["details"] == {"active": 2, "limit": 2}


# --- CORS ----------------------------------------------------------------------------------------------


def _preflight(origin: str) -> dict[str, str]:
    return {"Origin": origin, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type, x-api-key, authorization, idempotency-key"}


async def test_cors_lets_listed_origins_call_and_read_the_rate_limit_headers(tmp_path: Path) -> None:
    settings = api_alone_settings(tmp_path, cors_origins="https://ui.example", rate_limit_max=5,
                            rate_limit_window_ms=WINDOW_MS)
    async with api_alone(settings) as app, asgi_client(app) as api:
        allowed = await api.options("/jobs", headers=_preflight("https://ui.example"))
        assert allowed.status_code == 200
        assert allowed.headers["Access-Control-Allow-Origin"] == "https://ui.example"
        assert {"POST", "GET", "PUT", "DELETE"} <= set(allowed.headers["Access-Control-Allow-Methods"].split(", "))
        allowed_headers = allowed.headers["Access-Control-Allow-Headers"].lower()
        assert all(name in allowed_headers for name in ("x-api-key", "authorization", "idempotency-key"))
        assert "Access-Control-Allow-Credentials" not in allowed.headers

        refused = await api.options("/jobs", headers=_preflight("https://evil.example"))
        assert refused.status_code == 400 and "Access-Control-Allow-Origin" not in refused.headers

        simple = await api.get("/jobs", headers={"Origin": "https://ui.example"})
        assert simple.status_code == 200 and simple.headers["Access-Control-Allow-Origin"] == "https://ui.example"
        exposed = simple.headers["Access-Control-Expose-Headers"].lower()
        assert all(name in exposed for name in ("retry-after", "x-ratelimit-limit", "x-ratelimit-remaining",
                                                "x-ratelimit-reset"))
        other = await api.get("/jobs", headers={"Origin": "https://evil.example"})
        assert other.status_code == 200 and "Access-Control-Allow-Origin" not in other.headers


async def test_cors_any_origin_never_sends_credentials_and_is_off_by_default(tmp_path: Path) -> None:
    async with api_alone(api_alone_settings(tmp_path / "a", cors_origins="*")) as app, asgi_client(app) as api:
        preflight = await api.options("/jobs", headers=_preflight("https://anyone.example"))
        assert preflight.headers["Access-Control-Allow-Origin"] == "*"
        assert "Access-Control-Allow-Credentials" not in preflight.headers
        simple = await api.get("/jobs", headers={"Origin": "https://anyone.example"})
        assert simple.headers["Access-Control-Allow-Origin"] == "*"
    async with api_alone(api_alone_settings(tmp_path / "b")) as app, asgi_client(app) as api:
        simple = await api.get("/jobs", headers={"Origin": "https://anyone.example"})
        assert "Access-Control-Allow-Origin" not in simple.headers


# --- security headers and faults -----------------------------------------------------------------------

SECURITY_HEADERS = {"X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer"}


def assert_security_headers(response: httpx.Response, policy: str = "default-src 'none'") -> None:
    assert {name: response.headers.get(name) for name in SECURITY_HEADERS} == SECURITY_HEADERS, response.url
    assert response.headers["Content-Security-Policy"].startswith(policy), response.url
    assert "frame-ancestors 'none'" in response.headers["Content-Security-Policy"]


async def test_every_answer_has_security_headers_and_a_fault_shows_no_stack_trace(tmp_path: Path) -> None:
    def broken_storage() -> None:
        raise RuntimeError("storage credentials s3cr3t at /srv/gateway/app/storage.py")

    def configure(app: FastAPI) -> None:
        app.dependency_overrides[get_storage] = broken_storage

    async with api_alone(api_alone_settings(tmp_path), configure) as app, asgi_client(app) as api:
        fault = await api.get("/jobs")
        assert fault.status_code == 500
        assert error_of(fault) == {"code": "INTERNAL_ERROR", "message": "internal error; see the gateway's log",
                                   "details": {}}
        assert not any(text in fault.text for text in ("Traceback", "s3cr3t", "storage.py", "RuntimeError"))
        assert_security_headers(fault)
        for answer in [await api.get("/workflows"), await api.get("/nowhere"), await api.delete("/jobs"),
                       await api.post("/jobs", content=b"{"), fault]:
            assert_security_headers(answer)
            assert answer.headers["Cache-Control"] == "no-store"
            assert "Strict-Transport-Security" not in answer.headers
        for page in ("/docs", "/redoc"):
            docs = await api.get(page)
            assert docs.status_code == 200 and "/static-offline-docs/" in docs.text
            assert_security_headers(docs, "default-src 'self'; script-src 'self' 'unsafe-inline'")
        asset = await api.get("/static-offline-docs/redoc.standalone.js")
        assert asset.status_code == 200 and "Cache-Control" not in asset.headers
        async with asgi_client(app, base_url="https://gateway") as over_tls:
            assert "max-age=" in (await over_tls.get("/workflows")).headers["Strict-Transport-Security"]


# --- output paths and job ids --------------------------------------------------------------------------

JOB_ID = "0b6f9c1e-3d1a-4f5e-9a7b-2c8d4e6f1a2b"
OTHER_JOB_ID = "5a0e3b2c-1f4d-4c6b-8e9a-7d2f1b3c4e5a"
OUTPUT = b"\x89PNG the job's own output"
SECRETS = {"other job's output": b"OTHER JOB OUTPUT", "file beside the store": b"OUTSIDE THE STORE",
           "file at the store's root": b"STORE ROOT FILE"}


def _finished_job_with_output(settings: Settings) -> None:
    root = settings.resolved_storage_path
    (root / JOB_ID).mkdir(parents=True)
    (root / JOB_ID / "out.png").write_bytes(OUTPUT)
    (root / OTHER_JOB_ID).mkdir()
    (root / OTHER_JOB_ID / "secret.png").write_bytes(SECRETS["other job's output"])
    (root.parent / "secret.txt").write_bytes(SECRETS["file beside the store"])
    (root / "secret.txt").write_bytes(SECRETS["file at the store's root"])
    output = {"filename": "out.png", "storageKey": f"{JOB_ID}/out.png", "size": len(OUTPUT), "sha256": "0" * 64,
              "contentType": "image/png", "nodeId": "9"}
    engine = make_engine(settings.resolved_database_url)
    now = datetime.now(timezone.utc)
    with Session(engine) as session:
        session.add(JobRow(job_id=JOB_ID, status="succeeded", backend="default", outputs=[output],
                           created_at=now, completed_at=now, updated_at=now))
        session.commit()
    engine.dispose()


async def raw_get(app: FastAPI, raw_path: str) -> tuple[int, bytes]:
    """A GET of `raw_path` exactly as written (httpx would resolve dot segments first), with the path decoded
    as uvicorn decodes it."""
    path, _, query = raw_path.partition("?")
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
             "path": unquote(path), "raw_path": path.encode(), "query_string": query.encode(), "root_path": "",
             "headers": [(b"host", b"gateway")], "client": ("127.0.0.1", 40000), "server": ("gateway", 80)}
    answer: dict[str, Any] = {"body": b""}
    requested, answered = False, asyncio.Event()

    async def receive() -> dict[str, Any]:
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await answered.wait()  # a streaming answer listens for the client's disconnect meanwhile
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            answer["status"] = message["status"]
        elif message["type"] == "http.response.body":
            answer["body"] += message.get("body", b"")
            if not message.get("more_body", False):
                answered.set()

    await app(scope, receive, send)
    return answer["status"], answer["body"]


TRAVERSALS = [
    "../secret.txt", "../../secret.txt", f"../{OTHER_JOB_ID}/secret.png", "..%2Fsecret.txt", "..%2F..%2Fsecret.txt",
    f"..%2F{OTHER_JOB_ID}%2Fsecret.png", "%2e%2e%2fsecret.txt", "%2E%2E/%2E%2E/secret.txt", "..%252Fsecret.txt",
    "..\\secret.txt", "..%5Csecret.txt", "..%5C..%5Csecret.txt", "/etc/passwd", "%2Fetc%2Fpasswd",
    "%2F" + "%2F".join(["srv", "secret.txt"]), "out.png%00", "out.png%00.txt", "%00", "..", ".", "%2e%2e", "%2e",
    "%E2%80%A4%E2%80%A4%2Fsecret.txt", "%EF%BC%8E%EF%BC%8E%EF%BC%8Fsecret.txt", "%C0%AE%C0%AE%2Fsecret.txt",
    "out.png%2F..%2F..%2Fsecret.txt", "OUT.PNG", "out.png%20", "out.png/", "./out.png", "%2E%2Fout.png",
]


@pytest.mark.parametrize("form", ["", "?format=base64"])
async def test_an_output_path_only_ever_names_a_file_of_the_jobs_own_outputs(tmp_path: Path, form: str) -> None:
    settings = api_alone_settings(tmp_path)
    migrate_database(settings)
    _finished_job_with_output(settings)
    async with api_alone(settings) as app:
        status, body = await raw_get(app, f"/outputs/{JOB_ID}/out.png{form}")
        assert status == 200 and (OUTPUT in body or b'"data"' in body)
        for name in TRAVERSALS:
            for path in (f"/outputs/{JOB_ID}/{name}{form}", f"/outputs/{JOB_ID}/{name}/out.png{form}",
                         f"/outputs/{name}/{JOB_ID}/out.png{form}", f"/outputs/{JOB_ID}%2F{name}{form}"):
                status, body = await raw_get(app, path)
                assert status in (400, 404), (path, status, body[:200])
                assert not any(secret in body for secret in SECRETS.values()) and OUTPUT not in body, path
                assert httpx.Response(status, content=body).json()["error"]["code"] in (
                    "OUTPUT_NOT_FOUND", "JOB_NOT_FOUND", "NOT_FOUND", "VALIDATION_ERROR"), path


@pytest.mark.parametrize(
    "key", ["../x", "a/../b", "/etc/passwd", "a//b", "a/./b", "..\\x", "a\\b", "a\x00.png", "", "."],
)
def test_storage_keys_cannot_leave_the_store(key: str) -> None:
    with pytest.raises(ValueError):
        validate_key(key)


MALFORMED_JOB_IDS = [
    "not-a-uuid", JOB_ID.upper(), "{" + JOB_ID + "}", "urn:uuid:" + JOB_ID, JOB_ID.replace("-", ""),
    JOB_ID + "%00", "%2e%2e", JOB_ID[:-1], "x" * 5000, "%E2%80%A8" + JOB_ID,
]


async def test_a_malformed_job_id_is_an_unknown_job(tmp_path: Path) -> None:
    """Temporal is never asked about it (the stand-in would fail the request with a 500)."""
    settings = api_alone_settings(tmp_path)
    migrate_database(settings)
    _finished_job_with_output(settings)
    async with api_alone(settings) as app:
        for job_id in MALFORMED_JOB_IDS:
            for route in ("/jobs/{}", "/jobs/{}/logs", "/outputs/{}", "/outputs/{}/out.png"):
                status, body = await raw_get(app, route.format(job_id))
                assert status == 404, (route, job_id, body[:200])
                assert httpx.Response(status, content=body).json()["error"]["code"] == "JOB_NOT_FOUND"
        status, _ = await raw_get(app, f"/jobs/{JOB_ID}")
        assert status == 200
