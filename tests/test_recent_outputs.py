"""The outputs across jobs (`GET /outputs`'s query), against SQLite and PostgreSQL: each dialect spreads the
jobs' outputs arrays with its own function."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from sqlalchemy.engine import Engine
from sqlmodel import Session

from app.jobstore import record_job
from app.models import JobState, JobStatus, OutputRef, RecordJobInput
from app.recent_outputs import OutputFilter, RecentOutput, list_recent_outputs

START = datetime(2026, 3, 1, tzinfo=timezone.utc)


def file(job_id: str, number: int) -> OutputRef:
    return OutputRef(filename=f"{job_id}_{number}.png", storage_key=f"{job_id}/0/{job_id}_{number}.png", size=number,
                     sha256="ab", content_type="image/png", node_id="9")


def record(session: Session, job_id: str, owner: str, ended_minute: int | None, files: int,
           template_id: str | None = "solid_color", batch_id: str | None = None) -> None:
    completed = None if ended_minute is None else START + timedelta(minutes=ended_minute)
    status = JobStatus.running if completed is None else JobStatus.succeeded
    job = JobState(job_id=job_id, status=status, template_id=template_id, created_at=START, completed_at=completed,
                   outputs=[file(job_id, number) for number in range(files)], owner=owner, batch_id=batch_id)
    record_job(session, RecordJobInput(job=job, backend="comfyui-1", inputs={}, events=[]))


def names(outputs: list[RecentOutput]) -> list[str]:
    return [item.output.filename for item in outputs]


def test_outputs_are_listed_newest_first_in_pages_with_their_jobs(engine: Engine) -> None:
    with Session(engine) as session:
        record(session, "a1", "alice", ended_minute=1, files=2)
        record(session, "a2", "alice", ended_minute=3, files=3, template_id=None, batch_id="b1")
        record(session, "a3", "alice", ended_minute=3, files=1, template_id="icon_512")  # same instant: by job id
        record(session, "a4", "alice", ended_minute=5, files=0)  # ended with nothing: no entry
        record(session, "a5", "alice", ended_minute=None, files=2)  # not ended: its files are not final yet
        record(session, "b1", "bob", ended_minute=2, files=1)

        everything, count = list_recent_outputs(session, OutputFilter(owner="alice"))
        assert names(everything) == ["a2_0.png", "a2_1.png", "a2_2.png", "a3_0.png", "a1_0.png", "a1_1.png"]
        assert count == 6
        first = everything[0]
        assert (first.job_id, first.template_id, first.completed_at) == ("a2", None, START + timedelta(minutes=3))
        assert first.output == file("a2", 0)

        pages = [list_recent_outputs(session, OutputFilter(owner="alice", limit=4, offset=offset))
                 for offset in (0, 4, 8)]
        assert [names(page) for page, _ in pages] == [names(everything[:4]), names(everything[4:]), []]
        assert {total for _, total in pages} == {6}

        admins, count = list_recent_outputs(session, OutputFilter())
        assert count == 7 and names(admins)[4] == "b1_0.png"
        assert list_recent_outputs(session, OutputFilter(owner="carol")) == ([], 0)


def test_filters_select_by_template_batch_and_when_the_job_ended(engine: Engine) -> None:
    with Session(engine) as session:
        record(session, "a1", "alice", ended_minute=1, files=2)
        record(session, "a2", "alice", ended_minute=3, files=1, batch_id="b1")
        record(session, "a3", "alice", ended_minute=5, files=1, template_id="icon_512")

        def selected(**filters: object) -> tuple[list[str], int]:
            found, count = list_recent_outputs(session, OutputFilter(owner="alice", **filters))  # type: ignore[arg-type]
            return names(found), count

        assert selected(template_id="solid_color") == (["a2_0.png", "a1_0.png", "a1_1.png"], 3)
        assert selected(batch_id="b1") == (["a2_0.png"], 1)
        minute = timedelta(minutes=1)
        assert selected(completed_after=START + 3 * minute) == (["a3_0.png"], 1)  # after: not at
        assert selected(completed_before=START + 3 * minute) == (["a1_0.png", "a1_1.png"], 2)
        assert selected(completed_after=START, completed_before=START + 4 * minute, limit=1, offset=1) == (
            ["a1_0.png"], 3)
