"""The scheduler deployment: slot admission for every request, and the jobs. Control state only.

Synchronous and streamed requests ask for slots (`acquire`), run the stage chain themselves and
give the slots back (`release`). Jobs (``Prefer: respond-async`` or an ``Idempotency-Key``) are
submitted here and run here when their turn comes; `JobLifecycle` (serve_app/job_lifecycle.py)
holds their records and runs them, `SchedulerCore` (serve_app/admission_policy.py) decides who
gets slots when. This module wires the two to Ray: the one replica, its timers, its metrics.
With ``scheduler.colocate`` the same object runs in the ingress's process instead
(`ColocatedScheduler`), called through `InProcessHandle` as through its deployment's handle.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any

from ray import serve
from ray.serve import metrics
from ray.serve.exceptions import RayServeException
from ray.serve.schema import ReplicaState, ServeStatus

from autoscaling.policy import QUEUED_IMAGES, RUNNING_IMAGES, backlog_metric
from deployments.config import VariantConfig
from deployments.errors import ServiceUnavailableError, quiet_serve_logs
from deployments.generation_log import GenerationLog
from deployments.in_process import InProcessHandle
from deployments.metrics import stage_metrics
from deployments.stage_chain import StageChain
from deployments.storage import ObjectStore
from serve_app.admission_policy import (
    Admission,
    RateDecision,
    RateLimiter,
    SchedulerCore,
    Ticket,
    WorkRequest,
)
from serve_app.config import AppConfig
from serve_app.errors import (
    ModelStartingError,
    NotFoundError,
    OverloadedError,
    RateLimitError,
    retry_after_header,
)
from serve_app.job_lifecycle import JobLifecycle, JobSubmission, JobView
from serve_app.retention import RetentionPolicy, sweep_periodically
from serve_app.webhook_outbox import outbox_from_config

logger = logging.getLogger("ray.serve")
LEASE_CHECK_INTERVAL_S = 5.0
REPLICA_CHECK_INTERVAL_S = 1.0
COLD_START_RETRY_AFTER_S = 10.0  # a replica that missed the timeout is usually up soon after
WAIT_BOUNDARIES_S = [0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0]


Release = tuple[str, int]  # a ticket given back, and how many of its images were made


@dataclass(frozen=True)
class Grant:
    ticket_id: str
    waited_s: float
    deferred: bool
    rate_limit_headers: dict[str, str]


def rate_limited(decision: RateDecision) -> RateLimitError:
    return RateLimitError(
        f"Rate limit reached for this API key; retry in {decision.retry_after_s:.1f}s.",
        retry_after_s=decision.retry_after_s,
        rate_limit_headers=decision.headers(),
    )


def overloaded(admission: Admission, decision: RateDecision) -> OverloadedError:
    return OverloadedError(
        f"The service is overloaded ({admission.reason}); retry after "
        f"{retry_after_header(admission.retry_after_s)}s.",
        retry_after_s=admission.retry_after_s,
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


def autoscaled_variants(config: AppConfig) -> list[VariantConfig]:
    """The variants whose slots follow their running replicas; a fixed ``num_replicas`` never moves."""
    return [variant for variant in config.variants if variant.autoscaling is not None]


def running_replicas(status: ServeStatus, app_name: str, deployment: str) -> int | None:
    """Running replicas of ``deployment`` in ``serve.status()`` (None: not listed)."""
    application = status.applications.get(app_name)
    overview = application.deployments.get(deployment) if application else None
    if overview is None:
        return None
    return overview.replica_states.get(ReplicaState.RUNNING, 0)


def live_replicas(status: ServeStatus, app_name: str, deployment: str) -> int | None:
    """Replicas of ``deployment`` in ``serve.status()`` in any state: starting, running, stopping
    (None: not listed)."""
    application = status.applications.get(app_name)
    overview = application.deployments.get(deployment) if application else None
    if overview is None:
        return None
    return sum(overview.replica_states.values())


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
        quiet_serve_logs()
        self.config = config
        self.chain = chain
        self.core = SchedulerCore(config.tiers, config.scheduler, slots_per_variant(config))
        self.limiter = RateLimiter(config.tiers)
        store = ObjectStore(config.storage)
        self.log = GenerationLog(store, config.storage.log, on_drop=stage_metrics().count_dropped_log_rows)
        outbox = outbox_from_config(config, store)  # None: webhooks are refused
        self.jobs = JobLifecycle(
            config, chain, store, self.log, self.core, self.admit, self._dispatch, outbox
        )
        self.metrics = SchedulerMetrics()
        self.waiters: dict[str, asyncio.Future[None]] = {}
        self.abandoned: dict[str, float] = {}  # tickets released before they were granted, by time
        self._background: set[asyncio.Task[Any]] = set()
        self._recovered = asyncio.Event()
        self._spawn(self._recover())
        self._spawn(self._tidy_periodically())
        if autoscaled_variants(config):  # polling Serve costs a core's 5% at idle: only when needed
            self._spawn(self._follow_replicas())
        retention = RetentionPolicy.from_config(config.scheduler)
        sweep_every_s = config.scheduler.retention_sweep_interval_s
        self._spawn(sweep_periodically(self.jobs.job_store, retention, sweep_every_s))
        if outbox is not None:
            self._spawn(outbox.run())

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _recover(self) -> None:
        try:
            await self._outlive_predecessor()
            await self.jobs.recover()
        finally:
            self._recovered.set()
            self._dispatch()

    async def _outlive_predecessor(self) -> None:
        """Wait while another replica of this deployment lives: during a rollout the old one
        finishes its calls and its running jobs are cut only when it stops, so the jobs are
        recovered (and run again) here only once nothing else can be running them."""
        try:
            context = serve.get_replica_context()
        except RayServeException:  # a plain object, not a Serve replica: it has no predecessor
            return
        app_name, deployment = context.app_name, context.deployment
        while True:
            try:
                status = await asyncio.to_thread(serve.status)
            except Exception:  # the controller may be restarting; ask again
                logger.warning("could not read the scheduler's replicas from serve.status()", exc_info=True)
            else:
                replicas = live_replicas(status, app_name, deployment)
                if replicas is None or replicas <= 1:  # None: not listed, so none other either
                    return
            await asyncio.sleep(REPLICA_CHECK_INTERVAL_S)  # a timer: Serve has no replica-stopped event

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
                for variant in autoscaled_variants(self.config):
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
            "jobs_running": len(self.jobs.running_jobs),
            "waiting_callers": self.jobs.waiting_callers,
        }

    # ---- synchronous requests -------------------------------------------------------------

    async def acquire(self, work: WorkRequest, released: list[Release] | None = None) -> Grant:
        """Admit ``work`` and wait for its slots; raises RateLimitError or OverloadedError (429).
        ``released``: the caller's grants given back since its last call, freed first (a release
        rides on an acquire instead of costing a round trip of its own)."""
        await self._recovered.wait()
        if released:
            self._give_back(released)
        if work.ticket_id in self.abandoned:  # its caller left before this call even started
            raise asyncio.CancelledError()
        now = time.monotonic()
        ticket = Ticket(work.ticket_id, work.tenant, work.tier, work.variant, work.images)
        decision = self.admit(work, ticket)
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

    async def release_all(self, releases: list[Release]) -> None:
        """Give grants back (the ingress batches them). Safe in any order with a ticket's
        `acquire`, which a leaving caller may release before, while or after it runs: the ticket
        is then never granted, or freed. Idempotent: a second release of a ticket frees nothing."""
        self._give_back(releases)

    def _give_back(self, releases: list[Release]) -> None:
        now = time.monotonic()
        for ticket_id, completed_images in releases:
            if not self.core.release(ticket_id, now, completed_images):
                self.core.cancel(ticket_id)
                if (waiter := self.waiters.pop(ticket_id, None)) is not None:
                    waiter.cancel()
                self.abandoned[ticket_id] = now
        self._dispatch()

    def admit(self, work: WorkRequest, ticket: Ticket) -> RateDecision:
        """Rate-check ``work`` and queue its ticket; raises RateLimitError or OverloadedError (429)."""
        self._check_variant(work)
        now = time.monotonic()
        decision = self.limiter.check(work.tenant, work.tier, work.cost, now, work.end_user)
        if not decision.allowed:
            raise rate_limited(decision)
        admission = self.core.admit(ticket, now)
        if admission.verdict == "shed":
            self.metrics.shed.inc(tags={"tier": ticket.tier})
            raise overloaded(admission, decision)
        if admission.verdict == "defer":
            self.metrics.deferred.inc(tags={"tier": ticket.tier})
        self._update_queue_metrics()
        return decision

    def _check_variant(self, work: WorkRequest) -> None:
        """A 404 for a variant this scheduler does not serve: one removed by a rollout after the
        ingress planned the request (see docs/researchers.md), never a server error."""
        if work.variant not in self.core.variants:
            raise NotFoundError(
                f"The model {work.variant!r} does not exist. See GET /v1/models.",
                param="model",
                code="model_not_found",
            )

    def _dispatch(self) -> None:
        for ticket in self.core.grant(time.monotonic()):
            if ticket.is_job:
                self.jobs.start(ticket.id)
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
            self.jobs.forget_finished_jobs(time.time())

    def _reclaim_expired_leases(self, now: float) -> None:
        for ticket_id in self.core.expired_leases(now):
            if ticket_id not in self.jobs.running_jobs:
                logger.warning("reclaiming slots of %s: lease expired", ticket_id)
                self.core.release(ticket_id, now, 0)
        lease_s = self.config.scheduler.lease_s
        self.abandoned = {ticket_id: at for ticket_id, at in self.abandoned.items() if now - at < lease_s}
        self._dispatch()

    # ---- jobs: JobLifecycle, on the scheduler's one replica ----------------------------------

    async def check_admission(self, work: WorkRequest) -> None:
        """Raise the 429 that `submit` would raise now, taking nothing: a job's uploads are
        written to the store only once this passes."""
        await self._recovered.wait()
        self._check_variant(work)
        now = time.monotonic()
        decision = self.limiter.check(work.tenant, work.tier, work.cost, now, work.end_user, take=False)
        if not decision.allowed:
            raise rate_limited(decision)
        ticket = Ticket(work.ticket_id, work.tenant, work.tier, work.variant, work.images, is_job=True)
        if (admission := self.core.preview(ticket, now)).verdict == "shed":
            raise overloaded(admission, decision)

    async def submit(self, submission: JobSubmission) -> JobView:
        """Accept a job (or return the one an Idempotency-Key already names)."""
        await self._recovered.wait()
        return await self.jobs.submit(submission)

    async def get(self, tenant: str, job_id: str) -> JobView:
        return await self.jobs.get(tenant, job_id)

    async def wait(self, tenant: str, job_id: str) -> JobView:
        """Wait until the job is finished, then return it."""
        await self._recovered.wait()  # a scheduler that took over from another knows its jobs then
        return await self.jobs.wait(tenant, job_id)

    async def cancel(self, tenant: str, job_id: str) -> JobView:
        """Cancel a queued job at once, or a running one (its work stops at the next step)."""
        return await self.jobs.cancel(tenant, job_id)

    def close(self) -> None:
        """Write the jobs' buffered generation-log rows (at a graceful shutdown)."""
        with contextlib.suppress(Exception):
            self.log.flush()

    def __del__(self) -> None:
        self.close()


@dataclass(frozen=True)
class ColocatedScheduler:
    """The scheduler that runs in the ingress's own process (``scheduler.colocate``), bound into
    the ingress in place of the deployment; the ingress starts it as it starts."""

    config: AppConfig

    def start(self, chain: StageChain) -> InProcessHandle:
        """The scheduler, built here on ``chain`` (the ingress's, whose model replicas may live in
        this process too), on the running event loop: its timers start at once."""
        scheduler_class = Scheduler.func_or_class  # type: ignore[attr-defined]  # the class under @serve.deployment
        return InProcessHandle(scheduler_class(self.config, chain))
