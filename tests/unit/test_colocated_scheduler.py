"""The scheduler in the ingress's process (``scheduler.colocate``): the real deployment class,
built by `ColocatedScheduler.start` on this loop and called through `InProcessHandle` as the
ingress calls it. Without the hop the calls must keep a handle's meaning: a caller that leaves
gives its place back (the cancel reaches the scheduler), a refusal arrives as the scheduler's own
error, and jobs run to the end."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest

from serve_app.errors import NotFoundError
from serve_app.scheduler import ColocatedScheduler
from serve_app.slot_client import SlotClient
from tests.job_harness import DEADLINE_S, FakeStages, scheduler_config, submission, until


def test_a_cancelled_call_gives_the_callers_place_back(tmp_path: Path) -> None:
    async def scenario() -> None:
        config = scheduler_config(tmp_path)  # one slot
        handle = ColocatedScheduler(config).start(FakeStages())
        scheduler = handle.target
        assert await asyncio.wait_for(handle.ready.remote(), DEADLINE_S) is True
        holder = await handle.acquire.remote(submission(config).work)
        waiting = submission(config).work
        call = handle.acquire.remote(waiting)
        await until(lambda: waiting.ticket_id in scheduler.core.queued)
        call.cancel()  # the client left while it waited behind the holder
        with pytest.raises(asyncio.CancelledError):
            await call
        # Given back by the cancel itself: no release of the ticket was sent.
        await until(lambda: waiting.ticket_id not in scheduler.core.queued)
        assert waiting.ticket_id not in scheduler.waiters
        await handle.release_all.remote([(holder.ticket_id, 1)])
        assert scheduler.core.variants["tiny-sd"].in_use == 0

    asyncio.run(scenario())


def test_the_slot_client_gets_grants_and_the_schedulers_own_refusals(tmp_path: Path) -> None:
    async def scenario() -> None:
        config = scheduler_config(tmp_path)
        handle = ColocatedScheduler(config).start(FakeStages())
        slots = SlotClient(handle, slot_wait_s=DEADLINE_S)
        first = await slots.acquire(submission(config).work)
        slots.release(first.ticket_id, 1)
        # One slot: granted only once the first's release has reached the scheduler in-process.
        second = await slots.acquire(submission(config).work)
        assert second.ticket_id != first.ticket_id
        removed = dataclasses.replace(submission(config).work, variant="retired-variant")
        with pytest.raises(NotFoundError) as refused:
            await slots.acquire(removed)
        assert refused.value.code == "model_not_found"

    asyncio.run(scenario())


def test_a_job_runs_to_the_end_in_the_ingress_process(tmp_path: Path) -> None:
    async def scenario() -> None:
        config = scheduler_config(tmp_path)
        stages = FakeStages()
        handle = ColocatedScheduler(config).start(stages)
        view = await handle.submit.remote(submission(config))
        done = await asyncio.wait_for(handle.wait.remote("local", view.record.id), DEADLINE_S)
        assert done.record.status == "succeeded" and stages.runs == 1

    asyncio.run(scenario())
