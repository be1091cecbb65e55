"""WebhookDeliveryWorkflow with its real activities, against receivers on 127.0.0.1, on Temporal's time-skipping
server: hours of backoff pass in moments, while every attempt is a real HTTP post and a real database write."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import pytest
from aiohttp import web
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError
from standardwebhooks import Webhook
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from activities.delivery import WebhookDelivery, WebhookPoster
from app.db import make_engine, migrate, session_scope
from app.jobstore import get_job_snapshot, list_events, record_job
from app.models import JobState, JobStatus, OutputRef, RecordJobInput, WebhookDeliveryInput, WebhookStatus
from app.settings import Settings
from app.storage import build_storage
from app.webhooks.signing import WebhookSigner
from tests.conftest import start_time_skipping
from tests.harness import serve_locally
from workflows_temporal.webhook_delivery import WebhookDeliveryWorkflow, webhook_workflow_id

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


@pytest.fixture(scope="module")
async def skipping() -> AsyncIterator[WorkflowEnvironment]:
    env = await start_time_skipping()
    try:
        yield env
    finally:
        await env.shutdown()


@dataclass
class Receiver:
    """Answers each post with the next of `answers` (then the last one for ever), and keeps what it got."""

    answers: list[Callable[[], web.Response]]
    received: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    other_paths: list[str] = field(default_factory=list)

    def app(self) -> web.Application:
        async def hook(request: web.Request) -> web.Response:
            self.received.append((dict(request.headers), await request.read()))
            return self.answers[min(len(self.received), len(self.answers)) - 1]()

        async def elsewhere(request: web.Request) -> web.Response:
            self.other_paths.append(request.path)
            return web.Response(status=200)

        app = web.Application()
        app.router.add_post("/hook", hook)
        app.router.add_post("/elsewhere", elsewhere)
        return app


def status(code: int, **headers: str) -> Callable[[], web.Response]:
    return lambda: web.Response(status=code, headers=headers)


@dataclass
class Delivery:
    env: WorkflowEnvironment
    engine: Engine
    job: JobState
    task_queue: str

    took: timedelta = timedelta(0)

    async def run(self, callback_url: str, event: str = "job.succeeded") -> WebhookStatus:
        """Deliver; `took` is then how long it did in the server's (skipped) time."""
        handle = await self.env.client.start_workflow(
            WebhookDeliveryWorkflow.run, WebhookDeliveryInput(event=event, callback_url=callback_url, job=self.job),
            id=webhook_workflow_id(self.job.job_id, event), task_queue=self.task_queue,
        )
        outcome = await handle.result()
        events = (await handle.fetch_history()).events
        self.took = events[-1].event_time.ToDatetime() - events[0].event_time.ToDatetime()
        return outcome

    def row_webhook(self) -> WebhookStatus | None:
        with session_scope(self.engine) as session:
            snapshot = get_job_snapshot(session, self.job.job_id)
            assert snapshot is not None and snapshot.state.status is JobStatus.succeeded  # never changed
            return snapshot.webhook

    def logged_attempts(self) -> list[dict]:
        with session_scope(self.engine) as session:
            return [row.data for row in list_events(session, self.job.job_id) if row.kind == "webhook"]


@asynccontextmanager
async def delivering(
    skipping: WorkflowEnvironment, tmp_path: Path, allowed: str = "127.0.0.1"
) -> AsyncIterator[Delivery]:
    settings = Settings(
        _env_file=None, data_dir=tmp_path, webhook_secret=SECRET, webhook_allowed_domains=allowed,
        public_base_url="https://gateway.example",
    )
    engine = make_engine(settings.resolved_database_url)
    migrate(engine)
    now = datetime.now(timezone.utc)
    job = JobState(
        job_id=str(uuid.uuid4()), status=JobStatus.succeeded, template_id="solid_color", created_at=now,
        completed_at=now, metadata={"ratio": 2.0, "name": "Zoë"},
        outputs=[OutputRef(filename="a b.png", storage_key="x/0/a b.png", size=3, sha256="00", content_type="image/png",
                           node_id="9")],
    )
    with session_scope(engine) as session:
        record_job(session, RecordJobInput(job=job, backend="default"))
    task_queue = f"webhooks-{uuid.uuid4()}"
    async with httpx.AsyncClient(trust_env=False) as http:
        delivery = WebhookDelivery(
            WebhookPoster(http, WebhookSigner(SECRET), settings.webhook_allowed_domains), engine,
            build_storage(settings), settings,
        )
        async with Worker(
            skipping.client, task_queue=task_queue, workflows=[WebhookDeliveryWorkflow],
            activities=[delivery.build_webhook, delivery.deliver_webhook, delivery.webhook_given_up],
        ):
            yield Delivery(skipping, engine, job, task_queue)
    engine.dispose()


