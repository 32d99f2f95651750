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
import functools
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from ray import serve
from ray.serve import metrics
from ray.serve.schema import ReplicaState, ServeStatus

from autoscaling.policy import QUEUED_IMAGES, RUNNING_IMAGES, backlog_metric
from deployments.config import VariantConfig
from deployments.contracts import EncodeOptions, ImageRequest
from deployments.errors import ServiceUnavailableError, is_storage_failure
from deployments.generation_log import GenerationLog, generation_rows
from deployments.metrics import stage_metrics
from deployments.stage_chain import StageChain
from deployments.storage import ObjectStore
from serve_app.config import AppConfig
from serve_app.errors import (
    IdempotencyConflictError,
    ModelStartingError,
    NotFoundError,
    OverloadedError,
    RateLimitError,
    as_api_error,
    retry_after_header,
    status_and_type,
)
from serve_app.jobs import JobImage, JobRecord, JobStatus, JobStore, deliver_webhook, new_record
from serve_app.scheduling import (
    RateDecision,
    RateLimiter,
    SchedulerCore,
    Ticket,
    image_cost,
)

logger = logging.getLogger("ray.serve")
LEASE_CHECK_INTERVAL_S = 5.0
STORE_RETRY_FIRST_S = 0.5
STORE_RETRY_MAX_S = 30.0
CANCEL_WAIT_S = 10.0
T = TypeVar("T")
REPLICA_CHECK_INTERVAL_S = 1.0
COLD_START_RETRY_AFTER_S = 10.0  # a replica that missed the timeout is usually up soon after
WAIT_BOUNDARIES_S = [0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0]


@dataclass(frozen=True)
class WorkRequest:
    """What the ingress asks the scheduler for: slots for ``images`` images of ``variant``.

    The caller names the ticket, so it can give the slots back even when it never saw the grant.
    """

    tenant: str
    tier: str
    variant: str
    images: int
    cost: float
    end_user: str | None = None
    ticket_id: str = dataclasses.field(default_factory=lambda: f"tkt_{uuid.uuid4().hex}")


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
        retry_after_s=decision.retry_after_s,
        rate_limit_headers=decision.headers(),
    )


def slots_per_replica(config: AppConfig, variant: VariantConfig) -> int:
    return config.scheduler.slots_per_replica or 2 * variant.batching.max_batch_size


def starting_replicas(variant: VariantConfig) -> int:
    """Replicas Serve starts the variant with, until the scheduler sees the live count."""
    scaling = variant.autoscaling
    if scaling is None:
        return variant.resources.num_replicas
    return scaling.initial_replicas if scaling.initial_replicas is not None else scaling.min_replicas


def slots_per_variant(config: AppConfig) -> dict[str, int]:
    return {
        variant.name: slots_per_replica(config, variant) * starting_replicas(variant)
        for variant in config.variants
    }


def running_replicas(status: ServeStatus, app_name: str, deployment: str) -> int | None:
    """Running replicas of ``deployment`` in ``serve.status()`` (None: not listed)."""
    application = status.applications.get(app_name)
    overview = application.deployments.get(deployment) if application else None
    if overview is None:
        return None
    return overview.replica_states.get(ReplicaState.RUNNING, 0)


