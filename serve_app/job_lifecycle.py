"""A job's life from acceptance to its stored, announced outcome: plain asyncio, no Ray.

`JobLifecycle` is the scheduler's job half (serve_app/scheduler.py owns one); slot admission and
order stay in `SchedulerCore` (serve_app/admission_policy.py), which it is given. In order:

1. ``submit``: an ``Idempotency-Key`` already seen returns its job (a different body is a 422);
   otherwise the job is admitted (``admit``: rate limits, backlog) and saved to the store
   before it is acknowledged. A save that fails un-admits it, and the client is told.
2. ``start``, once ``SchedulerCore`` grants its slots: the job runs the stage chain with its
   stable object keys; storage failures are retried until ``job_store_retry_s``, a replica that
   dies under it is run again up to ``job_attempts`` times.
3. ``finish``: the webhook (when asked for) goes to the durable outbox, then the outcome is
   stored, then visible to pollers and waiters, then the webhook is sent; once per job. A
   cancelled job finishes the same way.
4. ``recover``, at start: every job whose record is not finished is queued again.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from deployments.contracts import EncodeOptions, ImageRequest
from deployments.errors import is_storage_failure
from deployments.generation_log import GenerationLog
from deployments.stage_chain import StageChain
from deployments.storage import ObjectStore
from serve_app.admission_policy import RateDecision, SchedulerCore, Ticket, WorkRequest
from serve_app.config import AppConfig
from serve_app.errors import IdempotencyConflictError, NotFoundError, as_api_error, status_and_type
from serve_app.jobs import JobImage, JobRecord, JobStore, new_record
from serve_app.protocol import JobStatus
from serve_app.webhook_outbox import WebhookDelivery, WebhookOutbox, delivery_for_job

logger = logging.getLogger("ray.serve")
STORE_RETRY_FIRST_S = 0.5
STORE_RETRY_MAX_S = 30.0
CANCEL_WAIT_S = 10.0
T = TypeVar("T")
Admit = Callable[[WorkRequest, Ticket], RateDecision]
"""Rate-check and admit a ticket (raises the 429 when it may not queue); the decision's headers."""


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


