"""Slot leases (app.comfy.slots), against SQLite and PostgreSQL: processes sharing a backend never hold more
leases on it than its capacity, a release frees a slot at once, and a holder that stops renewing loses its
slots when they expire. A lease is its prompt's (a retry adopts it); a process renews only the leases it
holds, retries the releases that failed, and releases what a cancelled claim won."""

from __future__ import annotations

import asyncio
import threading
import time
from datetime import datetime, timedelta, timezone

from sqlalchemy import event, select, text, update
from sqlalchemy.engine import Engine

from app.comfy.backends import Backend
from app.comfy.health import BackendHealth
from app.comfy.slots import BackendSlots, Fleet, Lease, SlotLeases, live_leases
from app.db import as_utc
from app.tables import BackendSlotRow
from tests.harness import assert_eventually


def test_holders_together_never_hold_more_than_the_capacity(engine: Engine) -> None:
    first, second = SlotLeases(engine, "first"), SlotLeases(engine, "second")
    assert first.claim("gpu1", 2, "p1") is not None
    assert second.claim("gpu1", 2, "p2") is not None
    assert first.claim("gpu1", 2, "p3") is None and second.claim("gpu1", 2, "p4") is None
    assert second.claim("gpu2", 2, "p5") is not None  # another backend's slots are its own
    assert first.held_by_others() == {"gpu1": 1, "gpu2": 1} and second.held_by_others() == {"gpu1": 1}
    assert sorted(live_leases(engine)["gpu1"]) == ["p1", "p2"]


def test_a_release_frees_the_slot_and_only_the_holder_releases_it(engine: Engine) -> None:
    first, second = SlotLeases(engine, "first"), SlotLeases(engine, "second")
    lease = first.claim("gpu1", 1, "p1")
    assert lease is not None
    second.release(lease)  # not second's: nothing changes
    assert second.claim("gpu1", 1, "p2") is None
    first.release(lease)
    assert second.claim("gpu1", 1, "p2") == lease


def test_a_lease_not_renewed_expires_and_a_renewed_one_does_not(engine: Engine) -> None:
    crashed, renewing = SlotLeases(engine, "crashed", lease_seconds=0.5), SlotLeases(engine, "renewing", lease_seconds=0.5)
    other = SlotLeases(engine, "other")
    assert crashed.claim("gpu1", 1, "p1") is not None and renewing.claim("gpu2", 1, "p2") is not None
    for _ in range(3):
        time.sleep(0.3)
        renewing.renew()
    assert other.held_by_others() == {"gpu2": 1}
    assert other.claim("gpu1", 1, "p3") is not None  # the crashed holder's slot came back
    assert other.claim("gpu2", 1, "p4") is None


def test_a_prompts_slot_row_names_its_backend_until_released_or_taken_over(engine: Engine) -> None:
    crashed, other = SlotLeases(engine, "crashed", lease_seconds=0.2), SlotLeases(engine, "other")
    released = crashed.claim("gpu2", 2, "p2")
    assert crashed.claim("gpu1", 1, "p1") is not None and released is not None
    crashed.release(released)
    time.sleep(0.3)
    # Expired, not yet taken over: the row still says where the prompt may be.
    assert crashed.backends_leased_to("p1") == {"gpu1"} and crashed.backends_leased_to("p2") == set()
    assert other.claim("gpu1", 1, "p3") is not None
    assert other.backends_leased_to("p1") == set() and other.backends_leased_to("p3") == {"gpu1"}


def test_claims_racing_for_the_last_slot_have_one_winner(engine: Engine) -> None:
    holders = [SlotLeases(engine, f"holder-{n}") for n in range(6)]
    won: list[object] = []
    start = threading.Barrier(len(holders))

    def claim(holder: SlotLeases) -> None:
        start.wait()
        if holder.claim("gpu1", 2, holder.holder) is not None:
            won.append(holder)

    threads = [threading.Thread(target=claim, args=(holder,)) for holder in holders]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(won) == 2


def test_a_claim_for_a_prompt_that_has_a_lease_adopts_it(engine: Engine) -> None:
    crashed, retry = SlotLeases(engine, "crashed"), SlotLeases(engine, "retry")
    lease = crashed.claim("gpu1", 1, "p1")
    assert lease is not None
    assert retry.claim("gpu1", 1, "p2") is None  # the slot is taken...
    assert retry.claim("gpu1", 1, "p1") == lease  # ...by the prompt that this retry runs
    crashed.release(lease)  # no longer the crashed holder's to release
    assert live_leases(engine) == {"gpu1": ["p1"]} and retry.held == {lease}


def test_only_the_leases_a_process_holds_are_renewed(engine: Engine) -> None:
    holder, other = SlotLeases(engine, "holder", lease_seconds=0.5), SlotLeases(engine, "other")
    running, left = holder.claim("gpu1", 2, "p1"), holder.claim("gpu1", 2, "p2")
    assert running is not None and left is not None
    holder.abandon(left)  # its prompt was left on ComfyUI for a retry that did not come
    assert holder.held_by_others() == {"gpu1": 1}  # its slot is not free for this process's placement either
    for _ in range(3):
        time.sleep(0.3)
        holder.renew()
    assert other.claim("gpu1", 2, "p3") == left
    assert other.claim("gpu1", 2, "p4") is None


