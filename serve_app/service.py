"""Everything behind the routes: auth, validation, the scheduler, the stage chain, responses.

`ImageService` is a plain object the ingress deployment owns, so the routes stay thin and the
steps read in order: authenticate -> plan -> admit (scheduler) -> run stages -> respond.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

from ray.serve.handle import DeploymentHandle

from deployments.contracts import ImageRequest, StoredImage
from deployments.generation_log import GenerationLog, generation_rows
from deployments.metrics import stage_metrics
from deployments.resilience import CircuitOpenError
from deployments.storage import ObjectStore, UrlSigner, is_valid_object_key
from serve_app.auth import KeyRing, Principal
from serve_app.config import AppConfig
from serve_app.errors import (
    APIError,
    ForbiddenError,
    InvalidRequestError,
    NotFoundError,
    StorageUnavailableError,
    as_api_error,
)
from serve_app.jobs import JobRecord, body_digest, check_webhook_url, new_job_id
from serve_app.pipeline import StageHandles
from serve_app.planning import plan_generation, resolve_quality
from serve_app.protocol import (
    ErrorInfo,
    ImageData,
    ImageGenerationRequest,
    ImagesResponse,
    JobResponse,
    ModelCard,
    ModelList,
)
from serve_app.scheduler import JobSubmission, JobView, work_request

FILES_ROUTE = "/v1/images/files"
READY_TIMEOUT_S = 5.0
LOG_CHECK_INTERVAL_S = 1.0
MAX_IDEMPOTENCY_KEY_CHARS = 255
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


def server_timing(images: list[StoredImage], scheduler_s: float) -> str:
    """A Server-Timing header: the scheduler wait, then each stage's slowest time, in ms."""
    stages: dict[str, float] = {"scheduler": scheduler_s}
    for image in images:
        for stage, seconds in image.timings.items():
            stages[stage] = max(stages.get(stage, 0.0), seconds)
    return ", ".join(f"{stage};dur={seconds * 1000:.1f}" for stage, seconds in stages.items())


def wants_async(prefer: str | None) -> bool:
    """RFC 7240: ``Prefer: respond-async`` (possibly among other preferences)."""
    return any(part.strip().lower() == "respond-async" for part in (prefer or "").split(","))


