"""The scheduler deployment on a plain event loop, without a cluster: slots given back in any
order, and a job's way from submission through the deployment to its slots and back.

The job life cycle itself is tested as a plain object in tests/unit/test_job_lifecycle.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Any

import pytest

from serve_app.errors import NotFoundError, status_and_type
from serve_app.jobs import JobStore
from tests.job_harness import DEADLINE_S, FakeStages, scheduler_config, start_scheduler, submission, until


async def is_idle(scheduler: Any) -> bool:
    stats = await scheduler.stats()
    variant = stats["variants"]["tiny-sd"]
    return bool(variant["in_flight"] == 0 and stats["jobs_running"] == 0 and not scheduler.core.queued)


def test_job_cancelled_between_grant_and_first_step_frees_its_slots(tmp_path: Path) -> None:
    async def scenario() -> None:
        config = scheduler_config(tmp_path)
        stages = FakeStages()
        scheduler = start_scheduler(config, stages)
        await scheduler.ready()
        # submit grants the free slot and creates the job's task; cancel comes before it runs a step
        view = await scheduler.submit(submission(config))
        cancelled = await scheduler.cancel("local", view.record.id)
        assert cancelled.record.status == "cancelled"
        assert stages.runs == 0
        await until(lambda: is_idle(scheduler))
        waited = await asyncio.wait_for(scheduler.wait("local", view.record.id), DEADLINE_S)
        assert waited.record.status == "cancelled"
        assert JobStore(scheduler.jobs.store).load(view.record.id).status == "cancelled"  # type: ignore[union-attr]
        # the freed slot serves the next job
        follow_up = await scheduler.submit(submission(config))
        done = await asyncio.wait_for(scheduler.wait("local", follow_up.record.id), DEADLINE_S)
        assert done.record.status == "succeeded"

    asyncio.run(scenario())


def test_a_release_before_or_during_acquire_leaves_no_slot_taken(tmp_path: Path) -> None:
    async def scenario() -> None:
        config = scheduler_config(tmp_path)
        scheduler = start_scheduler(config, FakeStages())
        await scheduler.ready()
        # The caller left and released before its acquire even ran.
        early = submission(config).work
        await scheduler.release_all([(early.ticket_id, 0)])
        with pytest.raises(asyncio.CancelledError):
            await scheduler.acquire(early)
        assert await is_idle(scheduler)
        # The caller left while its acquire waited behind another grant.
        holder = await scheduler.acquire(submission(config).work)
        waiting = submission(config).work
        acquire = asyncio.ensure_future(scheduler.acquire(waiting))
        await until(lambda: waiting.ticket_id in scheduler.core.queued)
        await scheduler.release_all([(waiting.ticket_id, 0)])
        with pytest.raises(asyncio.CancelledError):
            await acquire
        await scheduler.release_all([(holder.ticket_id, 1)])
        await until(lambda: is_idle(scheduler))

    asyncio.run(scenario())


def test_releases_carried_on_an_acquire_are_freed_before_it_is_admitted(tmp_path: Path) -> None:
    async def scenario() -> None:
        config = scheduler_config(tmp_path)  # one slot
        scheduler = start_scheduler(config, FakeStages())
        await scheduler.ready()
        holder = await scheduler.acquire(submission(config).work)
        # the holder's release rides on the next acquire, which gets the slot it frees
        follower = await asyncio.wait_for(
            scheduler.acquire(submission(config).work, [(holder.ticket_id, 1)]), DEADLINE_S
        )
        # a release sent again (its first delivery was uncertain) frees nothing twice
        await scheduler.release_all([(holder.ticket_id, 1), (follower.ticket_id, 1)])
        await until(lambda: is_idle(scheduler))
        assert scheduler.core.variants["tiny-sd"].in_use == 0

    asyncio.run(scenario())


def test_work_for_a_variant_the_scheduler_does_not_serve_is_a_404_and_takes_nothing(tmp_path: Path) -> None:
    """A request planned just before a rollout removed its variant reaches a scheduler without it."""

    async def scenario() -> None:
        config = scheduler_config(tmp_path)
        scheduler = start_scheduler(config, FakeStages())
        await scheduler.ready()
        removed = dataclasses.replace(submission(config).work, variant="retired-variant")
        with pytest.raises(NotFoundError) as refused:
            await scheduler.acquire(removed)
        assert status_and_type(refused.value) == (404, "invalid_request_error")
        assert refused.value.code == "model_not_found"
        with pytest.raises(NotFoundError):
            await scheduler.check_admission(removed)
        job = submission(config)
        with pytest.raises(NotFoundError):
            await scheduler.submit(dataclasses.replace(job, work=removed))
        assert await is_idle(scheduler) and not scheduler.jobs.records

    asyncio.run(scenario())
