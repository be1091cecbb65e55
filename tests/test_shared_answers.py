"""Answers shared between concurrent reads (api.shared_answers) and the rows describe vouched for
(api.job_reader.CurrentRows): a read that must see a job as it is now never gets an answer, or a vouch, that a
call begun before it made."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime, timezone

from api import job_reader
from api.job_reader import CurrentRows
from api.shared_answers import SharedAnswers
from app.models import JobState, JobStatus
from tests.harness import assert_eventually


class _Calls:
    """Calls that each answer their own number once let go."""

    def __init__(self) -> None:
        self.made = 0
        self.go: list[asyncio.Event] = []

    def call(self) -> asyncio.Future[int]:
        self.made += 1
        number, go = self.made, asyncio.Event()
        self.go.append(go)

        async def answer() -> int:
            await go.wait()
            return number

        return asyncio.ensure_future(answer())


async def test_callers_share_the_call_under_way_and_its_answer_for_a_while() -> None:
    answers, calls = SharedAnswers[int](reuse_seconds=60), _Calls()
    first = asyncio.create_task(answers.get("job", calls.call))
    second = asyncio.create_task(answers.get("job", calls.call))
    await asyncio.sleep(0.01)
    calls.go[0].set()
    assert (await first, await second, calls.made) == (1, 1, 1)
    assert await answers.get("job", calls.call) == 1 and calls.made == 1


async def test_a_fresh_call_joins_no_call_under_way_and_an_earlier_answer_never_replaces_it() -> None:
    answers, calls = SharedAnswers[int](reuse_seconds=60), _Calls()
    under_way = asyncio.create_task(answers.get("job", calls.call))
    await asyncio.sleep(0.01)
    fresh = asyncio.create_task(answers.get("job", calls.call, fresh=True))
    await asyncio.sleep(0.01)
    after = asyncio.create_task(answers.get("job", calls.call))  # shares the fresh one
    await asyncio.sleep(0.01)
    assert calls.made == 2
    calls.go[1].set()
    assert (await fresh, await after) == (2, 2)
    calls.go[0].set()  # the call begun first ends last
    assert await under_way == 1
    assert await answers.get("job", calls.call) == 2 and calls.made == 2


def _running(job_id: str = "job") -> JobState:
    return JobState(job_id=job_id, template_id="t", status=JobStatus.running, backend="gpu1", attempts=1,
                    created_at=datetime.now(timezone.utc))


def test_a_describe_begun_before_a_forget_vouches_for_nothing_and_one_begun_after_does() -> None:
    rows, state = CurrentRows(), _running()
    begun_before = time.monotonic() - 1
    rows.forget(state.job_id)  # a read that must see the workflow now
    rows.found_current(state, begun_before)
    assert not rows.vouch(state)
    rows.found_current(state, time.monotonic())
    assert rows.vouch(state)
    # A describe that found the row not current, answering after an earlier one that found it current.
    found_otherwise = time.monotonic()
    rows.forget(state.job_id, found_otherwise)
    rows.found_current(state, found_otherwise - 1)
    assert not rows.vouch(state)


def test_a_row_found_not_current_stays_so_when_the_rows_are_pruned(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(job_reader, "_CURRENT_ROWS_CAPACITY", 3)
    rows = CurrentRows(vouch_seconds=0)  # every vouch runs out at once: all are pruned
    not_current = _running("not current")
    rows.forget(not_current.job_id, time.monotonic())
    for number in range(4):
        rows.found_current(_running(f"job {number}"), time.monotonic())
    assert not rows.may_answer(not_current)  # not taken for a row never described
    assert rows.may_answer(_running("never read"))


async def test_background_describes_take_turns_so_that_a_thousand_rows_due_together_do_not_flood_temporal() -> None:
    rows = CurrentRows()
    at_once, most = 0, 0
    done: list[str] = []

    async def describe(job_id: str) -> None:
        nonlocal at_once, most
        at_once += 1
        most = max(most, at_once)
        await asyncio.sleep(0.01)
        at_once -= 1
        done.append(job_id)

    for number in range(40):  # each one's first read: due at once
        rows.describe_if_due(f"job {number}", lambda job_id=f"job {number}": describe(job_id))
    rows.describe_if_due("job 0", lambda: describe("again"))  # one already under way for it: not another
    await assert_eventually(lambda: len(done) == 40, timeout=10, what="every describe")
    assert most == job_reader.BACKGROUND_DESCRIBES and sorted(done) == sorted(f"job {n}" for n in range(40))


async def test_a_row_whose_vouch_ran_out_answers_while_its_renewal_is_under_way_for_one_vouchs_time_more() -> None:
    rows, state = CurrentRows(vouch_seconds=0.3), _running()
    rows.found_current(state, time.monotonic())
    await asyncio.sleep(0.35)
    assert not rows.may_answer(state)  # ran out, nothing renewing it: the read describes
    answer = asyncio.Event()

    async def renewal() -> None:
        await answer.wait()

    rows.describe_if_due(state.job_id, renewal)
    assert rows.may_answer(state)
    assert not rows.may_answer(state.model_copy(update={"status": JobStatus.queued}))  # not what was vouched for
    await asyncio.sleep(0.3)
    assert not rows.may_answer(state)  # renewing for longer than a vouch's time: the read describes
    answer.set()


async def test_a_background_describe_waiting_its_turn_is_dropped_once_a_later_one_has_vouched() -> None:
    rows, state = CurrentRows(), _running()
    release, described = asyncio.Event(), []

    async def held() -> None:
        await release.wait()

    async def describe() -> None:
        described.append(state.job_id)

    for number in range(job_reader.BACKGROUND_DESCRIBES):  # every turn taken
        rows.describe_if_due(f"busy {number}", held)
    rows.describe_if_due(state.job_id, describe)  # waits for a turn
    await asyncio.sleep(0.05)
    rows.found_current(state, time.monotonic())  # a reader's own describe, begun since, vouched for the row
    release.set()
    await assert_eventually(lambda: not rows._renewals, timeout=5, what="every background describe done")
    assert described == [] and rows.vouch(state)
