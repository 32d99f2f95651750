"""The scheduler forgets every finished job: its own Python memory does not grow with the jobs it
has run (issue 11). The scheduler deployment's class runs on a plain event loop with a stage chain
that makes no images, so only the scheduler's objects are traced; the whole service under Ray is
measured by benchmarks/job_memory.py. ``SCHEDULER_MEMORY_JOBS=10000`` runs the long version."""

from __future__ import annotations

import asyncio
import gc
import os
import time
import tracemalloc
from pathlib import Path
from typing import Any

from tests.job_harness import FakeStages, scheduler_config, start_scheduler, submission

CLIENTS = 16
WARM_UP_JOBS = 200
MEASURED_JOBS = int(os.environ.get("SCHEDULER_MEMORY_JOBS", "1000"))  # 10000 for the issue-11 proof
ALLOWED_BYTES_PER_JOB = 100  # one kept record is over a kilobyte


async def run_jobs(scheduler: Any, config: Any, count: int) -> None:
    """``count`` async jobs from CLIENTS clients, each waiting for its job; then forget them all."""
    remaining = iter(range(count))

    async def client() -> None:
        for _ in remaining:
            view = await scheduler.submit(submission(config))
            done = await scheduler.wait("local", view.record.id)
            assert done.record.status == "succeeded"

    await asyncio.gather(*(client() for _ in range(CLIENTS)))
    scheduler.jobs.forget_finished_jobs(time.time())  # what the scheduler's tidy loop calls
    scheduler.log.flush()  # what the generation log's own timer calls
    # The throughput estimate keeps a window bounded by time, not by jobs: empty it so only
    # what each job leaves behind is counted.
    for queue in scheduler.core.variants.values():
        queue.completions.clear()
    gc.collect()


def per_job_state(scheduler: Any) -> dict[str, int]:
    jobs = scheduler.jobs
    return {
        "records": len(jobs.records),
        "finished": len(jobs.finished),
        "running": len(jobs.running_jobs),
        "pending saves": len(jobs.pending_saves),
        "idempotency": len(jobs.idempotency),
        "waiters": len(scheduler.waiters),
        "abandoned": len(scheduler.abandoned),
        "tickets queued": len(scheduler.core.queued),
        "tickets running": len(scheduler.core.running),
    }


def test_memory_stays_flat_over_many_jobs(tmp_path: Path) -> None:
    config = scheduler_config(tmp_path)
    unlimited = {
        name: tier.model_copy(update={"requests_per_minute": 10**9, "cost_per_minute": 1e15})
        for name, tier in config.tiers.items()
    }
    scheduling = config.scheduler.model_copy(update={"slots_per_replica": 8, "job_memory_s": 0.0})
    config = config.model_copy(update={"tiers": unlimited, "scheduler": scheduling})

    async def scenario() -> tuple[int, int]:
        scheduler = start_scheduler(config, FakeStages())
        await scheduler.ready()
        await run_jobs(scheduler, config, WARM_UP_JOBS)
        before, _ = tracemalloc.get_traced_memory()
        await run_jobs(scheduler, config, MEASURED_JOBS)
        after, _ = tracemalloc.get_traced_memory()
        assert per_job_state(scheduler) == dict.fromkeys(per_job_state(scheduler), 0)
        return before, after

    tracemalloc.start()
    try:
        before, after = asyncio.run(scenario())
    finally:
        tracemalloc.stop()
    print(f"traced memory over {MEASURED_JOBS} jobs: {before} -> {after} bytes")
    assert after - before < ALLOWED_BYTES_PER_JOB * MEASURED_JOBS, f"grew {after - before} bytes"