async def test_a_receiver_down_for_three_hours_gets_the_same_signed_bytes_when_it_recovers(
    skipping: WorkflowEnvironment, tmp_path: Path
) -> None:
    failures = 27  # 2 s doubling to the 10 min cap: 27 failed attempts span a little over three hours
    receiver = Receiver([*[status(500)] * failures, status(204)])
    async with serve_locally(receiver.app()) as url, delivering(skipping, tmp_path) as delivery:
        outcome = await delivery.run(f"{url}/hook")
    took = delivery.took
    assert outcome == WebhookStatus(delivered=True, attempts=failures + 1, last_status=204)
    assert timedelta(hours=3) < took < timedelta(hours=4), took
    bodies = {body for _, body in receiver.received}
    assert len(receiver.received) == failures + 1 and len(bodies) == 1  # built once, the same bytes every time
    [body] = bodies
    assert {headers["webhook-id"] for headers, _ in receiver.received} == {f"{delivery.job.job_id}:webhook:job.succeeded"}
    headers = receiver.received[-1][0]
    payload = Webhook(SECRET).verify(body, headers)
    assert payload["event"] == "job.succeeded" and payload["status"] == "succeeded"
    assert payload["metadata"] == {"ratio": 2, "name": "Zoë"} and b'"ratio":2,' in body
    assert payload["result"]["outputs"][0]["url"] == f"https://gateway.example/outputs/{delivery.job.job_id}/a%20b.png"
    assert headers["Content-Type"] == "application/json"
    assert delivery.row_webhook() == WebhookStatus(delivered=True, attempts=failures + 1, last_status=204)
    attempts = delivery.logged_attempts()
    assert [a["attempt"] for a in attempts] == list(range(1, failures + 2))
    assert [a["statusCode"] for a in attempts] == [500] * failures + [204]
    assert all(isinstance(a["latencyMs"], int) for a in attempts)
    assert SECRET not in str(attempts) and headers["X-Signature"] not in str(attempts)


async def test_a_receiver_that_never_answers_2xx_is_given_up_after_24_hours(
    skipping: WorkflowEnvironment, tmp_path: Path
) -> None:
    receiver = Receiver([status(503)])
    async with serve_locally(receiver.app()) as url, delivering(skipping, tmp_path) as delivery:
        outcome = await delivery.run(f"{url}/hook", event="job.succeeded")
    took = delivery.took
    assert outcome.delivered is False
    assert timedelta(hours=23) < took <= timedelta(hours=24, minutes=1), took
    row = delivery.row_webhook()
    assert row is not None and not row.delivered and row.last_status == 503 and row.attempts == len(receiver.received)
    assert 140 < row.attempts < 160  # doubling from 2 s to 10 min, then every 10 min
    given_up = delivery.logged_attempts()[-1]
    assert given_up["delivered"] is False and "attempt" not in given_up


async def test_410_stops_at_once(skipping: WorkflowEnvironment, tmp_path: Path) -> None:
    receiver = Receiver([status(410)])
    async with serve_locally(receiver.app()) as url, delivering(skipping, tmp_path) as delivery:
        assert (await delivery.run(f"{url}/hook")).delivered is False
    assert len(receiver.received) == 1
    assert delivery.row_webhook() == WebhookStatus(delivered=False, attempts=1, last_status=410)


