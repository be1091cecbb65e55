"""How many prompts each ComfyUI backend has at once, across every worker process sharing the backend list.

Two parts enforce a backend's capacity (slots × (1 + COMFYUI_PREFETCH)):

- `SlotLeases`, the rule: a prompt is posted only under a lease on one of the backend's slots, a row of
  `backend_slots` claimed atomically (an insert, or an update of an expired row, that only one claimant can win:
  the same on SQLite and PostgreSQL). The holding process renews its leases every few seconds; a process that
  crashed stops renewing, and its leases expire after LEASE_SECONDS so that the slots come back.
- `BackendSlots`, the placement: the Temporal slot supplier of the backend's workers (one per queue it serves,
  sharing it). A worker polls a queue for a prompt only while the backend has a free slot (its own prompts and
  the other processes' leases), is healthy, and no other healthy backend of the process that serves that queue
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
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from sqlalchemy import delete, func, select, update
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
from app.tables import BackendSlotRow

log = logging.getLogger(__name__)

# A lease not renewed for this long is free again: its holder crashed or lost the database.
LEASE_SECONDS = 30.0
RENEW_EVERY_SECONDS = 5.0
# How often other processes' leases are counted, and a prompt waiting for a lease tries again.
RECHECK_SECONDS = 0.5


def _now() -> datetime:
    return datetime.now(timezone.utc)


@dataclass(frozen=True)
class Lease:
    backend: str
    slot: int


class SlotLeases:
    """One process's leases on backend slots, in the database. Blocking calls: run them on a thread."""

    def __init__(self, engine: Engine, holder: str | None = None, lease_seconds: float = LEASE_SECONDS) -> None:
        self.engine = engine
        self.holder = holder or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.lease_seconds = lease_seconds

    def claim(self, backend: str, capacity: int, prompt_id: str) -> Lease | None:
        """A free slot of the backend, now held by this process; None when all `capacity` are held."""
        now = _now()
        expires = now + timedelta(seconds=self.lease_seconds)
        with self.engine.begin() as connection:
            held = set(connection.execute(select(BackendSlotRow.slot).where(BackendSlotRow.backend == backend)).scalars())
        for slot in range(capacity):
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
                return Lease(backend, slot)
        return None

    def release(self, lease: Lease) -> None:
        with self.engine.begin() as connection:
            connection.execute(delete(BackendSlotRow).where(
                BackendSlotRow.backend == lease.backend, BackendSlotRow.slot == lease.slot,
                BackendSlotRow.holder == self.holder))

    def renew(self) -> None:
        with self.engine.begin() as connection:
            connection.execute(update(BackendSlotRow).where(BackendSlotRow.holder == self.holder)
                               .values(expires_at=_now() + timedelta(seconds=self.lease_seconds)))

    def held_by_others(self) -> dict[str, int]:
        """backend → live leases that other processes hold on it."""
        with self.engine.begin() as connection:
            rows = connection.execute(
                select(BackendSlotRow.backend, func.count())
                .where(BackendSlotRow.holder != self.holder, BackendSlotRow.expires_at >= _now())
                .group_by(BackendSlotRow.backend))
            return {backend: count for backend, count in rows}


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
        try:
            await asyncio.wait_for(change.wait(), RECHECK_SECONDS)
        except TimeoutError:
            pass

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
        """A slot lease for the prompt, waiting for one while every slot is held."""
        slots = self.slots[backend]
        while True:
            change = self.next_change()
            lease = await asyncio.to_thread(self.leases.claim, backend, slots.capacity, prompt_id)
            if lease is not None:
                return lease
            if on_wait is not None:
                on_wait()
            await self.wait(change)

    async def try_lease(self, backend: str, prompt_id: str) -> Lease | None:
        return await asyncio.to_thread(self.leases.claim, backend, self.slots[backend].capacity, prompt_id)

    async def release(self, lease: Lease) -> None:
        await asyncio.to_thread(self.leases.release, lease)
        self.changed()

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
                await self.count_others()
            except SQLAlchemyError as error:  # the database is away: the counts stand, and the next turn retries
                log.warning("slot leases could not be renewed or counted: %s", type(error).__name__)
            await asyncio.sleep(RECHECK_SECONDS)
