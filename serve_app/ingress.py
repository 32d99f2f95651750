"""The HTTP face: thin FastAPI routes over `ImageService`, which chains the three stages.

Stage results are passed as ``DeploymentResponse`` objects straight into the next stage, so
image bytes go preprocess -> model -> postprocess without a round trip through the ingress.
"""

# No `from __future__ import annotations` here: Serve re-creates the routes in its proxy and
# FastAPI must see real types, not strings, to build the request models there.
import asyncio
import contextlib
import logging
import math
import time
import uuid
from typing import Annotated

from fastapi import FastAPI, Query, Request, Response
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.context import _get_serve_request_context
from ray.serve.handle import DeploymentHandle

from deployments.contracts import ImageRequest, StoredImage
from deployments.generation_log import GenerationLog, generation_rows
from deployments.images import MEDIA_TYPES
from deployments.metrics import stage_metrics
from deployments.resilience import CircuitOpenError
from deployments.storage import ObjectStore, UrlSigner, is_valid_object_key
from serve_app.config import AppConfig
from serve_app.errors import (
    ForbiddenError,
    NotFoundError,
    StorageUnavailableError,
    as_api_error,
    error_response,
    install_error_handlers,
)
from serve_app.planning import plan_generation, resolve_quality
from serve_app.protocol import (
    ErrorResponse,
    ImageData,
    ImageGenerationRequest,
    ImagesResponse,
    ModelCard,
    ModelList,
)

FILES_ROUTE = "/v1/images/files"
READY_TIMEOUT_S = 5.0
LOCAL_TENANT = "local"
LOG_CHECK_INTERVAL_S = 1.0
logger = logging.getLogger("imagegen.ingress")

ERROR_RESPONSES: dict[int | str, dict[str, object]] = {
    status: {"model": ErrorResponse} for status in (400, 401, 403, 404, 413, 415, 429, 500, 503)
}

api = FastAPI(
    title="imagegen-serve",
    description="OpenAI-compatible image generation on Ray Serve. Extensions are marked in each schema.",
    version="0.1.0",
)
install_error_handlers(api)


def current_request_id() -> str:
    """Serve's id for this request: the client's ``x-request-id`` or one it made; Serve echoes it."""
    return _get_serve_request_context().request_id or f"req_{uuid.uuid4().hex}"


def server_timing(images: list[StoredImage]) -> str:
    """A Server-Timing header: each stage's slowest time across the request's images, in ms."""
    stages: dict[str, float] = {}
    for image in images:
        for stage, seconds in image.timings.items():
            stages[stage] = max(stages.get(stage, 0.0), seconds)
    return ", ".join(f"{stage};dur={seconds * 1000:.1f}" for stage, seconds in stages.items())


