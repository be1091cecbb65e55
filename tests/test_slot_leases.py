"""Slot leases (app.comfy.slots), against SQLite and PostgreSQL: processes sharing a backend never hold more
leases on it than its capacity, a release frees a slot at once, and a holder that stops renewing loses its
slots when they expire."""

from __future__ import annotations

import threading
import time

from sqlalchemy.engine import Engine

from app.comfy.slots import SlotLeases, live_leases


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
