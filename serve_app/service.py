"""Everything behind the routes: auth, validation, the scheduler, the stage chain, responses.

`ImageService` is a plain object the ingress deployment owns, so the routes stay thin and the
steps read in order: authenticate -> plan -> admit (scheduler) -> run stages -> respond.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Literal

from fastapi import Request
from ray.serve.handle import DeploymentHandle

from deployments.config import VariantConfig
from deployments.contracts import EncodeOptions, ImageRequest, StoredImage
from deployments.errors import InvalidRequestError, StorageUnavailableError, is_storage_failure
from deployments.generation_log import GenerationLog, generation_rows
from deployments.metrics import stage_metrics
from deployments.resilience import CircuitOpenError
from deployments.stage_chain import StageChain
from deployments.storage import ObjectStore, UrlSigner, is_valid_object_key
from serve_app.admission_policy import work_request
from serve_app.auth import KeyRing, Principal
from serve_app.config import AppConfig
from serve_app.errors import ForbiddenError, NotFoundError, as_api_error, error_info
from serve_app.job_lifecycle import JobSubmission, JobView
from serve_app.jobs import JobRecord, body_digest, check_webhook_url, is_valid_job_id, new_job_id
from serve_app.planning import plan_edit, plan_generation, plan_variation, resolve_quality
from serve_app.protocol import (
    ImageData,
    ImageEditRequest,
    ImageGenerationRequest,
    ImagesResponse,
    ImageVariationRequest,
    JobResponse,
    ModelCard,
    ModelList,
    ResolvedQuality,
)
from serve_app.scheduler import Grant
from serve_app.streaming import EventPrefix, StreamDescription, estimate_usage, event_stream
from serve_app.uploads import UploadLimits, parse_fields, read_form, read_json

FILES_ROUTE = "/v1/images/files"
READY_TIMEOUT_S = 5.0
LOG_CHECK_INTERVAL_S = 1.0
UPLOADS_PREFIX = "jobs/uploads"
logger = logging.getLogger("imagegen.service")


@dataclass(frozen=True)
class Completed:
    """A finished synchronous request: the response and what the HTTP layer puts in headers."""

    response: ImagesResponse
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Accepted:
    """An accepted async job (202)."""

    job: JobResponse
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Streaming:
    """A streaming request whose first event is made: the rest of its server-sent events."""

    body: AsyncIterator[bytes]
    headers: dict[str, str] = field(default_factory=dict)


Outcome = Completed | Accepted | Streaming


@dataclass(frozen=True)
class ResponseFields:
    """What the response repeats about the request, beside the images."""

    prefix: EventPrefix
    quality: ResolvedQuality
    revised_prompt: str | None


@dataclass(frozen=True)
class Delivery:
    """How the client asked to get the result: now, streamed, as a job, idempotently."""

    base_url: str
    prefer: str | None = None
    idempotency_key: str | None = None
    stream: bool = False
    webhook_url: str | None = None
    body_sha256: str | None = None

    @property
    def as_job(self) -> bool:
        return wants_async(self.prefer) or self.idempotency_key is not None


def server_timing(images: list[StoredImage], scheduler_s: float) -> str:
    """A Server-Timing header: the scheduler wait, then each stage's slowest time, in ms."""
    stages: dict[str, float] = {"scheduler": scheduler_s}
    for image in images:
        for stage, seconds in image.timings.items():
            stages[stage] = max(stages.get(stage, 0.0), seconds)
    return ", ".join(f"{stage};dur={seconds * 1000:.1f}" for stage, seconds in stages.items())


def upload_digest(fields: dict[str, str], files: list[bytes]) -> str:
    """A digest of a multipart request's text fields and files, for idempotency checks."""
    digest = hashlib.sha256(body_digest(fields).encode())
    for data in files:
        digest.update(hashlib.sha256(data).digest())
    return digest.hexdigest()


def response_background(options: EncodeOptions) -> Literal["transparent", "opaque"]:
    """The background the images have: transparent only when asked for (and planning allowed it)."""
    return "transparent" if options.background == "transparent" else "opaque"


def check_job_id(job_id: str) -> None:
    """Ids we never issued are not looked up in the store."""
    if not is_valid_job_id(job_id):
        raise NotFoundError(f"No job with id {job_id!r}.", param="job_id", code="job_not_found")


def wants_async(prefer: str | None) -> bool:
    """RFC 7240: ``Prefer: respond-async`` (possibly among other preferences)."""
    return any(part.strip().lower() == "respond-async" for part in (prefer or "").split(","))