async def test_a_release_that_fails_does_not_raise_is_renewed_no_more_and_is_retried(engine: Engine) -> None:
    fleet = fleet_of(SlotLeases(engine, "holder"), capacity=1)
    lease = await fleet.lease("gpu1", "p1")
    with engine.begin() as connection:  # the database loses the table for a moment
        connection.execute(text("ALTER TABLE backend_slots RENAME TO backend_slots_away"))
    await fleet.release(lease)
    assert fleet.leases.held == frozenset() and fleet.leases.unreleased == {lease}
    with engine.begin() as connection:
        connection.execute(text("ALTER TABLE backend_slots_away RENAME TO backend_slots"))
    assert live_leases(engine) == {"gpu1": ["p1"]}
    keeping = asyncio.create_task(fleet.keep_leases())
    try:
        await assert_eventually(lambda: live_leases(engine) == {} and not fleet.leases.unreleased)
    finally:
        keeping.cancel()


async def test_a_claim_cancelled_while_it_runs_releases_what_it_won(engine: Engine) -> None:
    fleet = fleet_of(SlotLeases(engine, "holder"), capacity=1)
    claiming = asyncio.create_task(fleet.lease("gpu1", "p1"))
    while not live_leases(engine):  # the claim has committed its row, and its thread has not returned yet
        await asyncio.sleep(0)
    claiming.cancel()
    await asyncio.gather(claiming, return_exceptions=True)
    assert claiming.cancelled()
    await assert_eventually(lambda: live_leases(engine) == {} and not fleet.leases.held)


def fleet_of(leases: SlotLeases, capacity: int) -> Fleet:
    fleet = Fleet(leases)
    backend = Backend("gpu1", "http://127.0.0.1:1", slots=capacity)
    fleet.add(BackendSlots(backend, capacity, BackendHealth(backend.id, backend.url), fleet), ["queue"])
    return fleet


async def test_a_cancel_that_lands_as_a_slot_frees_is_not_lost(engine: Engine) -> None:
    fleet = Fleet(SlotLeases(engine, "holder"))
    change = fleet.next_change()
    waiting = asyncio.create_task(fleet.wait(change))
    await asyncio.sleep(0)  # it waits for the change
    change.set()  # a slot frees up...
    waiting.cancel()  # ...as the prompt waiting for it is cancelled
    await asyncio.gather(waiting, return_exceptions=True)
    assert waiting.cancelled()


def test_a_thousand_held_leases_are_renewed_and_an_abandoned_one_among_them_is_not(engine: Engine) -> None:
    """A worker holding a fleet's prompts (1,000 and more) renews them all in statements that do not grow with
    the number of leases: one OR term per lease made SQLite refuse the statement at about 1,000."""
    backends, slots = 25, 42  # 1,050 leases, claimed by a crashed holder and adopted by this one's retries
    soon = datetime.now(timezone.utc) + timedelta(seconds=60)
    with engine.begin() as connection:
        connection.execute(BackendSlotRow.__table__.insert(), [
            {"backend": f"gpu{b}", "slot": s, "holder": "crashed", "prompt_id": f"p{b}-{s}", "expires_at": soon}
            for b in range(backends) for s in range(slots)])
    holder = SlotLeases(engine, "holder", lease_seconds=3600)
    for b in range(backends):
        for s in range(slots):
            assert holder.claim(f"gpu{b}", slots, f"p{b}-{s}") is not None
    left = Lease("gpu0", 0)
    holder.abandon(left)
    with engine.begin() as connection:
        connection.execute(update(BackendSlotRow).values(expires_at=soon))
    holder.renew()
    with engine.begin() as connection:
        rows = connection.execute(select(BackendSlotRow.backend, BackendSlotRow.slot, BackendSlotRow.expires_at)).all()
    renewed = {Lease(backend, slot) for backend, slot, expires in rows if as_utc(expires) > soon}
    assert len(holder.held) == backends * slots - 1 and renewed == holder.held and left not in renewed


def test_a_claim_tries_only_the_slots_free_when_it_read_them(engine: Engine) -> None:
    """Trying each held slot in turn (a write each) cost a claim on a full backend of 63 slots about 30 writes."""
    others = SlotLeases(engine, "others")
    for number in range(40):
        assert others.claim("gpu1", 41, f"p{number}") is not None
    statements: list[str] = []
    listen = lambda *args: statements.append(args[2])  # noqa: E731 - (conn, cursor, statement, ...)
    event.listen(engine, "before_cursor_execute", listen)
    try:
        assert SlotLeases(engine, "holder").claim("gpu1", 41, "last") == Lease("gpu1", 40)
        assert SlotLeases(engine, "holder").claim("gpu1", 41, "one too many") is None
    finally:
        event.remove(engine, "before_cursor_execute", listen)
    writes = [statement.split()[0].upper() for statement in statements
              if statement.split()[0].upper() in ("INSERT", "UPDATE", "DELETE")]
    assert writes == ["INSERT"]  # the free slot's, and none for the full backend
