"""How many prompts each ComfyUI backend has at once, across every worker process sharing the backend list.

Two parts enforce a backend's capacity (slots × (1 + COMFYUI_PREFETCH)):

- `SlotLeases`, the rule: a prompt is posted only under a lease on one of the backend's slots, a row of
  `backend_slots` claimed atomically (an insert, or an update of an expired row, that only one claimant can win:
  the same on SQLite and PostgreSQL). A lease is its prompt's: a retry or re-attach adopts the prompt's row, and
  a prompt left running on ComfyUI keeps it. The holding process renews the leases it holds every few seconds;
  a process that crashed stops renewing, and its leases expire after LEASE_SECONDS so that the slots come back.
- `BackendSlots`, the placement: the Temporal slot supplier of the backend's workers (one per queue it serves,
  sharing it). A worker polls a queue for a prompt only while the backend has a free slot (its own prompts and
  the leases no running prompt of this process holds), is healthy, and no other healthy backend of the process that serves that queue
  is less loaded. So jobs beyond the fleet's capacity wait durably as Temporal activity tasks, and a job is
  placed when a slot frees up, on the least loaded backend.

Temporal reserves a permit before each poll. Counting a waiting poll as a prompt would let an idle poll of one
queue keep the backend's other queues from polling for up to a minute, so the supplier counts a queue's waiting
polls against that queue only: a queue's own polls never overcommit, but polls of two queues may return together
for the last free slot. The prompt past capacity then waits for its lease inside its activity, and ComfyUI never
has more than its capacity. The backend's own queue is always let through (see BackendSlots.own_queue).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import uuid
from contextlib import suppress
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from sqlalchemy import delete, select, tuple_, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from temporalio.worker import (
    CustomSlotSupplier,
    SlotMarkUsedContext,
    SlotPermit,
    SlotReleaseContext,
    SlotReserveContext,
)

from app.comfy.backends import Backend
from app.comfy.health import BackendHealth
from app.db import as_utc
from app.tables import BackendSlotRow

log = logging.getLogger(__name__)

# A lease not renewed for this long is free again: its holder crashed or lost the database.
LEASE_SECONDS = 30.0
RENEW_EVERY_SECONDS = 5.0
# Leases renewed by one statement at most (two parameters each): under the 999 bound parameters of SQLite's
# older builds.
RENEW_CHUNK = 400
# How often other processes' leases are counted, and a prompt waiting for a lease tries again.
RECHECK_SECONDS = 0.5


def _now() -> datetime:
    return datetime.now(timezone.utc)


@dataclass(frozen=True)
class Lease:
    backend: str
    slot: int


class SlotLeases:
    """One process's leases on backend slots, in the database. Blocking calls: run them on a thread.

    A lease is the prompt's: a claim for a prompt that already has a row on the backend (a retry, a re-attach)
    adopts that row. The process renews only the leases it knows it holds (`held`), so a row it failed to
    release, or one it left to a prompt still running on ComfyUI (`abandon`), expires unless its prompt's next
    try adopts it. Releases that failed are retried by `retry_releases`."""

    def __init__(self, engine: Engine, holder: str | None = None, lease_seconds: float = LEASE_SECONDS) -> None:
        self.engine = engine
        self.holder = holder or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.lease_seconds = lease_seconds
        self._lock = threading.Lock()
        self._held: set[Lease] = set()
        self._unreleased: set[Lease] = set()

    @property
    def held(self) -> frozenset[Lease]:
        with self._lock:
            return frozenset(self._held)

    @property
    def unreleased(self) -> frozenset[Lease]:
        with self._lock:
            return frozenset(self._unreleased)

    def claim(self, backend: str, capacity: int, prompt_id: str) -> Lease | None:
        """The prompt's own lease on the backend if it has one (adopted: now held by this process), else a free
        slot, now held by this process; None when all `capacity` are held."""
        now = _now()
        expires = now + timedelta(seconds=self.lease_seconds)
        with self.engine.begin() as connection:
            rows = connection.execute(select(BackendSlotRow.slot, BackendSlotRow.prompt_id, BackendSlotRow.expires_at)
                                      .where(BackendSlotRow.backend == backend)).all()
        held = {slot for slot, _, _ in rows}
        # Only the slots free when read are tried (a write each): trying every slot in turn cost a claim on a
        # backend of 63 slots about 30 writes, and a thousand claims kept the worker busy for minutes.
        live = {slot for slot, _, expires in rows if as_utc(expires) >= now}
        for slot in sorted(slot for slot, held_for, _ in rows if held_for == prompt_id):
            with self.engine.begin() as connection:
                # The row is the prompt's only while it still names the prompt: a claimant that took it over
                # after it expired holds it for another prompt.
                if connection.execute(
                    update(BackendSlotRow)
                    .where(BackendSlotRow.backend == backend, BackendSlotRow.slot == slot,
                           BackendSlotRow.prompt_id == prompt_id)
                    .values(holder=self.holder, expires_at=expires)
                ).rowcount == 1:
                    return self._won(Lease(backend, slot))
        for slot in (slot for slot in range(capacity) if slot not in live):
            with self.engine.begin() as connection:
                if slot in held:
                    # Taken over only if it expired; of two claimants the second updates no row.
                    taken = connection.execute(
                        update(BackendSlotRow)
                        .where(BackendSlotRow.backend == backend, BackendSlotRow.slot == slot,
                               BackendSlotRow.expires_at < now)
                        .values(holder=self.holder, prompt_id=prompt_id, expires_at=expires)
                    ).rowcount == 1
                else:
                    try:
                        with connection.begin_nested():
                            connection.execute(BackendSlotRow.__table__.insert().values(
                                backend=backend, slot=slot, holder=self.holder, prompt_id=prompt_id,
                                expires_at=expires))
                        taken = True
                    except IntegrityError:  # another claimant inserted it first
                        taken = False
            if taken:
                return self._won(Lease(backend, slot))
        return None

    def _won(self, lease: Lease) -> Lease:
        with self._lock:
            self._held.add(lease)
            self._unreleased.discard(lease)
        return lease

    def release(self, lease: Lease) -> None:
        """Free the slot. No longer renewed from now on, even if the database is away: then the release is
        retried by `retry_releases`, and the lease expires meanwhile."""
        with self._lock:
            self._held.discard(lease)
            self._unreleased.add(lease)
        with self.engine.begin() as connection:
            connection.execute(delete(BackendSlotRow).where(
                BackendSlotRow.backend == lease.backend, BackendSlotRow.slot == lease.slot,
                BackendSlotRow.holder == self.holder))
        with self._lock:
            self._unreleased.discard(lease)

    def abandon(self, lease: Lease) -> None:
        """Stop renewing a lease whose prompt was left running on ComfyUI: its next try adopts the row, or it
        expires (and the slot comes back) if none does in time."""
        with self._lock:
            self._held.discard(lease)

    def retry_releases(self) -> None:
        for lease in self.unreleased:
            self.release(lease)

    def renew(self) -> None:
        """Renew the held leases, RENEW_CHUNK at most per statement: one statement with a term per lease was
        refused by SQLite at about 1,000 held leases (its expression tree too deep)."""
        held = sorted(self.held, key=lambda lease: (lease.backend, lease.slot))
        if not held:
            return
        expires = _now() + timedelta(seconds=self.lease_seconds)
        with self.engine.begin() as connection:
            for start in range(0, len(held), RENEW_CHUNK):
                chunk = held[start:start + RENEW_CHUNK]
                connection.execute(
                    update(BackendSlotRow)
                    .where(BackendSlotRow.holder == self.holder,
                           tuple_(BackendSlotRow.backend, BackendSlotRow.slot).in_(
                               [(lease.backend, lease.slot) for lease in chunk]))
                    .values(expires_at=expires))

    def backends_leased_to(self, prompt_id: str) -> set[str]:
        """The backends with a slot row that names the prompt, live or expired. A row goes only when its prompt
        lets the slot go, or when another prompt takes the slot over once it has expired; and it is claimed before
        the prompt is posted. So a row that names the prompt says the prompt was posted on that backend, or was
        about to be."""
        with self.engine.begin() as connection:
            return set(connection.scalars(
                select(BackendSlotRow.backend).where(BackendSlotRow.prompt_id == prompt_id)))

    def held_by_others(self) -> dict[str, int]:
        """backend → live leases on it that this process's running prompts do not hold: other processes', and
        this process's left to prompts still on ComfyUI (`abandon`) or not yet released."""
        held = self.held
        with self.engine.begin() as connection:
            rows = connection.execute(
                select(BackendSlotRow.backend, BackendSlotRow.slot, BackendSlotRow.holder)
                .where(BackendSlotRow.expires_at >= _now()))
            counts: dict[str, int] = {}
            for backend, slot, holder in rows:
                if holder != self.holder or Lease(backend, slot) not in held:
                    counts[backend] = counts.get(backend, 0) + 1
            return counts