class ImageService:
    def __init__(self, config: AppConfig, chain: StageChain, scheduler: DeploymentHandle) -> None:
        self.config = config
        self.chain = chain
        self.scheduler = scheduler
        self.keyring = KeyRing.load(config.auth.keys_file, set(config.tiers))
        self.store = ObjectStore(config.storage)
        assert config.storage.signing_key is not None, "build_app sets a signing key"
        self.signer = UrlSigner(config.storage.signing_key.get_secret_value())
        self.created = int(time.time())
        self.log = GenerationLog(
            self.store, config.storage.log, on_drop=stage_metrics().count_dropped_log_rows
        )
        self._log_flusher: asyncio.Task[None] | None = None
        self.upload_limits = UploadLimits.from_config(config.limits)

    def authenticate(self, authorization: str | None) -> Principal:
        return self.keyring.authenticate(authorization)

    # ---- generations ---------------------------------------------------------------------

    def find_variant(self, model: str | None) -> VariantConfig:
        variant = self.config.variant(model)
        if variant is None:
            raise NotFoundError(
                f"The model {model!r} does not exist. See GET /v1/models.",
                param="model",
                code="model_not_found",
            )
        return variant

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
        self, http_request: Request, principal: Principal, request_id: str, delivery: Delivery
    ) -> Outcome:
        request = await read_json(http_request, ImageGenerationRequest, self.upload_limits)
        variant = self.find_variant(request.model)
        delivery = dataclasses.replace(
            delivery,
            stream=request.stream,
            webhook_url=request.webhook_url,
            body_sha256=body_digest(request.model_dump(mode="json", exclude_unset=True)),
        )
        image_request, options = plan_generation(
            request,
            variant,
            self.config.limits,
            request_id=self.work_id(request_id, delivery),
            tenant=principal.tenant,
            moderation_checks=self.config.moderation.checks_for(principal.tier, variant.name),
        )
        fields = ResponseFields("image_generation", resolve_quality(request.quality), request.prompt)
        return await self.deliver(image_request, options, fields, principal, delivery)

    async def edit(
        self, http_request: Request, principal: Principal, request_id: str, delivery: Delivery
    ) -> Outcome:
        form = await read_form(http_request, self.upload_limits)
        form.only_files("image", "image[]", "mask", "markup")
        request = parse_fields(ImageEditRequest, form.fields)
        images, masks = form.files_of("image", "image[]"), form.files_of("mask")
        markups = form.files_of("markup")
        if len(masks) > 1:
            raise InvalidRequestError("Send at most one mask.", param="mask")
        variant = self.find_variant(request.model)
        delivery = dataclasses.replace(
            delivery,
            stream=request.stream,
            webhook_url=request.webhook_url,
            body_sha256=upload_digest(form.fields, [*images, *masks]),
        )
        image_request, options = plan_edit(
            request,
            images,
            masks[0] if masks else None,
            variant,
            self.config.limits,
            request_id=self.work_id(request_id, delivery),
            tenant=principal.tenant,
            moderation_checks=self.config.moderation.checks_for(principal.tier, variant.name),
            markup=markups[0] if markups else None,
        )
        fields = ResponseFields("image_edit", resolve_quality(request.quality), request.prompt)
        return await self.deliver(image_request, options, fields, principal, delivery)

    async def variation(
        self, http_request: Request, principal: Principal, request_id: str, delivery: Delivery
    ) -> Outcome:
        form = await read_form(http_request, self.upload_limits)
        form.only_files("image")
        request = parse_fields(ImageVariationRequest, form.fields)
        variant = self.find_variant(request.model)
        images = form.files_of("image")
        delivery = dataclasses.replace(delivery, body_sha256=upload_digest(form.fields, images))
        image_request, options = plan_variation(
            request,
            images,
            variant,
            self.config.limits,
            request_id=self.work_id(request_id, delivery),
            tenant=principal.tenant,
            moderation_checks=self.config.moderation.checks_for(principal.tier, variant.name),
        )
        fields = ResponseFields("image_edit", resolve_quality("auto"), None)
        return await self.deliver(image_request, options, fields, principal, delivery)

    async def deliver(
        self,
        image_request: ImageRequest,
        options: EncodeOptions,
        fields: ResponseFields,
        principal: Principal,
        delivery: Delivery,
    ) -> Outcome:
        """Run a planned request the way the client asked: as a job, streamed, or now."""
        if delivery.webhook_url is not None:
            await self.check_webhook(delivery.webhook_url)
        stores = delivery.as_job or options.response_format == "url"  # a job's images are always stored
        with self.storage_guard() if stores else contextlib.nullcontext():
            if delivery.as_job:
                return await self._submit_job(image_request, options, fields, principal, delivery)
            return await self._run_now(image_request, options, fields, principal, delivery)

    async def check_webhook(self, url: str) -> None:
        """A 400 for a URL we would not call, or when no secret is configured to sign the call with."""
        # Resolving the host can be slow: in a thread, never on the ingress's event loop.
        await asyncio.to_thread(check_webhook_url, url, self.config.scheduler.webhook_allow_private)
        if self.config.auth.webhook_secret is None:
            raise InvalidRequestError(
                "Webhooks are not enabled on this server (the operator sets auth.webhook_secret).",
                param="webhook_url",
                code="webhooks_disabled",
            )

    async def _run_now(
        self,
        image_request: ImageRequest,
        options: EncodeOptions,
        fields: ResponseFields,
        principal: Principal,
        delivery: Delivery,
    ) -> Completed | Streaming:
        work = work_request(image_request, principal.tier)
        try:
            grant: Grant = await self.scheduler.acquire.remote(work)
        except asyncio.CancelledError:
            # The client left: the slots may have been granted as the call was cancelled.
            self.scheduler.release.remote(work.ticket_id, 0)
            raise
        if delivery.stream:
            return await self._stream(image_request, options, fields, grant)
        completed = 0
        try:
            stored = await self.chain.make_images(image_request, options, self.config.scheduler.job_attempts)
            completed = len(stored)
        except Exception as failure:
            error = as_api_error(failure)
            self.record(image_request, None, error_code=error.code or "server_error")
            raise
        finally:
            self.scheduler.release.remote(grant.ticket_id, completed)
        self.record(image_request, stored)
        data = [
            ImageData(
                b64_json=item.b64_json,
                url=self.image_url(delivery.base_url, item.object_key) if item.object_key else None,
                revised_prompt=fields.revised_prompt,
                seed=item.seed,
            )
            for item in stored
        ]
        response = self._images_response(image_request, options, fields.quality, data)
        headers = {
            **grant.rate_limit_headers,
            "server-timing": server_timing(stored, grant.waited_s),
            "x-imagegen-batch-size": ",".join(str(item.batch_size) for item in stored),
        }
        return Completed(response, headers)

    async def _stream(
        self, image_request: ImageRequest, options: EncodeOptions, fields: ResponseFields, grant: Grant
    ) -> Streaming:
        """Start the stream and wait for its first event, so a bad request still gets a plain 4xx.

        Postprocess streams from the model replica and encodes each event; the slot goes back to
        the scheduler when the stream ends, fails or the client leaves.
        """
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
            first = await events.__anext__()
        except BaseException:
            events.cancel()
            self.scheduler.release.remote(grant.ticket_id, 0)
            raise

        async def body() -> AsyncIterator[bytes]:
            try:
                async for chunk in event_stream(first, events, description, events.cancel):
                    yield chunk
            finally:
                self.scheduler.release.remote(grant.ticket_id, image_request.n)

        return Streaming(body(), dict(grant.rate_limit_headers))

    async def _submit_job(
        self,
        image_request: ImageRequest,
        options: EncodeOptions,
        fields: ResponseFields,
        principal: Principal,
        delivery: Delivery,
    ) -> Outcome:
        submission = JobSubmission(
            work=work_request(image_request, principal.tier),
            request=await asyncio.to_thread(self._stash_uploads, image_request),
            options=options,
            quality=fields.quality,
            idempotency_key=delivery.idempotency_key,
            body_sha256=delivery.body_sha256,
            webhook_url=delivery.webhook_url,
        )
        view: JobView = await self.scheduler.submit.remote(submission)
        if wants_async(delivery.prefer):
            headers = {**view.rate_limit_headers, "location": f"/v1/images/jobs/{view.record.id}"}
            return Accepted(await self.job_response(view, delivery.base_url), headers)
        view = await self.scheduler.wait.remote(principal.tenant, view.record.id)
        job = await self.job_response(view, delivery.base_url)
        if job.result is None:
            raise view.record.failure
        return Completed(job.result, {**view.rate_limit_headers, "x-imagegen-job-id": view.record.id})

    def _stash_uploads(self, request: ImageRequest) -> ImageRequest:
        """Write a job's uploads to the store, so its record (and the scheduler) holds keys, not bytes."""
        if not request.images:
            return request
        prefix = f"{UPLOADS_PREFIX}/{request.request_id}"
        keys = []
        for index, data in enumerate(request.images):
            self.store.put(f"{prefix}/image-{index}", data)
            keys.append(f"{prefix}/image-{index}")
        mask_key = None
        if request.mask is not None:
            mask_key = f"{prefix}/mask"
            self.store.put(mask_key, request.mask)
        return dataclasses.replace(request, images=(), mask=None, input_keys=tuple(keys), mask_key=mask_key)

    @staticmethod
    def _images_response(
        request: ImageRequest, options: EncodeOptions, quality: str, data: list[ImageData]
    ) -> ImagesResponse:
        return ImagesResponse(
            created=int(time.time()),
            data=data,
            output_format=options.output_format,
            size=f"{request.width}x{request.height}",
            quality=quality,
            background=response_background(options),
            usage=estimate_usage(
                request.prompt, request.width, request.height, request.input_images, len(data)
            ),
            safety_identifier=request.safety_identifier,
        )

    # ---- jobs ----------------------------------------------------------------------------

    async def get_job(self, principal: Principal, job_id: str, base_url: str) -> JobResponse:
        check_job_id(job_id)
        return await self.job_response(await self.scheduler.get.remote(principal.tenant, job_id), base_url)

    async def cancel_job(self, principal: Principal, job_id: str, base_url: str) -> JobResponse:
        check_job_id(job_id)
        return await self.job_response(await self.scheduler.cancel.remote(principal.tenant, job_id), base_url)

    async def job_response(self, view: JobView, base_url: str) -> JobResponse:
        record: JobRecord = view.record
        result = error = None
        if record.status == "succeeded":
            result = await self._job_result(record, base_url)
        elif record.status == "failed":
            error = error_info(record.failure)
        return JobResponse(
            id=record.id,
            status=record.status,
            created_at=int(record.created_at),
            completed_at=record.completed_at,
            queue_position=view.queue_position,
            eta_seconds=None if view.eta_s is None else round(view.eta_s, 2),
            result=result,
            error=error,
        )

    async def _job_result(self, record: JobRecord, base_url: str) -> ImagesResponse:
        request, options = record.image_request, record.encode_options
        if options.response_format == "url":
            data = [
                ImageData(
                    url=self.image_url(base_url, image.object_key),
                    revised_prompt=request.prompt,
                    seed=image.seed,
                )
                for image in record.images
            ]
        else:
            payloads = await asyncio.gather(
                *(asyncio.to_thread(self.store.get, image.object_key) for image in record.images)
            )
            data = [
                ImageData(
                    b64_json=base64.b64encode(payload).decode(),
                    revised_prompt=request.prompt,
                    seed=image.seed,
                )
                for image, payload in zip(record.images, payloads, strict=True)
            ]
        return self._images_response(request, options, record.quality, data)

    # ---- storage, URLs and the generation log ----------------------------------------------

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
        self, request: ImageRequest, stored: list[StoredImage] | None, error_code: str | None = None
    ) -> None:
        """Append the request's rows to the generation log and make sure a flusher runs."""
        if not self.config.storage.log.enabled:
            return
        include_prompt = self.config.storage.log.include_prompt
        self.log.append(
            generation_rows(request, stored, include_prompt=include_prompt, error_code=error_code)
        )
        if self._log_flusher is None or self._log_flusher.done():
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

    def image_url(self, base_url: str, key: str) -> str:
        """A presigned URL for S3; for local storage a URL this ingress serves, HMAC-signed."""
        ttl_s = self.config.storage.url_ttl_s
        if not self.store.is_local:
            return self.store.presigned_url(key, ttl_s)
        expires = int(time.time()) + ttl_s
        base = (self.config.storage.public_base_url or base_url).rstrip("/")
        signature = self.signer.signature(key, expires)
        return f"{base}{FILES_ROUTE}/{key}?expires={expires}&signature={signature}"

    def read_signed_object(self, key: str, expires: str, signature: str) -> bytes:
        valid = (
            self.store.is_local
            and is_valid_object_key(key)
            and expires.isdecimal()
            and self.signer.is_valid(key, int(expires), signature, time.time())
        )
        if not valid:
            raise ForbiddenError("This URL is invalid or has expired.", code="invalid_signature")
        try:
            return self.store.get(key)
        except FileNotFoundError as missing:
            raise NotFoundError("This image no longer exists.", code="image_not_found") from missing

    # ---- discovery and health ------------------------------------------------------------

    def model_list(self) -> ModelList:
        return ModelList(data=[ModelCard(id=v.name, created=self.created) for v in self.config.variants])

    async def readiness(self) -> dict[str, bool]:
        # A cold variant at zero replicas is ready by design: probing it would start a replica.
        cold = {v.name for v in self.config.variants if v.autoscaling is not None and v.autoscaling.cold}
        stages = {"scheduler": self.scheduler, **self.chain.probes(cold)}

        async def is_ready(handle: DeploymentHandle) -> bool:
            try:
                return bool(await asyncio.wait_for(handle.ready.remote(), READY_TIMEOUT_S))
            except Exception:
                return False

        results = await asyncio.gather(*(is_ready(handle) for handle in stages.values()))
        return dict(zip(stages, results, strict=True))
