"""The result cache: its key, which jobs it answers, and a hit end to end (a new job, succeeded at once, with
the source's stored outputs and no ComfyUI run)."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import REGISTRY
from sqlalchemy.engine import Engine
from sqlmodel import Session
from temporalio.client import Client, WorkflowExecutionStatus

from app.jobstore import record_job
from app.models import JobState, JobStatus, OutputRef, RecordJobInput
from app.result_cache import cache_key, find_cached_result
from app.storage.base import StorageError
from app.storage.local import LocalStorage
from app.submission import ImageIntake, prepare_job
from app.tables import TemplateRow
from app.templates.limits import Limits
from tests.harness import DONE, Gateway, comfy_history_for_job, wait_for_job
from tests.template_bodies import SCHEMA, TEMPLATE, registration

KEY = "ab" * 32
T0 = datetime(2026, 5, 1, 12, tzinfo=timezone.utc)


def lookups(result: str) -> float:
    return REGISTRY.get_sample_value("gateway_result_cache_lookups_total", {"result": result}) or 0.0


def test_the_key_is_the_job_as_it_runs_not_how_it_was_written() -> None:
    base: dict[str, Any] = {"template_id": "t", "template_version": 1, "workflow_json": None,
                            "inputs": {"width": 8, "seed": 7}}
    assert cache_key(**base) == cache_key(**{**base, "inputs": {"seed": 7, "width": 8}})
    assert cache_key(**base) == cache_key(**base, output_format="png")
    different = [{**base, "template_version": 2}, {**base, "inputs": {"width": 8, "seed": 8}},
                 {**base, "template_id": None, "workflow_json": {"1": {}}}]
    keys = {cache_key(**base), *(cache_key(**changed) for changed in different),
            cache_key(**base, output_format="webp"), cache_key(**base, output_format="webp", quality=80)}
    assert len(keys) == 6


async def test_only_a_job_its_request_determines_is_cacheable(tmp_path: Path) -> None:
    template = TemplateRow(template_id="seeded", version=1, name="n", workflow_json=TEMPLATE,
                           input_schema=SCHEMA, default_params={"filename_prefix": "x"})
    images = TemplateRow(template_id="invert", version=1, name="n",
                         workflow_json={"1": {"class_type": "LoadImage", "inputs": {"image": "{{image}}"}},
                                        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0]}}},
                         input_schema={"type": "object", "fields": {"image": {"type": "image"}}})
    async with httpx.AsyncClient() as http:
        async def note_use(keys: list[str]) -> None:
            pass  # which job uses a stored image matters to retention, not to the cache

        intake = ImageIntake(LocalStorage(tmp_path), note_use, http, max_bytes=10**6, max_pixels=2048 * 2048,
                             allow_private_urls=False)

        async def prepared(row: TemplateRow, inputs: dict[str, Any]) -> bool:
            job = await prepare_job(template=row, workflow_json=None, given=inputs, limits=Limits.of_settings(2048, 4),
                                    images=intake)
            return job.reproducible

        assert await prepared(template, {"color": 1, "seed": 7})
        assert not await prepared(template, {"color": 1})  # the gateway draws the seed
        assert not await prepared(template, {"color": 1, "seed": -1})
        assert not await prepared(images, {"image": "https://example.com/a.png"})  # what a URL serves may change


def source(job_id: str, completed: datetime, output: OutputRef, owner: str = "alice", **changes: Any) -> RecordJobInput:
    state = JobState(job_id=job_id, status=JobStatus.succeeded, created_at=completed, completed_at=completed,
                     outputs=[output], owner=owner, **changes)
    return RecordJobInput(job=state, backend="comfyui-1", cache_key=KEY)


def stored_output(storage: LocalStorage, job_id: str) -> OutputRef:
    key = f"{job_id}/0/a.png"
    storage.put_bytes(key, b"png", "image/png")
    return OutputRef(filename="a.png", storage_key=key, size=3, sha256="cd", content_type="image/png", node_id="2")


def test_a_hit_is_the_latest_job_that_ran_within_the_ttl_with_its_files_still_stored(
    engine: Engine, tmp_path: Path
) -> None:
    storage = LocalStorage(tmp_path)
    older, newer, hit = (str(uuid.uuid4()) for _ in range(3))
    with Session(engine) as session:
        record_job(session, source(older, T0, stored_output(storage, older)))
        record_job(session, source(newer, T0 + timedelta(minutes=1), stored_output(storage, newer)))
        # A hit has the key too, and is later, but it ran nothing: its result is as old as its source's.
        record_job(session, source(hit, T0 + timedelta(minutes=2), stored_output(storage, newer),
                                   cache_hit=True, cached_from=newer))
        failed = source(str(uuid.uuid4()), T0 + timedelta(minutes=3), stored_output(storage, "f"))
        failed.job.status = JobStatus.failed
        record_job(session, failed)

        found = find_cached_result(session, storage, KEY, "alice", T0 - timedelta(seconds=1))
        assert found is not None and found.source_job_id == newer
        assert [output.storage_key for output in found.outputs] == [f"{newer}/0/a.png"]
        # Past the TTL of the newer one: nothing.
        assert find_cached_result(session, storage, KEY, "alice", T0 + timedelta(minutes=1)) is None
        assert find_cached_result(session, storage, "ef" * 32, "alice", T0 - timedelta(seconds=1)) is None

        # A source whose file is gone is no hit; an older one whose files are all there is.
        (tmp_path / newer / "0" / "a.png").unlink()
        found = find_cached_result(session, storage, KEY, "alice", T0 - timedelta(seconds=1))
        assert found is not None and found.source_job_id == older


class UnreadableStorage(LocalStorage):
    """A store whose files the cache may look up but must not read (a GET per output on S3)."""

    def __init__(self, root: Path, answers: bool = True) -> None:
        super().__init__(root)
        self.answers = answers
        self.looked_up: list[str] = []

    def open(self, key: str):  # type: ignore[no-untyped-def]
        raise AssertionError(f"the cache read {key}")

    def exists(self, key: str) -> bool:
        if not self.answers:
            raise StorageError("the store does not answer")
        self.looked_up.append(key)
        return super().exists(key)


def test_the_cache_asks_whether_outputs_exist_without_reading_them(engine: Engine, tmp_path: Path) -> None:
    storage = UnreadableStorage(tmp_path)
    job_id = str(uuid.uuid4())
    with Session(engine) as session:
        record_job(session, source(job_id, T0, stored_output(storage, job_id)))
        since = T0 - timedelta(seconds=1)
        assert find_cached_result(session, storage, KEY, "alice", since).source_job_id == job_id
        assert storage.looked_up == [f"{job_id}/0/a.png"]
        storage.answers = False  # a store that does not answer now: no hit, and the job runs
        assert find_cached_result(session, storage, KEY, "alice", since) is None


def test_a_hit_is_only_ever_a_job_of_the_same_owner(engine: Engine, tmp_path: Path) -> None:
    """A hit shows its source's id (its log, its outputs' storage keys): another's job must stay unprobeable."""
    storage = LocalStorage(tmp_path)
    alices, bobs = str(uuid.uuid4()), str(uuid.uuid4())
    with Session(engine) as session:
        record_job(session, source(alices, T0, stored_output(storage, alices), owner="alice"))
        record_job(session, source(bobs, T0 - timedelta(minutes=1), stored_output(storage, bobs), owner="bob"))
        since = T0 - timedelta(hours=1)
        assert find_cached_result(session, storage, KEY, "alice", since).source_job_id == alices
        assert find_cached_result(session, storage, KEY, "bob", since).source_job_id == bobs  # not alice's newer one
        assert find_cached_result(session, storage, KEY, "carol", since) is None


