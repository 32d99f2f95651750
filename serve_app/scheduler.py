"""The scheduler deployment: admission, slots and async jobs. Control state only.

Synchronous requests ask for slots (`acquire`), run the stage chain themselves and give the
slots back (`release`). Jobs (``Prefer: respond-async`` or an ``Idempotency-Key``) are recorded
in the object store first, then run here when their turn comes; their images are stored, so
only object keys come back to the scheduler. A restarted scheduler resumes every job whose
record is not finished; a job whose replica dies is run again (bounded), with stable object
keys, so each image is stored exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

from ray import serve
from ray.serve import metrics
from ray.serve.handle import DeploymentHandle

from deployments.contracts import EncodeOptions, ImageRequest
from deployments.generation_log import GenerationLog, generation_rows
from deployments.metrics import stage_metrics
from deployments.storage import ObjectStore
from serve_app.config import AppConfig
from serve_app.errors import (
    IdempotencyConflictError,
    NotFoundError,
    OverloadedError,
    RateLimitError,
    as_api_error,
)
from serve_app.jobs import JobImage, JobRecord, JobStore, deliver_webhook, new_record
from serve_app.pipeline import StageHandles
from serve_app.scheduling import (
    RateDecision,
    RateLimiter,
    SchedulerCore,
    Ticket,
    image_cost,
    retry_after_header,
)

logger = logging.getLogger("ray.serve")
LEASE_CHECK_INTERVAL_S = 5.0
WAIT_BOUNDARIES_S = [0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0]


@dataclass(frozen=True)
class WorkRequest:
    """What the ingress asks the scheduler for: slots for ``images`` images of ``variant``."""

    tenant: str
    tier: str
    variant: str
    images: int
    cost: float


@dataclass(frozen=True)
class Grant:
    ticket_id: str
    waited_s: float
    deferred: bool
    rate_limit_headers: dict[str, str]


@dataclass(frozen=True)
class JobSubmission:
    work: WorkRequest
    request: ImageRequest
    options: EncodeOptions
    quality: str
    idempotency_key: str | None = None
    body_sha256: str | None = None
    webhook_url: str | None = None


@dataclass(frozen=True)
class JobView:
    """A job as its tenant may see it, plus where it stands in the queue."""

    record: JobRecord
    queue_position: int | None
    eta_s: float | None
    rate_limit_headers: dict[str, str] = dataclasses.field(default_factory=dict)


def rate_limited(decision: RateDecision) -> RateLimitError:
    return RateLimitError(
        f"Rate limit reached for this API key; retry in {decision.retry_after_s:.1f}s.",
        headers={**decision.headers(), "retry-after": retry_after_header(decision.retry_after_s)},
    )


def slots_per_variant(config: AppConfig) -> dict[str, int]:
    per_replica = config.scheduler.slots_per_replica
    return {
        variant.name: (per_replica or 2 * variant.batching.max_batch_size) * variant.resources.num_replicas
        for variant in config.variants
    }


class SchedulerMetrics:
    def __init__(self) -> None:
        self.queue_depth = metrics.Gauge(
            "imagegen_queue_depth_images",
            description="Images queued, per variant and tier.",
            tag_keys=("variant", "tier"),  # type: ignore[arg-type]  # Ray annotates tuple[str]
        )
        self.wait = metrics.Histogram(
            "imagegen_queue_wait_seconds",
            description="Time from admission to slot grant.",
            boundaries=WAIT_BOUNDARIES_S,
            tag_keys=("tier",),
        )
        self.deferred = metrics.Counter(
            "imagegen_deferred_total", description="Work deferred at peak.", tag_keys=("tier",)
        )
        self.shed = metrics.Counter(
            "imagegen_shed_total", description="Work shed with 429.", tag_keys=("tier",)
        )


@serve.deployment
class Scheduler:
    def __init__(
        self,
        config: AppConfig,
        preprocess: DeploymentHandle,
        postprocess: DeploymentHandle,
        models: dict[str, DeploymentHandle],
    ) -> None:
        self.config = config
        self.stages = StageHandles(preprocess, postprocess, models)
        self.core = SchedulerCore(config.tiers, config.scheduler, slots_per_variant(config))
        self.limiter = RateLimiter(config.tiers)
        self.store = ObjectStore(config.storage)
        self.jobs = JobStore(self.store)
        self.log = GenerationLog(
            self.store, config.storage.log, on_drop=stage_metrics().count_dropped_log_rows
        )
        self.metrics = SchedulerMetrics()
        self.waiters: dict[str, asyncio.Future[None]] = {}
        self.records: dict[str, JobRecord] = {}
        self.finished: dict[str, asyncio.Event] = {}
        self.running_jobs: dict[str, asyncio.Task[None]] = {}
        self.idempotency: dict[tuple[str, str], str] = {}
        self.waiting_callers = 0
        self._background: set[asyncio.Task[Any]] = set()
        self._recovered = asyncio.Event()
        self._idempotency_lock = asyncio.Lock()
        self._spawn(self._recover())
        self._spawn(self._reclaim_expired_leases())

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def ready(self) -> bool:
        await self._recovered.wait()
        return True

    async def stats(self) -> dict[str, Any]:
        """Queue state per variant (capacity, images in flight, queued images per tier), jobs
        running, and callers waiting for a job to finish (synchronous requests made jobs)."""
        return {
            "variants": self.core.snapshot(),
            "jobs_running": len(self.running_jobs),
            "waiting_callers": self.waiting_callers,
        }

    # ---- synchronous requests -------------------------------------------------------------

    async def acquire(self, work: WorkRequest) -> Grant:
        """Admit ``work`` and wait for its slots; raises RateLimitError or OverloadedError (429)."""
        await self._recovered.wait()
        now = time.monotonic()
        decision = self.limiter.check(work.tenant, work.tier, work.cost, now)
        if not decision.allowed:
            raise rate_limited(decision)
        ticket = Ticket(f"tkt_{uuid.uuid4().hex}", work.tenant, work.tier, work.variant, work.images)
        self._admit_or_shed(ticket, now, decision)
        waiter = asyncio.get_running_loop().create_future()
        self.waiters[ticket.id] = waiter
        self._dispatch()
        try:
            await waiter
        except asyncio.CancelledError:  # the client went away: give the place or the slots back
            if not self.core.cancel(ticket.id):
                self.core.release(ticket.id, time.monotonic(), 0)
            self.waiters.pop(ticket.id, None)
            self._dispatch()
            raise
        waited = time.monotonic() - now
        self.metrics.wait.observe(waited, tags={"tier": work.tier})
        return Grant(ticket.id, waited, ticket.deferred, decision.headers())

    async def release(self, ticket_id: str, completed_images: int) -> None:
        self.core.release(ticket_id, time.monotonic(), completed_images)
        self._dispatch()

    def _admit_or_shed(self, ticket: Ticket, now: float, decision: RateDecision) -> None:
        admission = self.core.admit(ticket, now)
        if admission.verdict == "shed":
            self.metrics.shed.inc(tags={"tier": ticket.tier})
            raise OverloadedError(
                f"The service is overloaded ({admission.reason}); retry after "
                f"{retry_after_header(admission.retry_after_s)}s.",
                headers={
                    **decision.headers(),
                    "retry-after": retry_after_header(admission.retry_after_s),
                    "x-should-retry": "true",
                },
            )
        if admission.verdict == "defer":
            self.metrics.deferred.inc(tags={"tier": ticket.tier})
        self._update_queue_metrics()

    def _dispatch(self) -> None:
        for ticket in self.core.grant(time.monotonic()):
            if ticket.is_job:
                self.running_jobs[ticket.id] = asyncio.get_running_loop().create_task(self._run_job(ticket))
                continue
            waiter = self.waiters.pop(ticket.id, None)
            if waiter is None or waiter.done():
                self.core.release(ticket.id, time.monotonic(), 0)
            else:
                waiter.set_result(None)
        self._update_queue_metrics()

    def _update_queue_metrics(self) -> None:
        for variant in self.core.variants:
            for tier in self.config.tiers:
                depth = self.core.backlog(variant, tier)
                self.metrics.queue_depth.set(depth, tags={"variant": variant, "tier": tier})

    async def _reclaim_expired_leases(self) -> None:
        while True:
            await asyncio.sleep(LEASE_CHECK_INTERVAL_S)  # a timer: leases expire by age
            for ticket_id in self.core.expired_leases(time.monotonic()):
                if ticket_id not in self.running_jobs:
                    logger.warning("reclaiming slots of %s: lease expired", ticket_id)
                    self.core.release(ticket_id, time.monotonic(), 0)
            self._dispatch()

    # ---- jobs ----------------------------------------------------------------------------

    async def submit(self, submission: JobSubmission) -> JobView:
        """Accept a job (or return the one an Idempotency-Key already names)."""
        await self._recovered.wait()
        if submission.idempotency_key is None:
            return await self._accept(submission)
        async with self._idempotency_lock:  # check-then-register must not interleave
            existing = await self._idempotent_match(submission)
            if existing is not None:
                return self._view(existing)
            return await self._accept(submission)

    async def _accept(self, submission: JobSubmission) -> JobView:
        work = submission.work
        now = time.monotonic()
        decision = self.limiter.check(work.tenant, work.tier, work.cost, now)
        if not decision.allowed:
            raise rate_limited(decision)
        record = new_record(
            submission.request,
            submission.options,
            tier=work.tier,
            quality=submission.quality,
            idempotency_key=submission.idempotency_key,
            body_sha256=submission.body_sha256,
            webhook_url=submission.webhook_url,
        )
        ticket = Ticket(record.id, work.tenant, work.tier, work.variant, work.images, is_job=True)
        self._admit_or_shed(ticket, now, decision)
        record.order_key = ticket.order_key
        self.records[record.id] = record
        self.finished[record.id] = asyncio.Event()
        idempotency = (work.tenant, submission.idempotency_key) if submission.idempotency_key else None
        if idempotency:
            self.idempotency[idempotency] = record.id  # before any await: a concurrent repeat attaches
        try:
            await asyncio.to_thread(self.jobs.save, record)  # durable before it is acknowledged
            if idempotency:
                await asyncio.to_thread(self.jobs.remember_idempotency_key, *idempotency, record.id)
        except Exception:
            self.core.cancel(ticket.id)
            self.records.pop(record.id, None)
            if idempotency:
                self.idempotency.pop(idempotency, None)
            raise
        self._dispatch()
        return dataclasses.replace(self._view(record), rate_limit_headers=decision.headers())

    async def _idempotent_match(self, submission: JobSubmission) -> JobRecord | None:
        key = submission.idempotency_key
        if key is None:
            return None
        tenant = submission.work.tenant
        job_id = self.idempotency.get((tenant, key))
        if job_id is None:
            job_id = await asyncio.to_thread(self.jobs.job_for_idempotency_key, tenant, key)
        if job_id is None:
            return None
        record = await self._record(job_id)
        if record is None:
            return None
        if record.body_sha256 != submission.body_sha256:
            raise IdempotencyConflictError(
                "This Idempotency-Key was already used with a different request body.",
                param="Idempotency-Key",
            )
        return record

    async def _record(self, job_id: str) -> JobRecord | None:
        record = self.records.get(job_id)
        if record is None:
            record = await asyncio.to_thread(self.jobs.load, job_id)
        return record

    async def get(self, tenant: str, job_id: str) -> JobView:
        record = await self._record(job_id)
        if record is None or record.tenant != tenant:  # another tenant's job does not exist for you
            raise NotFoundError(f"No job with id {job_id!r}.", param="job_id", code="job_not_found")
        return self._view(record)

    async def wait(self, tenant: str, job_id: str) -> JobView:
        """Wait until the job is finished, then return it."""
        view = await self.get(tenant, job_id)
        event = self.finished.get(job_id)
        if not view.record.is_terminal and event is not None:
            self.waiting_callers += 1
            try:
                await event.wait()
            finally:
                self.waiting_callers -= 1
        return await self.get(tenant, job_id)

    async def cancel(self, tenant: str, job_id: str) -> JobView:
        """Cancel a queued job at once, or a running one (its work stops at the next step)."""
        view = await self.get(tenant, job_id)
        record = self.records.get(job_id)
        if record is None or record.is_terminal:
            return view
        if self.core.cancel(job_id):
            await self._finish(record, "cancelled")
        elif (task := self.running_jobs.get(job_id)) is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        return await self.get(tenant, job_id)

    def _view(self, record: JobRecord) -> JobView:
        record = record.model_copy(deep=True)  # a snapshot: the live record keeps changing
        if record.status != "queued":
            return JobView(record, None, None)
        ticket = self.core.queued.get(record.id)
        if ticket is None:  # granted a moment ago: it starts now
            return JobView(record, 0, 0.0)
        ahead = self.core.backlog(ticket.variant) - ticket.images
        eta = self.core.predicted_wait_s(ticket.variant, max(ahead, 0), time.monotonic())
        return JobView(record, self.core.queue_position(record.id), eta)

    async def _run_job(self, ticket: Ticket) -> None:
        record = self.records[ticket.id]
        completed = 0
        status = "failed"
        try:
            record.status = "running"
            record.attempts += 1
            await asyncio.to_thread(self.jobs.save, record)
            options = dataclasses.replace(
                record.encode_options,
                response_format="url",
                job_id=record.id,
                job_created_at=record.created_at,
            )

            def count_attempt() -> None:
                record.attempts += 1

            stored = await self.stages.run(
                record.image_request, options, self.config.scheduler.job_attempts, on_retry=count_attempt
            )
            completed = len(stored)
            record.images = [
                JobImage(object_key=item.object_key or "", seed=item.seed, byte_count=item.byte_count)
                for item in stored
            ]
            self._log(record, stored=stored)
            status = "succeeded"
        except asyncio.CancelledError:
            status = "cancelled"
        except Exception as failure:
            error = as_api_error(failure)
            record.error_code, record.error_message = error.code or error.error_type, error.message
            record.error_status = error.status_code
            self._log(record, error_code=record.error_code)
        finally:
            self.running_jobs.pop(ticket.id, None)
            self.core.release(ticket.id, time.monotonic(), completed)
            self._dispatch()
        await self._finish(record, status)

    def _log(self, record: JobRecord, stored: Any = None, error_code: str | None = None) -> None:
        if self.config.storage.log.enabled:
            include_prompt = self.config.storage.log.include_prompt
            self.log.append(
                generation_rows(
                    record.image_request, stored, include_prompt=include_prompt, error_code=error_code
                )
            )

    async def _finish(self, record: JobRecord, status: str) -> None:
        record.status = status  # type: ignore[assignment]
        try:
            await asyncio.to_thread(self.jobs.save, record)
        except Exception:  # the record stays active in the store, so a restart finishes it again
            logger.exception("could not persist the end of job %s", record.id)
        if (event := self.finished.get(record.id)) is not None:
            event.set()
        if self.log.is_due():
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self.log.flush)
        if record.webhook_url and self.config.auth.webhook_secret is not None:  # build_app sets one
            payload = {"id": record.id, "object": "image.job", "status": record.status}
            self._spawn(
                deliver_webhook(
                    record.webhook_url,
                    payload,
                    self.config.auth.webhook_secret.get_secret_value(),
                    attempts=self.config.scheduler.webhook_attempts,
                    timeout_s=self.config.scheduler.webhook_timeout_s,
                    allow_private=self.config.scheduler.webhook_allow_private,
                )
            )

    async def _recover(self) -> None:
        """Queue again every job a previous scheduler accepted but did not finish."""
        try:
            records = await asyncio.to_thread(self.jobs.active)
            for record in records:
                record.status = "queued"
                self.records[record.id] = record
                self.finished[record.id] = asyncio.Event()
                if record.idempotency_key:
                    self.idempotency[(record.tenant, record.idempotency_key)] = record.id
                request = record.image_request
                self.core.restore(
                    Ticket(
                        record.id,
                        record.tenant,
                        record.tier,
                        request.variant,
                        request.n,
                        is_job=True,
                        enqueued_at=time.monotonic(),
                        order_key=time.monotonic(),
                    )
                )
            if records:
                logger.info("recovered %d unfinished jobs", len(records))
        except Exception:
            logger.exception("job recovery failed; new work is still accepted")
        finally:
            self._recovered.set()
            self._dispatch()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.log.flush()


def work_request(request: ImageRequest, tier: str) -> WorkRequest:
    return WorkRequest(
        tenant=request.tenant,
        tier=tier,
        variant=request.variant,
        images=request.n,
        cost=image_cost(request.width, request.height, request.steps, request.n),
    )