def cold_start_timeout(error_variant: str, timeout_s: float) -> ModelStartingError:
    return ModelStartingError(
        f"Model {error_variant!r} is starting from zero replicas and was not ready within "
        f"{timeout_s:.0f}s; retry shortly.",
        retry_after_s=COLD_START_RETRY_AFTER_S,
    )


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
    def __init__(self, config: AppConfig, chain: StageChain) -> None:
        self.config = config
        self.chain = chain
        self.core = SchedulerCore(config.tiers, config.scheduler, slots_per_variant(config))
        self.limiter = RateLimiter(config.tiers)
        self.store = ObjectStore(config.storage)
        self.jobs = JobStore(self.store)
        self.log = GenerationLog(
            self.store, config.storage.log, on_drop=stage_metrics().count_dropped_log_rows
        )
        self.metrics = SchedulerMetrics()
        self.waiters: dict[str, asyncio.Future[None]] = {}
        self.abandoned: dict[str, float] = {}  # tickets released before they were granted, by time
        self.records: dict[str, JobRecord] = {}
        self.finished: dict[str, asyncio.Event] = {}
        self.running_jobs: dict[str, asyncio.Task[None]] = {}
        self.pending_saves: dict[str, asyncio.Future[bool]] = {}  # accepted jobs not yet durable
        self.finishing: set[str] = set()
        self.idempotency: dict[tuple[str, str], str] = {}
        self.waiting_callers = 0
        self._background: set[asyncio.Task[Any]] = set()
        self._recovered = asyncio.Event()
        self._idempotency_lock = asyncio.Lock()
        self._spawn(self._recover())
        self._spawn(self._tidy_periodically())
        self._spawn(self._follow_replicas())

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def ready(self) -> bool:
        await self._recovered.wait()
        return True

    def record_autoscaling_stats(self) -> dict[str, float]:
        """The image backlog per variant, for the autoscaling policy (autoscaling/policy.py)."""
        report: dict[str, float] = {}
        for variant, queue in self.core.variants.items():
            report[backlog_metric(QUEUED_IMAGES, variant)] = self.core.backlog(variant)
            report[backlog_metric(RUNNING_IMAGES, variant)] = queue.in_use
        return report

    async def _follow_replicas(self) -> None:
        """Keep each variant's slots at its running replicas x slots per replica."""
        app_name = serve.get_replica_context().app_name
        while True:
            try:
                status = await asyncio.to_thread(serve.status)
            except Exception:  # keep the last capacity; the controller may be restarting
                logger.warning("could not read the replica count from serve.status()", exc_info=True)
            else:
                for variant in self.config.variants:
                    replicas = running_replicas(status, app_name, variant.deployment_name)
                    if replicas is not None:
                        slots = replicas * slots_per_replica(self.config, variant)
                        self.core.set_capacity(variant.name, slots)
                self._dispatch()
            await asyncio.sleep(REPLICA_CHECK_INTERVAL_S)  # a timer: Serve has no replica-count event

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
        if work.ticket_id in self.abandoned:  # its caller left before this call even started
            raise asyncio.CancelledError()
        now = time.monotonic()
        decision = self.limiter.check(work.tenant, work.tier, work.cost, now, work.end_user)
        if not decision.allowed:
            raise rate_limited(decision)
        ticket = Ticket(work.ticket_id, work.tenant, work.tier, work.variant, work.images)
        self._admit_or_shed(ticket, now, decision)
        waiter = asyncio.get_running_loop().create_future()
        self.waiters[ticket.id] = waiter
        self._dispatch()
        try:
            await self._wait_for_grant(waiter, work.variant)
        except (asyncio.CancelledError, ServiceUnavailableError):
            # The client went away, or the variant did not start in time: give the place back.
            if not self.core.cancel(ticket.id):
                self.core.release(ticket.id, time.monotonic(), 0)
            self.waiters.pop(ticket.id, None)
            self._dispatch()
            raise
        waited = time.monotonic() - now
        self.metrics.wait.observe(waited, tags={"tier": work.tier})
        return Grant(ticket.id, waited, ticket.deferred, decision.headers())

    async def _wait_for_grant(self, waiter: asyncio.Future[None], variant: str) -> None:
        """Wait for the slots; at zero replicas only for the variant's cold-start timeout."""
        scaling = next(v.autoscaling for v in self.config.variants if v.name == variant)
        if scaling is None or self.core.variants[variant].capacity:
            await waiter
            return
        await asyncio.wait({waiter}, timeout=scaling.cold_start_timeout_s)
        if not waiter.done() and not self.core.variants[variant].capacity:
            raise cold_start_timeout(variant, scaling.cold_start_timeout_s)
        await waiter

    async def release(self, ticket_id: str, completed_images: int) -> None:
        """Give a grant back. Safe in any order with its `acquire`, which a leaving caller may
        release before, while or after it runs: the ticket is then never granted, or freed."""
        now = time.monotonic()
        if not self.core.release(ticket_id, now, completed_images):
            self.core.cancel(ticket_id)
            if (waiter := self.waiters.pop(ticket_id, None)) is not None:
                waiter.cancel()
            self.abandoned[ticket_id] = now
        self._dispatch()

    def _admit_or_shed(self, ticket: Ticket, now: float, decision: RateDecision) -> None:
        admission = self.core.admit(ticket, now)
        if admission.verdict == "shed":
            self.metrics.shed.inc(tags={"tier": ticket.tier})
            raise OverloadedError(
                f"The service is overloaded ({admission.reason}); retry after "
                f"{retry_after_header(admission.retry_after_s)}s.",
                retry_after_s=admission.retry_after_s,
                rate_limit_headers=decision.headers(),
            )
        if admission.verdict == "defer":
            self.metrics.deferred.inc(tags={"tier": ticket.tier})
        self._update_queue_metrics()

    def _dispatch(self) -> None:
        for ticket in self.core.grant(time.monotonic()):
            if ticket.is_job:
                self._start_job(ticket.id)
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

    async def _tidy_periodically(self) -> None:
        while True:
            await asyncio.sleep(LEASE_CHECK_INTERVAL_S)  # a timer: leases and memory expire by age
            self._reclaim_expired_leases(time.monotonic())
            self.forget_finished_jobs(time.time())

    def forget_finished_jobs(self, now: float) -> None:
        """Drop jobs finished over ``job_memory_s`` ago from memory (the store keeps them)."""
        cutoff = now - self.config.scheduler.job_memory_s
        forgotten = {
            job_id
            for job_id, record in self.records.items()
            if record.is_terminal and record.completed_at is not None and record.completed_at <= cutoff
        }
        for job_id in forgotten:
            del self.records[job_id]
            self.finished.pop(job_id, None)
        self.idempotency = {
            key: job_id for key, job_id in self.idempotency.items() if job_id not in forgotten
        }

    def _reclaim_expired_leases(self, now: float) -> None:
        for ticket_id in self.core.expired_leases(now):
            if ticket_id not in self.running_jobs:
                logger.warning("reclaiming slots of %s: lease expired", ticket_id)
                self.core.release(ticket_id, now, 0)
        lease_s = self.config.scheduler.lease_s
        self.abandoned = {ticket_id: at for ticket_id, at in self.abandoned.items() if now - at < lease_s}
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
        decision = self.limiter.check(work.tenant, work.tier, work.cost, now, work.end_user)
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
        # The job may be granted while its record is saved: it starts only once the save is done.
        saved = self.pending_saves[record.id] = asyncio.get_running_loop().create_future()
        try:
            await asyncio.to_thread(self.jobs.save, record)  # durable before it is acknowledged
            if idempotency:
                await asyncio.to_thread(self.jobs.remember_idempotency_key, *idempotency, record.id)
        except Exception:
            saved.set_result(False)
            self.core.cancel(ticket.id)
            self.records.pop(record.id, None)
            self.finished.pop(record.id, None)
            if idempotency:
                self.idempotency.pop(idempotency, None)
            raise
        else:
            saved.set_result(True)
        finally:
            del self.pending_saves[record.id]
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
            await self._finish_within(record, "cancelled")
        elif (task := self.running_jobs.get(job_id)) is not None:
            task.cancel()  # a job that had not started yet ends without running a step
            await asyncio.wait({task}, timeout=CANCEL_WAIT_S)
            if task.done() and job_id not in self.finishing and not self.records[job_id].is_terminal:
                await self._finish_within(record, "cancelled")
        return await self.get(tenant, job_id)

    async def _finish_within(self, record: JobRecord, status: JobStatus) -> None:
        """Finish a job, waiting a bounded time for its record to be stored (it keeps trying after)."""
        finishing = asyncio.get_running_loop().create_task(self._finish(record, status))
        self._background.add(finishing)
        finishing.add_done_callback(self._background.discard)
        await asyncio.wait({finishing}, timeout=CANCEL_WAIT_S)

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

    def _start_job(self, job_id: str) -> None:
        task = asyncio.get_running_loop().create_task(self._run_job(job_id))
        self.running_jobs[job_id] = task
        # Also when the task is cancelled before its first step (its `finally` never runs then).
        task.add_done_callback(lambda _: self._release_job(job_id))

    def _release_job(self, job_id: str) -> None:
        """Give a job's slots back; once per grant, however often it is called."""
        self.running_jobs.pop(job_id, None)
        record = self.records.get(job_id)
        if self.core.release(job_id, time.monotonic(), len(record.images) if record else 0):
            self._dispatch()

    async def _run_job(self, job_id: str) -> None:
        pending_save = self.pending_saves.get(job_id)
        if pending_save is not None and not await pending_save:
            return  # its record could not be saved: the client was told, and it must not run
        record = self.records.get(job_id)
        if record is None or record.is_terminal or job_id in self.finishing:
            return
        deadline = time.monotonic() + self.config.scheduler.job_store_retry_s
        status: JobStatus = "failed"
        try:
            record.status = "running"
            record.attempts += 1
            await self._retry_storage(functools.partial(asyncio.to_thread, self.jobs.save, record), deadline)
            options = dataclasses.replace(
                record.encode_options,
                response_format="url",
                job_id=record.id,
                job_created_at=record.created_at,
            )

            def count_attempt() -> None:
                record.attempts += 1

            run = functools.partial(
                self.chain.make_images,
                record.image_request,
                options,
                self.config.scheduler.job_attempts,
                on_retry=count_attempt,
            )
            stored = await self._retry_storage(run, deadline)
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
            record.error_status, record.error_type = status_and_type(error)
            record.error_code, record.error_message = error.code or record.error_type, error.message
            self._log(record, error_code=record.error_code)
        finally:
            self._release_job(job_id)
        await self._finish(record, status)

    @staticmethod
    async def _retry_storage(call: Callable[[], Awaitable[T]], deadline: float) -> T:
        """Run ``call``, retrying storage failures with backoff until ``deadline`` (monotonic)."""
        delay = STORE_RETRY_FIRST_S
        while True:
            try:
                return await call()
            except Exception as failure:
                if not is_storage_failure(failure) or time.monotonic() + delay > deadline:
                    raise
                logger.warning("object store failing; retrying in %.1fs: %r", delay, failure)
            await asyncio.sleep(delay)  # backoff while the store is down
            delay = min(2 * delay, STORE_RETRY_MAX_S)

    def _log(self, record: JobRecord, stored: Any = None, error_code: str | None = None) -> None:
        if self.config.storage.log.enabled:
            include_prompt = self.config.storage.log.include_prompt
            self.log.append(
                generation_rows(
                    record.image_request, stored, include_prompt=include_prompt, error_code=error_code
                )
            )

    async def _finish(self, record: JobRecord, status: JobStatus) -> None:
        """Make a job's outcome final: stored first, then visible, then announced; once per job.

        The terminal record is saved until the store takes it (a restart before then runs the
        job again, which is safe: nobody has seen an outcome). Only then do pollers and waiters
        see it and is the webhook sent, so an outcome never changes and is announced once.
        """
        if record.id in self.finishing or record.is_terminal:
            return
        self.finishing.add(record.id)
        try:
            final = record.model_copy(update={"status": status})
            await self._retry_storage(
                functools.partial(asyncio.to_thread, self.jobs.save, final), deadline=float("inf")
            )
            self.records[record.id] = final
        finally:
            self.finishing.discard(record.id)
        request = final.image_request
        uploads = [*request.input_keys, *([request.mask_key] if request.mask_key else [])]
        for key in uploads:  # a finished job never runs again: its stashed uploads can go
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self.store.delete, key)
        if (event := self.finished.get(record.id)) is not None:
            event.set()
        if self.log.is_due():
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self.log.flush)
        if final.webhook_url and self.config.auth.webhook_secret is not None:  # checked at submission
            payload = {"id": final.id, "object": "image.job", "status": final.status}
            self._spawn(
                deliver_webhook(
                    final.webhook_url,
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
                if record.is_terminal:  # it finished, but the scheduler stopped before the marker went
                    await asyncio.to_thread(self.jobs.forget_active, record.id)
                    continue
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
        end_user=request.safety_identifier,
    )