class JobLifecycle:
    """Every job's record, run and outcome; see the module docstring for the order of events."""

    def __init__(
        self,
        config: AppConfig,
        chain: StageChain,
        store: ObjectStore,
        log: GenerationLog,
        core: SchedulerCore,
        admit: Admit,
        dispatch: Callable[[], None],
        outbox: WebhookOutbox | None = None,
    ) -> None:
        self.config = config
        self.chain = chain
        self.store = store
        self.job_store = JobStore(store)
        self.log = log
        self.core = core
        self.admit = admit
        self.dispatch = dispatch
        self.outbox = outbox  # None: webhooks are refused at submission
        self.records: dict[str, JobRecord] = {}
        self.finished: dict[str, asyncio.Event] = {}
        self.running_jobs: dict[str, asyncio.Task[None]] = {}
        self.pending_saves: dict[str, asyncio.Future[bool]] = {}  # accepted jobs not yet durable
        self.finishing: set[str] = set()
        self.idempotency: dict[tuple[str, str], str] = {}
        self.waiting_callers = 0
        self._background: set[asyncio.Task[Any]] = set()
        self._idempotency_lock = asyncio.Lock()

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def submit(self, submission: JobSubmission) -> JobView:
        """Accept a job (or return the one an Idempotency-Key already names)."""
        if submission.idempotency_key is None:
            return await self._accept(submission)
        async with self._idempotency_lock:  # check-then-register must not interleave
            existing = await self._idempotent_match(submission)
            if existing is not None:
                return self._view(existing)
            return await self._accept(submission)

    async def _accept(self, submission: JobSubmission) -> JobView:
        work = submission.work
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
        decision = self.admit(work, ticket)
        record.order_key = ticket.order_key
        self.records[record.id] = record
        self.finished[record.id] = asyncio.Event()
        idempotency = (work.tenant, submission.idempotency_key) if submission.idempotency_key else None
        if idempotency:
            self.idempotency[idempotency] = record.id  # before any await: a concurrent repeat attaches
        # The job may be granted while its record is saved: it starts only once the save is done.
        saved = self.pending_saves[record.id] = asyncio.get_running_loop().create_future()
        try:
            await asyncio.to_thread(self.job_store.save, record)  # durable before it is acknowledged
            if idempotency:
                await asyncio.to_thread(self.job_store.remember_idempotency_key, *idempotency, record.id)
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
        self.dispatch()
        return dataclasses.replace(self._view(record), rate_limit_headers=decision.headers())

    async def _idempotent_match(self, submission: JobSubmission) -> JobRecord | None:
        key = submission.idempotency_key
        if key is None:
            return None
        tenant = submission.work.tenant
        job_id = self.idempotency.get((tenant, key))
        if job_id is None:
            job_id = await asyncio.to_thread(self.job_store.job_for_idempotency_key, tenant, key)
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
            record = await asyncio.to_thread(self.job_store.load, job_id)
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

    def start(self, job_id: str) -> None:
        """Run a job whose slots were granted."""
        task = asyncio.get_running_loop().create_task(self._run_job(job_id))
        self.running_jobs[job_id] = task
        # Also when the task is cancelled before its first step (its `finally` never runs then).
        task.add_done_callback(lambda _: self._release_job(job_id))

    def _release_job(self, job_id: str) -> None:
        """Give a job's slots back; once per grant, however often it is called."""
        self.running_jobs.pop(job_id, None)
        record = self.records.get(job_id)
        if self.core.release(job_id, time.monotonic(), len(record.images) if record else 0):
            self.dispatch()

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
            save = functools.partial(asyncio.to_thread, self.job_store.save, record)
            await self._retry_storage(save, deadline)
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
                self.config.timeouts.pipeline_s,
                on_retry=count_attempt,
            )
            stored = await self._retry_storage(run, deadline)
            record.images = [
                JobImage(object_key=item.object_key or "", seed=item.seed, byte_count=item.byte_count)
                for item in stored
            ]
            self.log.record(record.image_request, stored)
            status = "succeeded"
        except asyncio.CancelledError:
            status = "cancelled"
        except Exception as failure:
            error = as_api_error(failure)
            record.error_status, record.error_type = status_and_type(error)
            record.error_code, record.error_message = error.code or record.error_type, error.message
            self.log.record(record.image_request, None, error_code=record.error_code)
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

    async def _finish(self, record: JobRecord, status: JobStatus) -> None:
        """Make a job's outcome final: stored first, then visible, then announced; once per job.

        The terminal record is saved until the store takes it (a restart before then runs the
        job again, which is safe: nobody has seen an outcome). Only then do pollers and waiters
        see it and is the webhook sent, so an outcome never changes and is announced once.
        """
        if record.id in self.finishing or record.is_terminal:
            return
        self.finishing.add(record.id)
        webhook = self._webhook_for(record, status)
        try:
            if webhook is not None:  # stored before the outcome, so no restart can lose it
                save_webhook = functools.partial(asyncio.to_thread, self._outbox().save, webhook)
                await self._retry_storage(save_webhook, deadline=float("inf"))
            final = record.model_copy(update={"status": status})
            await self._retry_storage(
                functools.partial(asyncio.to_thread, self.job_store.save, final), deadline=float("inf")
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
        if webhook is not None:
            self._outbox().arm(webhook)

    def _webhook_for(self, record: JobRecord, status: JobStatus) -> WebhookDelivery | None:
        """The webhook announcing ``status``, when the job asked for one (and webhooks are on)."""
        if record.webhook_url is None or self.outbox is None:  # checked at submission
            return None
        payload = {"id": record.id, "object": "image.job", "status": status}
        return delivery_for_job(record.id, record.webhook_url, payload, time.time())

    def _outbox(self) -> WebhookOutbox:
        assert self.outbox is not None, "a job's webhook is only made when the outbox exists"
        return self.outbox

    def _is_final(self, job_id: str) -> bool:
        record = self.job_store.load(job_id)
        return record is not None and record.is_terminal

    async def recover(self) -> None:
        """Queue again every job a previous scheduler accepted but did not finish."""
        try:
            records = await asyncio.to_thread(self.job_store.active)
            for record in records:
                if record.is_terminal:  # it finished, but the scheduler stopped before the marker went
                    await asyncio.to_thread(self.job_store.forget_active, record.id)
                    continue
                self.records[record.id] = record
                self.finished[record.id] = asyncio.Event()
                if record.idempotency_key:
                    self.idempotency[(record.tenant, record.idempotency_key)] = record.id
                request = record.image_request
                if request.variant not in self.core.variants:
                    await self._fail_unservable(record)
                    continue
                record.status = "queued"
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
            if self.outbox is not None:
                await self.outbox.recover(self._is_final)
        except Exception:
            logger.exception("job recovery failed; new work is still accepted")

    async def _fail_unservable(self, record: JobRecord) -> None:
        """A recovered job whose variant is no longer served (removed while the job was still
        unfinished, and the scheduler stopped): it fails with the 404 a new request for that
        model gets, instead of stopping the recovery of every other job."""
        variant = record.image_request.variant
        error = NotFoundError(
            f"The model {variant!r} was removed before this job ran. See GET /v1/models.",
            param="model",
            code="model_not_found",
        )
        record.error_status, record.error_type = status_and_type(error)
        record.error_code, record.error_message = error.code, error.message
        await self._finish(record, "failed")

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
