"""A backend's worker that stops on its own stops the process's main task (worker.main.WorkerWatch), while
workers shut down on purpose do not."""

from __future__ import annotations

import asyncio

import pytest

from worker.main import WorkerWatch


async def test_a_worker_that_stops_on_its_own_stops_the_task_running_the_workers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def dies() -> None:
        raise RuntimeError("poller failed")

    serving = asyncio.Event()
    watches: list[WorkerWatch] = []

    async def runs_the_workers() -> None:
        watch = WorkerWatch(asyncio.current_task())
        watches.append(watch)
        watch.watch(asyncio.create_task(dies()), "gateway.gpu2")
        await serving.wait()  # the process serves until told to stop

    main = asyncio.create_task(runs_the_workers())
    await asyncio.gather(main, return_exceptions=True)
    assert main.cancelled() and watches[0].died == ["gateway.gpu2"]
    assert "the worker polling gateway.gpu2 stopped (RuntimeError('poller failed'))" in caplog.text


async def test_workers_shut_down_on_purpose_stop_nothing() -> None:
    async def runs_the_workers() -> list[str]:
        watch = WorkerWatch(asyncio.current_task())
        worker = asyncio.create_task(asyncio.sleep(0))
        watch.stopping = True
        watch.watch(worker, "gateway.gpu1")
        await worker
        await asyncio.sleep(0)  # its done callback has run
        return watch.died

    assert await asyncio.create_task(runs_the_workers()) == []