async def test_a_delivered_webhook_whose_attempt_cannot_be_written_is_not_posted_again(
    skipping: WorkflowEnvironment, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def database_down(*_: object) -> None:
        raise OperationalError("UPDATE jobs", {}, Exception("database is locked"))

    monkeypatch.setattr(WebhookDelivery, "_record", database_down)
    receiver = Receiver([status(200)])
    async with serve_locally(receiver.app()) as url, delivering(skipping, tmp_path) as delivery:
        assert (await delivery.run(f"{url}/hook")).delivered is True
    assert len(receiver.received) == 1  # a retry of the activity would have posted it again


async def test_retry_after_is_honoured(skipping: WorkflowEnvironment, tmp_path: Path) -> None:
    receiver = Receiver([status(429, **{"Retry-After": "300"}), status(200)])
    async with serve_locally(receiver.app()) as url, delivering(skipping, tmp_path) as delivery:
        assert (await delivery.run(f"{url}/hook")).delivered
    took = delivery.took
    assert timedelta(seconds=300) <= took < timedelta(seconds=400), took  # not the policy's 2 s


async def test_a_redirect_is_not_followed(skipping: WorkflowEnvironment, tmp_path: Path) -> None:
    receiver = Receiver([status(307, Location="/elsewhere"), status(200)])
    async with serve_locally(receiver.app()) as url, delivering(skipping, tmp_path) as delivery:
        assert await delivery.run(f"{url}/hook") == WebhookStatus(delivered=True, attempts=2, last_status=200)
        first = delivery.logged_attempts()[0]
    assert receiver.other_paths == [] and len(receiver.received) == 2
    assert first["statusCode"] == 307 and "redirects are not followed" in first["error"]


@pytest.mark.parametrize(("allowed", "delivered"), [("*", False), ("localhost", True)])
async def test_a_host_resolving_to_loopback_is_reached_only_when_listed_exactly(
    skipping: WorkflowEnvironment, tmp_path: Path, allowed: str, delivered: bool
) -> None:
    receiver = Receiver([status(200)])
    async with serve_locally(receiver.app()) as url, delivering(skipping, tmp_path, allowed=allowed) as delivery:
        outcome = await delivery.run(url.replace("127.0.0.1", "localhost") + "/hook")
    assert outcome.delivered is delivered and len(receiver.received) == int(delivered)
    if not delivered:
        [refused, given_up] = delivery.logged_attempts()
        assert "loopback" in refused["error"] and refused["statusCode"] is None and given_up["delivered"] is False


async def test_a_trailing_dot_host_is_reached_as_the_host_it_names(skipping: WorkflowEnvironment, tmp_path: Path) -> None:
    receiver = Receiver([status(200)])
    async with serve_locally(receiver.app()) as url, delivering(skipping, tmp_path) as delivery:
        outcome = await delivery.run(url.replace("127.0.0.1", "127.0.0.1.") + "/hook")
    assert outcome == WebhookStatus(delivered=True, attempts=1, last_status=200)
    assert receiver.received[0][0]["Host"].startswith("127.0.0.1:")


async def test_a_port_out_of_range_is_refused_once_and_logged(skipping: WorkflowEnvironment, tmp_path: Path) -> None:
    """A job submitted before the port check: its delivery stops at the first attempt, never retried for 24 h."""
    async with delivering(skipping, tmp_path) as delivery:
        outcome = await delivery.run("http://127.0.0.1:99999/hook")
    assert outcome.delivered is False and delivery.took < timedelta(minutes=1)
    [refused, given_up] = delivery.logged_attempts()
    assert refused["attempt"] == 1 and refused["statusCode"] is None and "port" in refused["error"]
    assert given_up["delivered"] is False
    assert delivery.row_webhook() == WebhookStatus(delivered=False, attempts=1, last_status=None)


async def test_an_unusable_url_no_check_foresaw_is_a_refused_attempt(monkeypatch: pytest.MonkeyPatch) -> None:
    async def overflowing(url: httpx.URL, allowed: list[str]) -> list[str]:
        raise OverflowError("getsockaddrarg: port must be 0-65535.")

    monkeypatch.setattr("activities.delivery.resolve_callback", overflowing)
    async with httpx.AsyncClient(trust_env=False) as http:
        attempt = await WebhookPoster(http, WebhookSigner(SECRET), ["*"]).post("https://example.com/h", "id", "{}")
    assert attempt.refused and attempt.status_code is None and "OverflowError" in (attempt.error or "")
