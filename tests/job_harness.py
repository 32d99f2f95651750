"""A job's world without Ray: a fake stage chain, a job store that fails on command, and a
`JobLifecycle` wired to the real `SchedulerCore` the way the scheduler deployment wires it.

Shared by tests/unit/test_job_lifecycle.py (the plain object) and
tests/unit/test_scheduler_faults.py (the deployment class on a plain event loop).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from deployments.contracts import EncodeOptions, ImageRequest, StoredImage
from deployments.errors import StorageUnavailableError
from deployments.generation_log import GenerationLog
from deployments.stage_chain import StageChain
from deployments.storage import ObjectStore
from serve_app.admission_policy import (
    RateDecision,
    RateLimiter,
    SchedulerCore,
    Ticket,
    WorkRequest,
    work_request,
)
from serve_app.config import AppConfig, SchedulerConfig
from serve_app.job_lifecycle import JobLifecycle, JobSubmission
from serve_app.jobs import JobRecord, JobStore, new_job_id
from serve_app.planning import PlanTarget, plan_generation
from serve_app.protocol import ImageGenerationRequest
from serve_app.scheduler import ColocatedScheduler, slots_per_variant
from tests.conftest import make_test_config

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

    async def make_images_once(
        self, request: ImageRequest, options: EncodeOptions, timeout_s: float
    ) -> list[StoredImage]:
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
    """The scheduler deployment's class on this event loop, with ``stages`` as its chain (built as
    an ingress builds its colocated scheduler)."""
    return ColocatedScheduler(config).start(stages).target


class JobHarness:
    """A `JobLifecycle` with the scheduler's admission and dispatch around it, as plain objects."""

    def __init__(self, config: AppConfig, stages: FakeStages) -> None:
        store = ObjectStore(config.storage)
        self.store = store
        self.core = SchedulerCore(config.tiers, config.scheduler, slots_per_variant(config))
        self.limiter = RateLimiter(config.tiers)
        log = GenerationLog(store, config.storage.log)
        self.jobs = JobLifecycle(config, stages, store, log, self.core, self.admit, self.dispatch)
        self.job_store = FlakyJobStore(self.jobs.job_store)
        self.jobs.job_store = self.job_store

    def admit(self, work: WorkRequest, ticket: Ticket) -> RateDecision:
        now = time.monotonic()
        decision = self.limiter.check(work.tenant, work.tier, work.cost, now, work.end_user)
        assert decision.allowed and self.core.admit(ticket, now).verdict != "shed"
        return decision

    def dispatch(self) -> None:
        for ticket in self.core.grant(time.monotonic()):
            self.jobs.start(ticket.id)

    def is_idle(self) -> bool:
        in_flight = sum(queue.in_use for queue in self.core.variants.values())
        return in_flight == 0 and not self.jobs.running_jobs and not self.core.queued


def submission(config: AppConfig, prompt: str = "a job") -> JobSubmission:
    target = PlanTarget(config.variants[0], config.limits, request_id=new_job_id(), tenant="local")
    request, options = plan_generation(ImageGenerationRequest(prompt=prompt, size="64x64"), target)
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