class ImageService:
    def __init__(self, config: AppConfig, stages: StageHandles, scheduler: DeploymentHandle) -> None:
        self.config = config
        self.stages = stages
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

    def authenticate(self, authorization: str | None) -> Principal:
        return self.keyring.authenticate(authorization)

    # ---- generations ---------------------------------------------------------------------

    async def generate(
        self,
        request: ImageGenerationRequest,
        principal: Principal,
        *,
        request_id: str,
        base_url: str,
        prefer: str | None = None,
        idempotency_key: str | None = None,
    ) -> Completed | Accepted:
        variant = self.config.variant(request.model)
        if variant is None:
            raise NotFoundError(
                f"The model {request.model!r} does not exist. See GET /v1/models.",
                param="model",
                code="model_not_found",
            )
        is_async = wants_async(prefer)
        if request.webhook_url is not None:
            if not is_async:
                raise InvalidRequestError("webhook_url needs 'Prefer: respond-async'.", param="webhook_url")
            check_webhook_url(request.webhook_url, self.config.scheduler.webhook_allow_private)
        if idempotency_key is not None and not 0 < len(idempotency_key) <= MAX_IDEMPOTENCY_KEY_CHARS:
            raise InvalidRequestError("Idempotency-Key must be 1-255 characters.", param="Idempotency-Key")
        job_id = new_job_id() if (is_async or idempotency_key) else request_id
        image_request, options = plan_generation(
            request, variant, self.config.limits, request_id=job_id, tenant=principal.tenant
        )
        quality = resolve_quality(request.quality)
        if not (is_async or idempotency_key):
            return await self._generate_now(image_request, options, principal, quality, base_url)
        self.check_store_available()  # a job's images are always stored
        submission = JobSubmission(
            work=work_request(image_request, principal.tier),
            request=image_request,
            options=options,
            quality=quality,
            idempotency_key=idempotency_key,
            body_sha256=body_digest(request.model_dump(mode="json", exclude_unset=True)),
            webhook_url=request.webhook_url,
        )
        view: JobView = await self.scheduler.submit.remote(submission)
        if is_async:
            headers = {**view.rate_limit_headers, "location": f"/v1/images/jobs/{view.record.id}"}
            return Accepted(await self.job_response(view, base_url), headers)
        view = await self.scheduler.wait.remote(principal.tenant, view.record.id)
        job = await self.job_response(view, base_url)
        if job.result is None:
            record = view.record
            error = APIError(record.error_message or "The request failed.", code=record.error_code)
            error.status_code = record.error_status or 500
            raise error
        return Completed(job.result, {**view.rate_limit_headers, "x-imagegen-job-id": view.record.id})

    async def _generate_now(
        self, image_request: ImageRequest, options: Any, principal: Principal, quality: str, base_url: str
    ) -> Completed:
        needs_store = options.response_format == "url"
        if needs_store:
            self.check_store_available()
        grant = await self.scheduler.acquire.remote(work_request(image_request, principal.tier))
        completed = 0
        try:
            stored = await self.stages.run(image_request, options, self.config.scheduler.job_attempts)
            completed = len(stored)
        except Exception as failure:
            error = as_api_error(failure)
            if isinstance(error, StorageUnavailableError):
                self.store.breaker.record_failure()
            self.record(image_request, None, error_code=error.code or "server_error")
            raise
        finally:
            self.scheduler.release.remote(grant.ticket_id, completed)
        if needs_store:
            self.store.breaker.record_success()
        self.record(image_request, stored)
        data = [
            ImageData(
                b64_json=item.b64_json,
                url=self.image_url(base_url, item.object_key) if item.object_key else None,
                revised_prompt=image_request.prompt,
                seed=item.seed,
            )
            for item in stored
        ]
        response = self._images_response(image_request, options.output_format, quality, data)
        headers = {
            **grant.rate_limit_headers,
            "server-timing": server_timing(stored, grant.waited_s),
            "x-imagegen-batch-size": ",".join(str(item.batch_size) for item in stored),
        }
        return Completed(response, headers)

    @staticmethod
    def _images_response(
        request: ImageRequest, output_format: str, quality: str, data: list[ImageData]
    ) -> ImagesResponse:
        return ImagesResponse(
            created=int(time.time()),
            data=data,
            output_format=output_format,
            size=f"{request.width}x{request.height}",
            quality=quality,
            background="opaque",
        )

    # ---- jobs ----------------------------------------------------------------------------

    async def get_job(self, principal: Principal, job_id: str, base_url: str) -> JobResponse:
        return await self.job_response(await self.scheduler.get.remote(principal.tenant, job_id), base_url)

    async def cancel_job(self, principal: Principal, job_id: str, base_url: str) -> JobResponse:
        return await self.job_response(await self.scheduler.cancel.remote(principal.tenant, job_id), base_url)

    async def job_response(self, view: JobView, base_url: str) -> JobResponse:
        record: JobRecord = view.record
        result = error = None
        if record.status == "succeeded":
            result = await self._job_result(record, base_url)
        elif record.status == "failed":
            error = ErrorInfo(
                message=record.error_message or "The job failed.",
                type="server_error",
                code=record.error_code,
            )
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
        return self._images_response(request, options.output_format, record.quality, data)

    # ---- storage, URLs and the generation log ----------------------------------------------

    def check_store_available(self) -> None:
        """Fail fast, before any model work, while uploads are failing.

        This breaker mirrors what postprocess reports, so a request whose result could not be
        stored never takes a batch slot; once it half-opens, one request goes through as the probe.
        """
        try:
            self.store.breaker.before_call()
        except CircuitOpenError as open_circuit:
            raise StorageUnavailableError(
                "Image storage is unavailable; retry shortly, or ask for response_format=b64_json.",
                headers={"retry-after": str(math.ceil(open_circuit.retry_after_s))},
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
        stages = {
            "scheduler": self.scheduler,
            "preprocess": self.stages.preprocess,
            "postprocess": self.stages.postprocess,
        }
        stages.update({f"model:{name}": handle for name, handle in self.stages.models.items()})

        async def is_ready(handle: DeploymentHandle) -> bool:
            try:
                return bool(await asyncio.wait_for(handle.ready.remote(), READY_TIMEOUT_S))
            except Exception:
                return False

        results = await asyncio.gather(*(is_ready(handle) for handle in stages.values()))
        return dict(zip(stages, results, strict=True))
