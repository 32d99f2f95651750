"""Everything behind the routes, without HTTP: plan a typed request, then answer it as asked.

`ImageService` is a plain object the ingress deployment owns. The routes read the body into a
typed object (serve_app/uploads.py) and hand it here; the steps then read in order:
plan (find the variant, validate, resolve defaults) -> take the request's path (`Delivery.path`)
-> admit (scheduler) -> run the stage chain -> answer. Jobs go through `JobClient`
(serve_app/job_client.py), URLs of stored images through `SignedFiles`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Iterator

from deployments.call_timeouts import bounded, each_within
from deployments.config import VariantConfig
from deployments.contracts import StoredImage
from deployments.errors import (
    InvalidRequestError,
    StorageUnavailableError,
    is_storage_failure,
)
from deployments.generation_log import GenerationLog
from deployments.in_process import StageHandle
from deployments.metrics import stage_metrics
from deployments.resilience import CircuitOpenError
from deployments.stage_chain import StageChain
from deployments.storage import ObjectStore
from serve_app.admission_policy import work_request
from serve_app.aliases import Routing, caller_identity, resolve_model
from serve_app.answers import (
    Completed,
    Delivery,
    Outcome,
    PlannedRequest,
    ResponseFields,
    Streaming,
    images_response,
    response_background,
    server_timing,
    variant_headers,
    wants_async,
)
from serve_app.auth import KeyRing, Principal
from serve_app.config import AppConfig
from serve_app.errors import NotFoundError, as_api_error
from serve_app.job_client import JobClient
from serve_app.jobs import check_webhook_url, new_job_id
from serve_app.planning import PlanTarget, plan_edit, plan_generation, plan_variation, resolve_quality
from serve_app.protocol import ImageData, ImageFields, ModelCard, ModelList
from serve_app.scheduler import Grant
from serve_app.signed_files import SignedFiles
from serve_app.slot_client import SlotClient
from serve_app.streaming import StreamDescription, estimate_usage, event_stream
from serve_app.uploads import EditUpload, GenerationBody, VariationUpload

READY_TIMEOUT_S = 5.0
LOG_CHECK_INTERVAL_S = 1.0
logger = logging.getLogger("imagegen.service")


class ImageService:
    def __init__(self, config: AppConfig, chain: StageChain, scheduler: StageHandle) -> None:
        self.config = config
        self.chain = chain
        self.scheduler = scheduler
        self.keyring = KeyRing.load(config.auth.keys_file, set(config.tiers))
        self.store = ObjectStore(config.storage)
        self.files = SignedFiles(self.store, config.storage)
        self.timeouts = config.timeouts
        self.jobs = JobClient(scheduler, self.store, self.files, config.timeouts)
        self.slots = SlotClient(scheduler, config.timeouts.slot_wait_s)
        self.created = int(time.time())
        self.routing = Routing(config.aliases)
        self.log = GenerationLog(
            self.store, config.storage.log, on_drop=stage_metrics().count_dropped_log_rows
        )
        self._log_flusher: asyncio.Task[None] | None = None

    def set_routing(self, user_config: dict[str, object]) -> None:
        """Apply the ingress's ``user_config`` (see `Routing`): new requests follow it at once."""
        self.routing = Routing.from_user_config(
            user_config, [variant.name for variant in self.config.variants]
        )

    def authenticate(self, authorization: str | None) -> Principal:
        return self.keyring.authenticate(authorization)

    # ---- planning: typed request -> PlannedRequest -----------------------------------------

    def find_variant(
        self, model: str | None, end_user: str | None, tenant: str
    ) -> tuple[VariantConfig, str | None]:
        """The variant a request's ``model`` (a variant, an alias, or none: the default) runs on,
        and the alias it was chosen through."""
        names = self.routing.serving([variant.name for variant in self.config.variants])
        wanted = model or self.config.default_model or next(iter(names), "")
        choice = resolve_model(wanted, names, self.routing.aliases, caller_identity(end_user, tenant))
        if choice is None:
            raise NotFoundError(
                f"The model {model!r} does not exist. See GET /v1/models.",
                param="model",
                code="model_not_found",
            )
        variant = self.config.variant(choice.variant)
        assert variant is not None  # resolve_model returns configured variants only
        return variant, choice.alias

    def plan_target(
        self,
        request: ImageFields,
        end_user: str | None,
        principal: Principal,
        request_id: str,
        delivery: Delivery,
    ) -> PlanTarget:
        """The variant (and alias) a request runs on, its id (jobs get their own), its moderation."""
        variant, alias = self.find_variant(request.model, end_user, principal.tenant)
        return PlanTarget(
            variant,
            self.config.limits,
            request_id=self.work_id(request_id, delivery),
            tenant=principal.tenant,
            moderation_checks=self.config.moderation.checks_for(principal.tier, variant.name),
            alias=alias,
        )

    def work_id(self, request_id: str, delivery: Delivery) -> str:
        """Jobs get their own ids (they outlive the HTTP request); other requests keep Serve's."""
        if delivery.idempotency_key is not None and not 0 < len(delivery.idempotency_key) <= 255:
            raise InvalidRequestError("Idempotency-Key must be 1-255 characters.", param="Idempotency-Key")
        if delivery.webhook_url is not None and not wants_async(delivery.prefer):
            raise InvalidRequestError("webhook_url needs 'Prefer: respond-async'.", param="webhook_url")
        if delivery.as_job and delivery.stream:
            raise InvalidRequestError(
                "stream=true cannot be combined with 'Prefer: respond-async' or an Idempotency-Key.",
                param="stream",
            )
        return new_job_id() if delivery.as_job else request_id

    async def generate(
        self, body: GenerationBody, principal: Principal, request_id: str, delivery: Delivery
    ) -> Outcome:
        request, delivery = body.request, delivery.with_body(body.body_sha256, body.request)
        target = self.plan_target(request, request.end_user, principal, request_id, delivery)
        fields = ResponseFields("image_generation", resolve_quality(request.quality), request.prompt)
        planned = PlannedRequest(*plan_generation(request, target), fields)
        return await self.answer(planned, principal, delivery)

    async def edit(
        self, upload: EditUpload, principal: Principal, request_id: str, delivery: Delivery
    ) -> Outcome:
        request, delivery = upload.request, delivery.with_body(upload.body_sha256, upload.request)
        target = self.plan_target(request, request.end_user, principal, request_id, delivery)
        fields = ResponseFields("image_edit", resolve_quality(request.quality), request.prompt)
        edit = plan_edit(request, upload.images, upload.mask, target, upload.markup)
        return await self.answer(PlannedRequest(*edit, fields), principal, delivery)

    async def variation(
        self, upload: VariationUpload, principal: Principal, request_id: str, delivery: Delivery
    ) -> Outcome:
        delivery = delivery.with_body(upload.body_sha256)
        target = self.plan_target(upload.request, upload.request.user, principal, request_id, delivery)
        fields = ResponseFields("image_edit", resolve_quality("auto"), None)
        planned = PlannedRequest(*plan_variation(upload.request, upload.images, target), fields)
        return await self.answer(planned, principal, delivery)

    # ---- answering: one path per kind of request (docs/architecture.md) ----------------------

    async def answer(self, planned: PlannedRequest, principal: Principal, delivery: Delivery) -> Outcome:
        """Run a planned request the way the client asked: as a job, idempotently, streamed, or now."""
        if delivery.webhook_url is not None:
            await self.check_webhook(delivery.webhook_url)
        stores = delivery.as_job or planned.options.response_format == "url"  # job images are stored
        outcome: Outcome
        with self.storage_guard() if stores else contextlib.nullcontext():
            match delivery.path:
                case "async_job":
                    outcome = await self.jobs.submit(planned, principal, delivery)
                case "idempotent":
                    outcome = await self.jobs.submit_and_wait(planned, principal, delivery)
                case "streamed" | "sync":
                    outcome = await self._run_now(planned, principal, delivery)
        return dataclasses.replace(outcome, headers={**outcome.headers, **variant_headers(planned.request)})

    async def check_webhook(self, url: str) -> None:
        """A 400 for a URL we would not call, or when no secret is configured to sign the call with."""
        if self.config.auth.webhook_secret is None:  # the cheap check first: no DNS lookup for nothing
            raise InvalidRequestError(
                "Webhooks are not enabled on this server (the operator sets auth.webhook_secret).",
                param="webhook_url",
                code="webhooks_disabled",
            )
        # Resolving the host can be slow: in a thread, never on the ingress's event loop.
        await asyncio.to_thread(check_webhook_url, url, self.config.scheduler.webhook_allow_private)

    async def _run_now(
        self, planned: PlannedRequest, principal: Principal, delivery: Delivery
    ) -> Completed | Streaming:
        image_request, options = planned.request, planned.options
        grant = await self.slots.acquire(work_request(image_request, principal.tier))
        if delivery.stream:
            return await self._stream(planned, grant)
        completed = 0
        try:
            attempts, timeout_s = self.config.scheduler.job_attempts, self.timeouts.pipeline_s
            stored = await self.chain.make_images(image_request, options, attempts, timeout_s)
            completed = len(stored)
        except Exception as failure:
            error = as_api_error(failure)
            self.record(planned, None, error_code=error.code or "server_error")
            raise
        finally:
            self.slots.release(grant.ticket_id, completed)
        self.record(planned, stored)
        data = [
            ImageData(
                b64_json=item.b64_json,
                url=self.files.url(delivery.base_url, item.object_key) if item.object_key else None,
                revised_prompt=planned.fields.revised_prompt,
                seed=item.seed,
            )
            for item in stored
        ]
        response = images_response(image_request, options, planned.fields.quality, data)
        headers = {
            **grant.rate_limit_headers,
            "server-timing": server_timing(stored, grant.waited_s),
            "x-imagegen-batch-size": ",".join(str(item.batch_size) for item in stored),
        }
        return Completed(response, headers)

    async def _stream(self, planned: PlannedRequest, grant: Grant) -> Streaming:
        """Start the stream and wait for its first event, so a bad request still gets a plain 4xx.

        Postprocess streams from the model replica and encodes each event; the slot goes back to
        the scheduler when the stream ends, fails or the client leaves.
        """
        image_request, options, fields = planned.request, planned.options, planned.fields
        usage = estimate_usage(
            image_request.prompt, image_request.width, image_request.height, image_request.input_images
        )
        size = f"{image_request.width}x{image_request.height}"
        description = StreamDescription(
            fields.prefix,
            size,
            fields.quality,
            response_background(options),
            options.output_format,
            usage,
            image_request.safety_identifier,
        )
        events = self.chain.stream_events(image_request, options)
        try:
            first = await bounded(events.__anext__(), self.timeouts.pipeline_s, "The image pipeline")
        except BaseException:
            events.cancel()
            self.slots.release(grant.ticket_id, 0)
            raise

        async def body() -> AsyncIterator[bytes]:
            try:
                rest = each_within(events, self.timeouts.pipeline_s, "The image stream")
                async for chunk in event_stream(first, rest, description, events.cancel):
                    yield chunk
            finally:
                self.slots.release(grant.ticket_id, image_request.n)

        return Streaming(body(), dict(grant.rate_limit_headers))

    # ---- storage and the generation log -----------------------------------------------------

    @contextlib.contextmanager
    def storage_guard(self) -> Iterator[None]:
        """Fail fast, before any model work, while the store is failing; record how the work ended.

        This breaker mirrors what postprocess and the scheduler report, so a request whose result
        could not be stored never takes a batch slot. Once it half-opens, one request goes
        through as the probe, and its outcome is recorded whatever ends it: a storage failure
        opens the circuit again, success closes it, anything else (a 4xx, a disconnect) lets the
        next request probe.
        """
        try:
            with self.store.breaker.guarded(is_storage_failure):
                yield
        except CircuitOpenError as open_circuit:
            raise StorageUnavailableError(
                "Image storage is unavailable; retry shortly, or ask for response_format=b64_json.",
                retry_after_s=open_circuit.retry_after_s,
            ) from open_circuit

    def record(
        self, planned: PlannedRequest, stored: list[StoredImage] | None, error_code: str | None = None
    ) -> None:
        """Append the request's rows to the generation log and make sure a flusher runs."""
        self.log.record(planned.request, stored, error_code)
        if self.config.storage.log.enabled and (self._log_flusher is None or self._log_flusher.done()):
            self._log_flusher = asyncio.get_running_loop().create_task(self._flush_log_when_due())

    async def _flush_log_when_due(self) -> None:
        check_every_s = min(self.config.storage.log.flush_interval_s, LOG_CHECK_INTERVAL_S)
        while True:
            await asyncio.sleep(check_every_s)  # a timer: the log flushes by age as well as by size
            if self.log.is_due():
                with contextlib.suppress(StorageUnavailableError):  # rows stay buffered for the next try
                    await asyncio.to_thread(self.log.flush)

    def close(self) -> None:
        """Flush the generation log (Serve calls this through ``__del__`` on graceful shutdown)."""
        if self._log_flusher is not None:
            self._log_flusher.cancel()
        try:
            self.log.flush()
        except StorageUnavailableError:
            logger.warning("generation log: %d rows not written at shutdown", self.log.buffered_rows)

    # ---- discovery and health ------------------------------------------------------------

    def model_list(self) -> ModelList:
        variants = [
            ModelCard(id=variant.name, created=self.created, family=variant.family)
            for variant in self.config.variants
            if variant.name not in self.routing.retired
        ]
        aliases = [
            ModelCard(id=alias, created=self.created, variants=dict(weights))
            for alias, weights in self.routing.aliases.items()
        ]
        return ModelList(data=[*variants, *aliases])

    async def readiness(self) -> dict[str, bool]:
        # A cold variant at zero replicas is ready by design: probing it would start a replica.
        cold = {v.name for v in self.config.variants if v.autoscaling is not None and v.autoscaling.cold}
        stages = {"scheduler": self.scheduler, **self.chain.probes(cold)}

        async def is_ready(handle: StageHandle) -> bool:
            try:
                return bool(await asyncio.wait_for(handle.ready.remote(), READY_TIMEOUT_S))
            except Exception:
                return False

        results = await asyncio.gather(*(is_ready(handle) for handle in stages.values()))
        return {**dict(zip(stages, results, strict=True)), **dict.fromkeys(self.chain.colocated(), True)}
