"""The job life cycle as a plain object, without Ray: accept, run, finish, recover, forget.

`JobLifecycle` runs on a plain event loop with a file:// store and the real `SchedulerCore`.
Below it, the stage chain is a fake that counts runs and waits on gates, and the store fails on
command: those are the boundaries these tests are about (tests/job_harness.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from pathlib import Path

import pytest

from deployments.errors import StorageUnavailableError
from deployments.moderation import ModerationBlocked
from serve_app.errors import IdempotencyConflictError
from serve_app.jobs import ACTIVE, JobRecord, JobStore, new_record
from tests.job_harness import DEADLINE_S, FakeStages, JobHarness, scheduler_config, submission, until


def test_a_job_runs_once_and_its_idempotent_repeat_returns_it(tmp_path: Path) -> None:
    async def scenario() -> None:
        config = scheduler_config(tmp_path)
        stages = FakeStages()
        harness = JobHarness(config, stages)
        job = submission(config)
        keyed = dataclasses.replace(job, idempotency_key="key-1", body_sha256="body-1")
        view = await harness.jobs.submit(keyed)
        assert view.record.status in ("queued", "running")
        done = await asyncio.wait_for(harness.jobs.wait("local", view.record.id), DEADLINE_S)
        assert done.record.status == "succeeded" and len(done.record.images) == 1
        repeat = await harness.jobs.submit(dataclasses.replace(keyed, request=submission(config).request))
        assert repeat.record.id == view.record.id and stages.runs == 1
        with pytest.raises(IdempotencyConflictError):
            await harness.jobs.submit(dataclasses.replace(keyed, body_sha256="another body"))
        await until(harness.is_idle)

    asyncio.run(scenario())


def test_a_queued_job_is_cancelled_at_once_and_never_runs(tmp_path: Path) -> None:
    async def scenario() -> None:
        config = scheduler_config(tmp_path)  # one slot
        stages = FakeStages()
        stages.gate = asyncio.Event()
        harness = JobHarness(config, stages)
        running = await harness.jobs.submit(submission(config, "holds the slot"))
        queued = await harness.jobs.submit(submission(config, "waits"))
        assert queued.record.status == "queued" and queued.queue_position == 0
        cancelled = await harness.jobs.cancel("local", queued.record.id)
        assert cancelled.record.status == "cancelled"
        stages.gate.set()
        done = await asyncio.wait_for(harness.jobs.wait("local", running.record.id), DEADLINE_S)
        assert done.record.status == "succeeded" and stages.runs == 1
        with pytest.raises(Exception, match="No job"):
            await harness.jobs.get("another-tenant", running.record.id)

    asyncio.run(scenario())


def test_recovery_queues_again_an_unfinished_job_and_runs_it(tmp_path: Path) -> None:
    async def scenario() -> None:
        config = scheduler_config(tmp_path)
        stages = FakeStages()
        stages.gate = asyncio.Event()  # the first scheduler never finishes it
        first = JobHarness(config, stages)
        view = await first.jobs.submit(submission(config))
        await until(lambda: stages.runs == 1)
        restarted = JobHarness(config, FakeStages())
        await restarted.jobs.recover()
        restarted.dispatch()
        done = await asyncio.wait_for(restarted.jobs.wait("local", view.record.id), DEADLINE_S)
        assert done.record.status == "succeeded"
        assert not restarted.store.list_keys(ACTIVE)
        stages.gate.set()  # the first scheduler's run ends too; its outcome is the same
        await until(first.is_idle)

    asyncio.run(scenario())


def test_job_granted_while_its_record_fails_to_save_never_runs(tmp_path: Path) -> None:
    async def scenario() -> None:
        config = scheduler_config(tmp_path)
        stages = FakeStages()
        harness = JobHarness(config, stages)
        saving, resume = threading.Event(), threading.Event()

        def hold_first_save(record: JobRecord) -> None:
            if record.status == "queued":
                saving.set()
                resume.wait(DEADLINE_S)

        harness.job_store.before_save = hold_first_save
        harness.job_store.fail_saves["queued"] = 1
        submitted = asyncio.ensure_future(harness.jobs.submit(submission(config)))
        await until(saving.is_set)
        harness.dispatch()  # any dispatch grants the queued job now
        assert harness.core.running, "the job was granted while its record was being saved"
        resume.set()
        with pytest.raises(StorageUnavailableError):
            await submitted
        await until(harness.is_idle)
        assert stages.runs == 0
        assert harness.jobs.records == {}

    asyncio.run(scenario())


def test_store_errors_while_a_job_runs_are_retried_until_it_succeeds(tmp_path: Path) -> None:
    async def scenario() -> None:
        config = scheduler_config(tmp_path)
        stages = FakeStages(failures=2)
        harness = JobHarness(config, stages)
        harness.job_store.fail_saves.update({"running": 2, "succeeded": 2})
        view = await harness.jobs.submit(submission(config))
        done = await asyncio.wait_for(harness.jobs.wait("local", view.record.id), DEADLINE_S)
        assert done.record.status == "succeeded"
        assert stages.runs == 3
        stored = JobStore(harness.store).load(view.record.id)
        assert stored is not None and stored.status == "succeeded"
        assert not harness.store.list_keys(ACTIVE)
        await until(harness.is_idle)

    asyncio.run(scenario())


def test_a_failed_job_keeps_the_type_and_code_of_its_error(tmp_path: Path) -> None:
    async def scenario() -> None:
        config = scheduler_config(tmp_path)
        blocked = ModerationBlocked("req_1", "output", "words", ("violence",))
        harness = JobHarness(config, FakeStages(failures=1, failure=blocked))
        view = await harness.jobs.submit(submission(config))
        done = await asyncio.wait_for(harness.jobs.wait("local", view.record.id), DEADLINE_S)
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
        harness = JobHarness(config, stages)
        harness.job_store.fail_saves["succeeded"] = 1_000_000  # the store refuses the final record
        view = await harness.jobs.submit(submission(config))
        await until(lambda: view.record.id in harness.jobs.finishing)
        polled = await harness.jobs.get("local", view.record.id)
        assert polled.record.status == "running"  # not final until stored
        harness.job_store.fail_saves["succeeded"] = 0  # the store comes back
        done = await asyncio.wait_for(harness.jobs.wait("local", view.record.id), DEADLINE_S)
        assert done.record.status == "succeeded"
        assert stages.runs == 1

    asyncio.run(scenario())


def test_recovery_leaves_finished_jobs_alone(tmp_path: Path) -> None:
    async def scenario() -> None:
        config = scheduler_config(tmp_path)
        first = JobHarness(config, FakeStages())
        finished = submission(config, "finished")
        record = new_record(
            finished.request,
            finished.options,
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
        restarted = JobHarness(config, stages)
        await restarted.jobs.recover()
        restarted.dispatch()
        await until(restarted.is_idle)
        assert stages.runs == 0
        assert jobs.load(record.id).status == "failed"  # type: ignore[union-attr]
        assert not restarted.store.list_keys(ACTIVE)

    asyncio.run(scenario())


def test_finished_jobs_leave_memory_and_their_uploads_leave_the_store(tmp_path: Path) -> None:
    async def scenario() -> None:
        config = scheduler_config(tmp_path)
        harness = JobHarness(config, FakeStages())
        job = submission(config)
        upload = f"jobs/uploads/{job.request.request_id}/image-0"
        harness.store.put(upload, b"an uploaded image")
        request = dataclasses.replace(job.request, input_keys=(upload,))
        view = await harness.jobs.submit(dataclasses.replace(job, request=request))
        done = await asyncio.wait_for(harness.jobs.wait("local", view.record.id), DEADLINE_S)
        assert done.record.status == "succeeded"
        with pytest.raises(FileNotFoundError):
            harness.store.get(upload)
        harness.jobs.forget_finished_jobs(now=done.record.completed_at + config.scheduler.job_memory_s)
        assert harness.jobs.records == {} and harness.jobs.finished == {}
        from_store = await harness.jobs.get("local", view.record.id)
        assert from_store.record.status == "succeeded"

    asyncio.run(scenario())


def test_a_recovered_job_whose_model_was_removed_fails_with_a_404_and_the_others_run(tmp_path: Path) -> None:
    async def scenario() -> None:
        config = scheduler_config(tmp_path)
        stages = FakeStages()
        stages.gate = asyncio.Event()  # the first scheduler never finishes either job
        first = JobHarness(config, stages)
        kept = await first.jobs.submit(submission(config, "on a variant that stays"))
        await until(lambda: stages.runs == 1)  # running (its record saved as such); one slot only
        removed = await first.jobs.submit(submission(config, "on a variant about to go"))  # queued
        jobs = JobStore(first.store)
        gone = jobs.load(removed.record.id)
        assert gone is not None
        jobs.save(gone.model_copy(update={"request": {**gone.request, "variant": "retired-variant"}}))

        restarted = JobHarness(config, FakeStages())
        await restarted.jobs.recover()
        restarted.dispatch()
        failed = await asyncio.wait_for(restarted.jobs.wait("local", removed.record.id), DEADLINE_S)
        assert failed.record.status == "failed"
        assert (failed.record.error_status, failed.record.error_code) == (404, "model_not_found")
        done = await asyncio.wait_for(restarted.jobs.wait("local", kept.record.id), DEADLINE_S)
        assert done.record.status == "succeeded"
        assert not restarted.store.list_keys(ACTIVE)
        stages.gate.set()
        await until(first.is_idle)

    asyncio.run(scenario())