class ImageService:
    """Everything behind the routes: validation, the stage chain, and building responses."""

    def __init__(
        self,
        config: AppConfig,
        preprocess: DeploymentHandle,
        postprocess: DeploymentHandle,
        models: dict[str, DeploymentHandle],
    ) -> None:
        self.config = config
        self.preprocess = preprocess
        self.postprocess = postprocess
        self.models = models
        self.store = ObjectStore(config.storage)
        assert config.storage.signing_key is not None, "build_app sets a signing key"
        self.signer = UrlSigner(config.storage.signing_key.get_secret_value())
        self.created = int(time.time())
        self.log = GenerationLog(
            self.store, config.storage.log, on_drop=stage_metrics().count_dropped_log_rows
        )
        self._log_flusher: asyncio.Task[None] | None = None

    async def generate(
        self, request: ImageGenerationRequest, request_id: str, base_url: str
    ) -> tuple[ImagesResponse, list[StoredImage]]:
        variant = self.config.variant(request.model)
        if variant is None:
            raise NotFoundError(
                f"The model {request.model!r} does not exist. See GET /v1/models.",
                param="model",
                code="model_not_found",
            )
        image_request, options = plan_generation(
            request, variant, self.config.limits, request_id=request_id, tenant=LOCAL_TENANT
        )
        needs_store = options.response_format == "url"
        if needs_store:
            self.check_store_available()
        tasks = self.preprocess.prepare.remote(image_request)
        generated = self.models[variant.name].generate.remote(tasks)
        try:
            stored: list[StoredImage] = await self.postprocess.finish.remote(generated, options)
        except Exception as failure:
            error = as_api_error(failure)
            if isinstance(error, StorageUnavailableError):
                self.store.breaker.record_failure()
            self.record(image_request, None, error_code=error.code or "server_error")
            raise
        if needs_store:
            self.store.breaker.record_success()
        self.record(image_request, stored)
        data = [
            ImageData(
                b64_json=item.b64_json,
                url=self.image_url(base_url, item.object_key) if item.object_key else None,
                revised_prompt=request.prompt,
                seed=item.seed,
            )
            for item in stored
        ]
        response = ImagesResponse(
            created=int(time.time()),
            data=data,
            output_format=options.output_format,
            size=f"{image_request.width}x{image_request.height}",
            quality=resolve_quality(request.quality),
            background="opaque",
        )
        return response, stored

    def check_store_available(self) -> None:
        """Fail fast, before any model work, while uploads are failing.

        The ingress breaker mirrors what postprocess reports, so a request whose result could
        not be stored never takes a batch slot; once it half-opens, one request goes through as
        the probe.
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

    def model_list(self) -> ModelList:
        return ModelList(data=[ModelCard(id=v.name, created=self.created) for v in self.config.variants])

    async def readiness(self) -> dict[str, bool]:
        stages = {"preprocess": self.preprocess, "postprocess": self.postprocess}
        stages.update({f"model:{name}": handle for name, handle in self.models.items()})

        async def is_ready(handle: DeploymentHandle) -> bool:
            try:
                return bool(await asyncio.wait_for(handle.ready.remote(), READY_TIMEOUT_S))
            except Exception:
                return False

        results = await asyncio.gather(*(is_ready(handle) for handle in stages.values()))
        return dict(zip(stages, results, strict=True))


@serve.deployment
@serve.ingress(api)
class Ingress:
    def __init__(
        self,
        config: AppConfig,
        preprocess: DeploymentHandle,
        postprocess: DeploymentHandle,
        models: dict[str, DeploymentHandle],
    ) -> None:
        self.service = ImageService(config, preprocess, postprocess, models)

    def __del__(self) -> None:
        self.service.close()

    @api.post(
        "/v1/images/generations",
        response_model=ImagesResponse,
        response_model_exclude_none=True,
        responses=ERROR_RESPONSES,
        summary="Create images from a prompt",
    )
    async def create_image(
        self,
        body: ImageGenerationRequest,
        request: Request,
    ) -> Response:
        try:
            result, stored = await self.service.generate(body, current_request_id(), str(request.base_url))
        except Exception as exc:  # every failure leaves as the OpenAI error shape
            return error_response(as_api_error(exc))
        headers = {
            "server-timing": server_timing(stored),
            "x-imagegen-batch-size": ",".join(str(item.batch_size) for item in stored),
        }
        return JSONResponse(result.model_dump(exclude_none=True), headers=headers)

    @api.get("/v1/models", response_model=ModelList, summary="List model variants")
    async def list_models(self) -> ModelList:
        return self.service.model_list()

    @api.get(f"{FILES_ROUTE}/{{key:path}}", responses=ERROR_RESPONSES, summary="Fetch an image by signed URL")
    async def get_file(
        self, key: str, expires: Annotated[str, Query()] = "", signature: Annotated[str, Query()] = ""
    ) -> Response:
        data = await asyncio.to_thread(self.service.read_signed_object, key, expires, signature)
        media_type = MEDIA_TYPES[key.rsplit(".", 1)[-1]]
        return Response(data, media_type=media_type, headers={"cache-control": "private, max-age=3600"})

    @api.get("/healthz", summary="Liveness")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/readyz", summary="Readiness of every stage")
    async def readyz(self) -> JSONResponse:
        stages = await self.service.readiness()
        ready = all(stages.values())
        return JSONResponse({"ready": ready, "stages": stages}, status_code=200 if ready else 503)
