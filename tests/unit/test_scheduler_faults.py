"""The scheduler's job life cycle under faults, without a cluster: cancel races, failed saves, restarts.

The deployment class runs on a plain event loop with a file:// store. Below the scheduler, the
stage chain is a fake that counts runs and waits on gates, and the store fails on command:
those are the boundaries these tests are about.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from deployments.contracts import EncodeOptions, ImageRequest, StoredImage
from deployments.errors import StorageUnavailableError
from deployments.moderation import ModerationBlocked
from deployments.stage_chain import StageChain
from serve_app.config import AppConfig, SchedulerConfig
from serve_app.jobs import ACTIVE, JobRecord, JobStore, new_job_id, new_record
from serve_app.planning import plan_generation
from serve_app.protocol import ImageGenerationRequest
from serve_app.scheduler import JobSubmission, Scheduler, work_request
from tests.conftest import make_test_config

SchedulerClass: Any = Scheduler.func_or_class  # type: ignore[attr-defined]
DEADLINE_S = 30.0


class FakeStages(StageChain):
    """The stage chain with no stages: each pass waits for ``gate`` (when set), then fails
    ``failures`` times. Only one pass is faked; the chain's own retry runs around it."""

    def __init__(self, failures: int = 0, failure: Exception | None = None) -> None:
        super().__init__(None, None, {})  # type: ignore[arg-type]  # no stage is ever called
        self.runs = 0
        self.failures = failures
        self.failure = failure or StorageUnavailableError("Image storage is unavailable; retry shortly.")
        self.gate: asyncio.Event | None = None

    async def make_images_once(self, request: ImageRequest, options: EncodeOptions) -> list[StoredImage]:
        self.runs += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.failures:
            self.failures -= 1
            raise self.failure
        return [
            StoredImage(
                seed=request.seed + index,
                output_format="png",
                byte_count=1,
                batch_size=1,
                timings={},
                object_key=f"local/{request.request_id}-{index}.png",
            )
            for index in range(request.n)
        ]


class FlakyJobStore(JobStore):
    """Job records in a real file store; ``fail_saves`` of the given status fail like an outage."""

    def __init__(self, inner: JobStore) -> None:
        super().__init__(inner.store)
        self.fail_saves: dict[str, int] = {}
        self.before_save: Callable[[JobRecord], None] = lambda record: None

    def save(self, record: JobRecord) -> None:
        self.before_save(record)
        if self.fail_saves.get(record.status, 0) > 0:
            self.fail_saves[record.status] -= 1
            raise StorageUnavailableError("Image storage is unavailable; retry shortly.")
        super().save(record)


def scheduler_config(tmp_path: Path) -> AppConfig:
    config = make_test_config(tmp_path / "store")
    scheduler = SchedulerConfig(slots_per_replica=1, defer_at_backlog=0, shed_at_backlog=8, max_backlog=64)
    return config.model_copy(update={"scheduler": scheduler})


def start_scheduler(config: AppConfig, stages: FakeStages) -> Any:
    scheduler = SchedulerClass(config, stages)
    scheduler.jobs = FlakyJobStore(scheduler.jobs)
    return scheduler


def submission(config: AppConfig, prompt: str = "a job") -> JobSubmission:
    request, options = plan_generation(
        ImageGenerationRequest(prompt=prompt, size="64x64"),
        config.variants[0],
        config.limits,
        request_id=new_job_id(),
        tenant="local",
    )
    return JobSubmission(work_request(request, "paid"), request, options, quality="standard")


async def until(condition: Callable[[], bool | Awaitable[bool]]) -> None:
    """Poll ``condition`` on the loop until it holds (the deadline guards against a hang)."""
    deadline = asyncio.get_running_loop().time() + DEADLINE_S
    while True:
        result = condition()
        if result if isinstance(result, bool) else await result:
            return
        assert asyncio.get_running_loop().time() < deadline, "condition never held"
        await asyncio.sleep(0.01)  # yield to the scheduler's tasks between checks


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
        assert JobStore(scheduler.store).load(view.record.id).status == "cancelled"  # type: ignore[union-attr]
        # the freed slot serves the next job
        follow_up = await scheduler.submit(submission(config))
        done = await asyncio.wait_for(scheduler.wait("local", follow_up.record.id), DEADLINE_S)
        assert done.record.status == "succeeded"

    asyncio.run(scenario())


def test_job_granted_while_its_record_fails_to_save_never_runs(tmp_path: Path) -> None:
    async def scenario() -> None:
        config = scheduler_config(tmp_path)
        stages = FakeStages()
        scheduler = start_scheduler(config, stages)
        await scheduler.ready()
        saving, resume = threading.Event(), threading.Event()

        def hold_first_save(record: JobRecord) -> None:
            if record.status == "queued":
                saving.set()
                resume.wait(DEADLINE_S)

        scheduler.jobs.before_save = hold_first_save
        scheduler.jobs.fail_saves["queued"] = 1
        submitted = asyncio.ensure_future(scheduler.submit(submission(config)))
        await until(saving.is_set)
        await scheduler.release("tkt_unknown", 0)  # any dispatch grants the queued job now
        assert scheduler.core.running, "the job was granted while its record was being saved"
        resume.set()
        with pytest.raises(StorageUnavailableError):
            await submitted
        await until(lambda: is_idle(scheduler))
        assert stages.runs == 0
        assert scheduler.records == {}

    asyncio.run(scenario())