def seeded(seed: int | None = None) -> dict[str, Any]:
    inputs = {"width": 8, "height": 8, "color": 255} | ({"seed": seed} if seed is not None else {})
    return {"workflowId": "seeded_solid", "inputs": inputs}


async def register_seeded_template(gateway: Gateway) -> None:
    response = await gateway.api.post("/workflows", json=registration("seeded_solid"))
    assert response.status_code == 201, response.text


@pytest.mark.settings(cache_enabled=True)
async def test_an_identical_job_with_an_explicit_seed_takes_the_stored_result_at_once(
    gateway: Gateway, temporal_client: Client
) -> None:
    await register_seeded_template(gateway)
    ran = await gateway.run(seeded(7))
    assert ran["status"] == "succeeded" and ran["cacheHit"] is False
    hits, misses = lookups("hit"), lookups("miss")

    answer = await gateway.api.post("/jobs", json=seeded(7))
    assert answer.status_code == 202, answer.text
    accepted = answer.json()
    assert accepted["status"] == "succeeded" and accepted["cacheHit"] is True and accepted["jobId"] != ran["jobId"]
    hit = (await gateway.api.get(f"/jobs/{accepted['jobId']}")).json()
    assert hit["status"] == "succeeded" and hit["cacheHit"] is True and hit["seed"] == 7
    assert [(o["storagePath"], o["sha256"], o["size"]) for o in hit["outputs"]] == \
        [(o["storagePath"], o["sha256"], o["size"]) for o in ran["outputs"]]
    assert await comfy_history_for_job(gateway.comfyui.url, hit["jobId"]) == []
    # A job of its own in Temporal too, which ended succeeded before the 202 was sent.
    described = await temporal_client.get_workflow_handle(hit["jobId"]).describe()
    assert described.status is WorkflowExecutionStatus.COMPLETED
    downloaded, original = [await gateway.api.get(job["outputs"][0]["url"]) for job in (hit, ran)]
    assert downloaded.status_code == 200 and downloaded.content == original.content
    events = (await gateway.api.get(f"/jobs/{hit['jobId']}/logs")).json()["events"]
    assert any(event["kind"] == "cache" and event["data"] == {"cachedFrom": ran["jobId"]} for event in events)
    assert (lookups("hit"), lookups("miss")) == (hits + 1, misses)

    # A seed the gateway draws never hits, and is never looked up.
    for _ in range(2):
        drawn = (await gateway.api.post("/jobs", json=seeded())).json()
        assert drawn["status"] == "queued" and drawn["cacheHit"] is False
        assert (await wait_for_job(gateway.api, drawn["jobId"], until=DONE))["cacheHit"] is False
    assert (lookups("hit"), lookups("miss")) == (hits + 1, misses)

    # The source's file deleted: a miss, and the job runs again.
    (gateway.settings.resolved_storage_path / ran["outputs"][0]["storagePath"]).unlink()
    rerun = (await gateway.api.post("/jobs", json=seeded(7))).json()
    assert rerun["cacheHit"] is False and rerun["status"] != "succeeded"
    assert (await wait_for_job(gateway.api, rerun["jobId"], until=DONE))["status"] == "succeeded"
    assert len(await comfy_history_for_job(gateway.comfyui.url, rerun["jobId"])) == 1
    assert (lookups("hit"), lookups("miss")) == (hits + 1, misses + 1)


async def test_with_the_cache_off_an_identical_job_runs_again(gateway: Gateway) -> None:
    await register_seeded_template(gateway)
    hits, misses = lookups("hit"), lookups("miss")
    first, second = [await gateway.run(seeded(7)) for _ in range(2)]
    assert first["status"] == second["status"] == "succeeded" and not first["cacheHit"] and not second["cacheHit"]
    assert len(await comfy_history_for_job(gateway.comfyui.url, second["jobId"])) == 1
    assert (lookups("hit"), lookups("miss")) == (hits, misses)