def live_leases(engine: Engine) -> dict[str, list[str | None]]:
    """backend → the prompt ids under its live leases (every process's)."""
    with engine.begin() as connection:
        rows = connection.execute(select(BackendSlotRow.backend, BackendSlotRow.prompt_id)
                                  .where(BackendSlotRow.expires_at >= _now()))
        found: dict[str, list[str | None]] = {}
        for backend, prompt_id in rows:
            found.setdefault(backend, []).append(prompt_id)
        return found


class _Permit(SlotPermit):
    def __init__(self, queue: str) -> None:
        self.queue = queue
        self.used = False


@dataclass
class BackendSlots(CustomSlotSupplier):
    """The slot supplier of one backend's workers in this process (see the module's doc)."""

    backend: Backend
    capacity: int
    health: BackendHealth
    fleet: "Fleet"
    # The backend's own queue: a prompt sent back to it (it may be on ComfyUI already, under its crashed
    # holder's lease) or a job from before the fleet. Always let through: the prompt's activity takes a lease
    # before it posts anything new, so ComfyUI is not over-filled, and a re-attach is not kept waiting.
    own_queue: str = ""
    # Queues this backend serves that no other backend does: a job there has nowhere else to go, so it is let
    # through while the backend is down and waits for it inside its activity, saying why.
    sole_queues: frozenset[str] = frozenset()
    running: int = 0  # this process's prompts on it (activity tasks started and not yet done)
    by_others: int = 0  # live leases of other processes
    # Polls let through and not yet answered with a task, per queue: a queue's own polls never overcommit.
    polling: dict[str, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def in_flight(self) -> int:
        return self.running + self.by_others

    @property
    def load(self) -> float:
        return self.in_flight / self.capacity

    @property
    def has_free_slot(self) -> bool:
        return self.in_flight < self.capacity

    def may_poll(self, queue: str) -> bool:
        if queue == self.own_queue:
            return True
        if self.in_flight + self.polling.get(queue, 0) >= self.capacity:
            return False
        if not self.health.reachable:
            return queue in self.sole_queues
        return not any(other.health.reachable and other.has_free_slot and other.load < self.load
                       for other in self.fleet.serving(queue) if other is not self)

    async def reserve_slot(self, ctx: SlotReserveContext) -> SlotPermit:
        while True:
            changed = self.fleet.next_change()
            if self.may_poll(ctx.task_queue):
                with self._lock:
                    self.polling[ctx.task_queue] = self.polling.get(ctx.task_queue, 0) + 1
                return _Permit(ctx.task_queue)
            await self.fleet.wait(changed)

    def try_reserve_slot(self, ctx: SlotReserveContext) -> SlotPermit | None:
        return None  # no eager activities: every prompt is placed through its queue

    def mark_slot_used(self, ctx: SlotMarkUsedContext) -> None:
        assert isinstance(ctx.permit, _Permit)
        ctx.permit.used = True
        with self._lock:
            self.polling[ctx.permit.queue] -= 1
            self.running += 1
        self.fleet.changed()

    def release_slot(self, ctx: SlotReleaseContext) -> None:
        if not isinstance(ctx.permit, _Permit):
            return
        with self._lock:
            if ctx.permit.used:
                self.running -= 1
            else:
                self.polling[ctx.permit.queue] -= 1
        self.fleet.changed()


class Fleet:
    """This process's backends: their slot suppliers, leases and health, and the wake-up of waiting polls."""

    def __init__(self, leases: SlotLeases) -> None:
        self.leases = leases
        self.slots: dict[str, BackendSlots] = {}
        self._queues: dict[str, list[BackendSlots]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._change: asyncio.Event | None = None
        self._releasing: set[asyncio.Future[None]] = set()

    def add(self, slots: BackendSlots, queues: Iterable[str]) -> None:
        self.slots[slots.backend.id] = slots
        for queue in queues:
            self._queues.setdefault(queue, []).append(slots)

    def serving(self, queue: str) -> list[BackendSlots]:
        return self._queues.get(queue, [])

    # --- wake-ups: a slot freed in this process wakes its waiting polls at once ---------------------------

    def next_change(self) -> asyncio.Event:
        if self._change is None:
            self._loop, self._change = asyncio.get_running_loop(), asyncio.Event()
        return self._change

    async def wait(self, change: asyncio.Event) -> None:
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for can lose a cancellation that arrives as the
        # event is set, and a cancelled prompt waiting for its lease would then wait on.
        with suppress(TimeoutError):
            async with asyncio.timeout(RECHECK_SECONDS):
                await change.wait()

    def changed(self) -> None:
        """Safe from any thread: the SDK may report slot use from outside the event loop."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        if self._change is not None:
            self._change.set()
            self._change = asyncio.Event()

    # --- leases ------------------------------------------------------------------------------------

    async def lease(self, backend: str, prompt_id: str, on_wait: Callable[[], None] | None = None) -> Lease:
        """The prompt's slot lease: the one it has (adopted), or a free slot, waiting for one while every slot
        is held."""
        slots = self.slots[backend]
        while True:
            change = self.next_change()
            lease = await self._claim(backend, slots.capacity, prompt_id)
            if lease is not None:
                return lease
            if on_wait is not None:
                on_wait()
            await self.wait(change)

    async def _claim(self, backend: str, capacity: int, prompt_id: str) -> Lease | None:
        claiming = asyncio.ensure_future(asyncio.to_thread(self.leases.claim, backend, capacity, prompt_id))
        try:
            return await asyncio.shield(claiming)
        except asyncio.CancelledError:
            # The claim runs on in its thread and may commit: what it wins is released, not left to nobody.
            claiming.add_done_callback(self._release_won)
            raise

    def _release_won(self, claiming: asyncio.Future[Lease | None]) -> None:
        if not claiming.cancelled() and claiming.exception() is None and (lease := claiming.result()) is not None:
            self._releasing.add(task := asyncio.ensure_future(self.release(lease)))
            task.add_done_callback(self._releasing.discard)

    async def release(self, lease: Lease) -> None:
        """Free the slot; never raises for the database: a release that failed is retried by keep_leases."""
        try:
            await asyncio.to_thread(self.leases.release, lease)
        except SQLAlchemyError as error:
            log.warning("slot lease %s/%d could not be released (retried): %s", lease.backend, lease.slot,
                        type(error).__name__)
        self.changed()

    def abandon(self, lease: Lease) -> None:
        """The lease's prompt was left running on ComfyUI for its next try to re-attach: see SlotLeases.abandon."""
        self.leases.abandon(lease)

    async def count_others(self) -> None:
        """Count the other processes' leases: before the first poll, so that a starting worker does not take the
        slots of a crashed one's prompts for free."""
        held = await asyncio.to_thread(self.leases.held_by_others)
        moved = False
        for backend, slots in self.slots.items():
            moved = moved or slots.by_others != held.get(backend, 0)
            slots.by_others = held.get(backend, 0)
        if moved:
            self._wake()

    async def keep_leases(self) -> None:
        """Renew this process's leases, and count the other processes' for placement, until cancelled."""
        renewed_at = 0.0
        loop = asyncio.get_running_loop()
        while True:
            try:
                if loop.time() - renewed_at >= RENEW_EVERY_SECONDS:
                    await asyncio.to_thread(self.leases.renew)
                    renewed_at = loop.time()
                if self.leases.unreleased:
                    await asyncio.to_thread(self.leases.retry_releases)
                    self.changed()
                await self.count_others()
            except SQLAlchemyError as error:  # the database is away: the counts stand, and the next turn retries
                log.warning("slot leases could not be renewed or counted: %s", type(error).__name__)
            await asyncio.sleep(RECHECK_SECONDS)