def test_store_errors_while_a_job_runs_are_retried_until_it_succeeds(tmp_path: Path) -> None:
    async def scenario() -> None:
        config = scheduler_config(tmp_path)
        stages = FakeStages(failures=2)
        scheduler = start_scheduler(config, stages)
        await scheduler.ready()
        scheduler.jobs.fail_saves.update({"running": 2, "succeeded": 2})
        view = await scheduler.submit(submission(config))
        done = await asyncio.wait_for(scheduler.wait("local", view.record.id), DEADLINE_S)
        assert done.record.status == "succeeded"
        assert stages.runs == 3
        stored = JobStore(scheduler.store).load(view.record.id)
        assert stored is not None and stored.status == "succeeded"
        assert not scheduler.store.list_files(ACTIVE)
        await until(lambda: is_idle(scheduler))

    asyncio.run(scenario())


def test_a_failed_job_keeps_the_type_and_code_of_its_error(tmp_path: Path) -> None:
    async def scenario() -> None:
        config = scheduler_config(tmp_path)
        blocked = ModerationBlocked("req_1", "output", "words", ("violence",))
        scheduler = start_scheduler(config, FakeStages(failures=1, failure=blocked))
        await scheduler.ready()
        view = await scheduler.submit(submission(config))
        done = await asyncio.wait_for(scheduler.wait("local", view.record.id), DEADLINE_S)
        assert done.record.status == "failed"
        assert (done.record.error_type, done.record.error_code, done.record.error_status) == (
            "image_generation_user_error",
            "moderation_blocked",
            400,
        )

    asyncio.run(scenario())


def test_an_outcome_is_visible_only_once_stored(tmp_path: Path) -> None:
    async def scenario() -> None:
        config = scheduler_config(tmp_path)
        stages = FakeStages()
        scheduler = start_scheduler(config, stages)
        await scheduler.ready()
        scheduler.jobs.fail_saves["succeeded"] = 1_000_000  # the store refuses the final record
        view = await scheduler.submit(submission(config))
        await until(lambda: view.record.id in scheduler.finishing)
        polled = await scheduler.get("local", view.record.id)
        assert polled.record.status == "running"  # not final until stored
        scheduler.jobs.fail_saves["succeeded"] = 0  # the store comes back
        done = await asyncio.wait_for(scheduler.wait("local", view.record.id), DEADLINE_S)
        assert done.record.status == "succeeded"
        assert stages.runs == 1

    asyncio.run(scenario())


def test_recovery_leaves_finished_jobs_alone(tmp_path: Path) -> None:
    async def scenario() -> None:
        config = scheduler_config(tmp_path)
        first = start_scheduler(config, FakeStages())
        await first.ready()
        request, options = plan_generation(
            ImageGenerationRequest(prompt="finished", size="64x64"),
            config.variants[0],
            config.limits,
            request_id=new_job_id(),
            tenant="local",
        )
        record = new_record(
            request,
            options,
            tier="paid",
            quality="standard",
            idempotency_key=None,
            body_sha256=None,
            webhook_url=None,
        )
        record.status = "failed"
        jobs = JobStore(first.store)
        jobs.save(record)
        first.store.put(f"{ACTIVE}/{record.id}", b"")  # the marker a crash left behind

        stages = FakeStages()
        restarted = start_scheduler(config, stages)
        await restarted.ready()
        await until(lambda: is_idle(restarted))
        assert stages.runs == 0
        assert jobs.load(record.id).status == "failed"  # type: ignore[union-attr]
        assert not restarted.store.list_files(ACTIVE)

    asyncio.run(scenario())


def test_a_release_before_or_during_acquire_leaves_no_slot_taken(tmp_path: Path) -> None:
    async def scenario() -> None:
        config = scheduler_config(tmp_path)
        scheduler = start_scheduler(config, FakeStages())
        await scheduler.ready()
        # The caller left and released before its acquire even ran.
        early = submission(config).work
        await scheduler.release(early.ticket_id, 0)
        with pytest.raises(asyncio.CancelledError):
            await scheduler.acquire(early)
        assert await is_idle(scheduler)
        # The caller left while its acquire waited behind another grant.
        holder = await scheduler.acquire(submission(config).work)
        waiting = submission(config).work
        acquire = asyncio.ensure_future(scheduler.acquire(waiting))
        await until(lambda: waiting.ticket_id in scheduler.core.queued)
        await scheduler.release(waiting.ticket_id, 0)
        with pytest.raises(asyncio.CancelledError):
            await acquire
        await scheduler.release(holder.ticket_id, 1)
        await until(lambda: is_idle(scheduler))

    asyncio.run(scenario())


def test_finished_jobs_leave_memory_and_their_uploads_leave_the_store(tmp_path: Path) -> None:
    async def scenario() -> None:
        config = scheduler_config(tmp_path)
        scheduler = start_scheduler(config, FakeStages())
        await scheduler.ready()
        job = submission(config)
        upload = f"jobs/uploads/{job.request.request_id}/image-0"
        scheduler.store.put(upload, b"an uploaded image")
        request = dataclasses.replace(job.request, input_keys=(upload,))
        view = await scheduler.submit(dataclasses.replace(job, request=request))
        done = await asyncio.wait_for(scheduler.wait("local", view.record.id), DEADLINE_S)
        assert done.record.status == "succeeded"
        with pytest.raises(FileNotFoundError):
            scheduler.store.get(upload)
        scheduler.forget_finished_jobs(now=done.record.completed_at + config.scheduler.job_memory_s)
        assert scheduler.records == {} and scheduler.finished == {}
        assert (await scheduler.get("local", view.record.id)).record.status == "succeeded"  # from the store

    asyncio.run(scenario())
