"""The HTTP face: thin FastAPI routes over `ImageService` (serve_app/service.py).

Each image route authenticates, reads its body into a typed object (serve_app/uploads.py),
hands it to the service and turns the outcome into JSON, a 202, or server-sent events.
"""

# No `from __future__ import annotations` here: Serve re-creates the routes in its proxy and
# FastAPI must see real types, not strings, to build the request models there.
import asyncio
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

from fastapi import Depends, FastAPI, Header, Query, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve.context import _get_serve_request_context
from ray.serve.handle import DeploymentHandle

from deployments.errors import quiet_serve_logs
from deployments.images import MEDIA_TYPES
from deployments.in_process import InProcessHandle, StageHandle
from deployments.resilience import BreakerState
from deployments.stage_chain import StageChain
from serve_app.answers import Accepted, Delivery, Outcome, Streaming
from serve_app.auth import Principal
from serve_app.config import AppConfig
from serve_app.errors import as_api_error, error_response, install_error_handlers
from serve_app.protocol import (
    ErrorResponse,
    ImageEditRequest,
    ImageGenerationRequest,
    ImagesResponse,
    ImageVariationRequest,
    JobResponse,
    ModelList,
)
from serve_app.scheduler import ColocatedScheduler
from serve_app.service import ImageService
from serve_app.signed_files import FILES_ROUTE
from serve_app.uploads import (
    UploadLimits,
    form_openapi,
    json_openapi,
    read_edit,
    read_generation,
    read_variation,
)

BodyT = TypeVar("BodyT")
RouteT = TypeVar("RouteT", bound=Callable[..., Any])

ERROR_RESPONSES: dict[int | str, dict[str, object]] = {
    status: {"model": ErrorResponse} for status in (400, 401, 403, 404, 413, 415, 422, 429, 500, 503)
}
IMAGE_RESPONSES: dict[int | str, dict[str, Any]] = {
    **ERROR_RESPONSES,
    200: {
        "description": "The images; with stream=true, server-sent events (partial images, then completed).",
        "content": {"text/event-stream": {}},
    },
    202: {"model": JobResponse, "description": "With 'Prefer: respond-async': the job, to poll."},
}
IMAGE_FILE = {"type": "string", "format": "binary"}
EDIT_FILES: dict[str, dict[str, Any]] = {
    "image": {**IMAGE_FILE, "description": "The image to edit: PNG, JPEG or WebP."},
    "image[]": {"type": "array", "items": IMAGE_FILE, "description": "Or up to 16 images, tiled."},
    "mask": {**IMAGE_FILE, "description": "PNG with alpha, the first image's size: transparent = edit."},
}
VARIATION_FILES: dict[str, dict[str, Any]] = {
    "image": {**IMAGE_FILE, "description": "The image to vary: PNG, JPEG or WebP."}
}
AuthorizationHeader = Annotated[str | None, Header(description="Bearer API key.")]
PreferHeader = Annotated[str | None, Header(description="'respond-async' makes it a job (202).")]
IdempotencyHeader = Annotated[str | None, Header(description="Same key and body, same result.")]


@dataclass(frozen=True)
class AnswerHeaders:
    """The headers that say who asks and how to answer: the key, async, idempotency."""

    authorization: str | None
    prefer: str | None
    idempotency_key: str | None


async def answer_headers(  # async: FastAPI runs a plain `def` dependency on a worker thread
    authorization: AuthorizationHeader = None,
    prefer: PreferHeader = None,
    idempotency_key: IdempotencyHeader = None,
) -> AnswerHeaders:
    return AnswerHeaders(authorization, prefer, idempotency_key)


ImageRequestHeaders = Annotated[AnswerHeaders, Depends(answer_headers)]

api = FastAPI(
    title="imagegen-serve",
    description="OpenAI-compatible image generation on Ray Serve. Extensions are marked in each schema.",
    version="0.1.0",
)
install_error_handlers(api)


def openapi_with_json_bodies() -> dict[str, Any]:
    """FastAPI's schema plus the JSON bodies the routes read themselves (after authentication)."""
    if api.openapi_schema is None:
        schema = FastAPI.openapi(api)  # builds and caches api.openapi_schema
        schemas = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in (ImageGenerationRequest,):
            definition = model.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas.update(definition.pop("$defs", {}))
            schemas[model.__name__] = definition
    assert api.openapi_schema is not None
    return api.openapi_schema


api.openapi = openapi_with_json_bodies  # type: ignore[method-assign]


def image_route(path: str, summary: str, openapi_extra: dict[str, Any]) -> Callable[[RouteT], RouteT]:
    """An image route: a JSON images response, 202 for a job, or server-sent events; errors."""
    return api.post(
        path,
        response_model=ImagesResponse,
        response_model_exclude_none=True,
        responses=IMAGE_RESPONSES,
        summary=summary,
        openapi_extra=openapi_extra,
    )


def respond(outcome: Outcome) -> Response:
    if isinstance(outcome, Streaming):
        headers = {**outcome.headers, "cache-control": "no-cache"}
        return StreamingResponse(outcome.body, media_type="text/event-stream", headers=headers)
    if isinstance(outcome, Accepted):
        return JSONResponse(
            outcome.job.model_dump(exclude_none=True), status_code=202, headers=outcome.headers
        )
    return JSONResponse(outcome.response.model_dump(exclude_none=True), headers=outcome.headers)


def current_request_id() -> str:
    """Serve's id for this request: the client's ``x-request-id`` or one it made; Serve echoes it."""
    return _get_serve_request_context().request_id or f"req_{uuid.uuid4().hex}"


@serve.deployment
@serve.ingress(api)
class Ingress:
    def __init__(
        self, config: AppConfig, chain: StageChain, scheduler: DeploymentHandle | ColocatedScheduler
    ) -> None:
        quiet_serve_logs()
        # Colocated model replicas (stages.ingress.colocate_models) and a colocated scheduler
        # (scheduler.colocate) start with this replica and live in it.
        chain = chain.started()
        self.colocated_models = [
            model for model in chain.models.values() if isinstance(model, InProcessHandle)
        ]
        self.colocated_scheduler: InProcessHandle | None = None
        calls: StageHandle
        if isinstance(scheduler, ColocatedScheduler):
            calls = self.colocated_scheduler = scheduler.start(chain)
        else:
            calls = scheduler
        self.service = ImageService(config, chain, calls)
        self.upload_limits = UploadLimits.from_config(config.limits)

    def __del__(self) -> None:
        self.service.close()
        if self.colocated_scheduler is not None:
            self.colocated_scheduler.target.close()

    def check_health(self) -> None:
        """Serve's periodic check; a colocated model replica's own check fails this replica (a
        wedged forward pass: Serve replaces the replica, model and all)."""
        for model in self.colocated_models:
            model.target.check_health()

    def reconfigure(self, routing: dict[str, Any]) -> None:
        """Serve's ``user_config``: the routing table (aliases, retired variants), changed in place."""
        self.service.set_routing(routing)

    def principal(self, authorization: str | None) -> Principal:
        return self.service.authenticate(authorization)

    def storage_breaker_state(self) -> BreakerState:
        """The state of this replica's object-store circuit breaker (for operators and tests,
        through a deployment handle): `closed`, `open` (requests for a URL are refused before
        any model work) or `half_open` (the next one probes the store)."""
        return self.service.store.breaker.state

    async def answer(
        self,
        read_body: Callable[[Request, UploadLimits], Awaitable[BodyT]],
        operation: Callable[[BodyT, Principal, str, Delivery], Awaitable[Outcome]],
        request: Request,
        headers: AnswerHeaders,
    ) -> Response:
        """Authenticate, read the body, run one image operation, and answer: JSON, 202, a stream,
        or an error. The key is checked before the body is read."""
        delivery = Delivery(str(request.base_url), headers.prefer, headers.idempotency_key)
        try:
            principal = self.principal(headers.authorization)
            body = await read_body(request, self.upload_limits)
            return respond(await operation(body, principal, current_request_id(), delivery))
        except Exception as exc:  # every failure leaves as the OpenAI error shape
            return error_response(as_api_error(exc))

    @image_route(
        "/v1/images/generations", "Create images from a prompt", json_openapi(ImageGenerationRequest)
    )
    async def create_image(self, request: Request, headers: ImageRequestHeaders) -> Response:
        return await self.answer(read_generation, self.service.generate, request, headers)

    @image_route(
        "/v1/images/edits",
        "Edit images (multipart): image-to-image, or inpainting with a mask",
        form_openapi(ImageEditRequest, EDIT_FILES),
    )
    async def create_edit(self, request: Request, headers: ImageRequestHeaders) -> Response:
        return await self.answer(read_edit, self.service.edit, request, headers)

    @image_route(
        "/v1/images/variations",
        "Create variations of an image (multipart)",
        form_openapi(ImageVariationRequest, VARIATION_FILES),
    )
    async def create_variation(self, request: Request, headers: ImageRequestHeaders) -> Response:
        return await self.answer(read_variation, self.service.variation, request, headers)

    @api.get(
        "/v1/images/jobs/{job_id}", response_model=JobResponse, responses=ERROR_RESPONSES, summary="A job"
    )
    async def get_job(
        self, job_id: str, request: Request, authorization: AuthorizationHeader = None
    ) -> Response:
        job = await self.service.jobs.get(self.principal(authorization), job_id, str(request.base_url))
        return JSONResponse(job.model_dump(exclude_none=True))

    @api.delete(
        "/v1/images/jobs/{job_id}", response_model=JobResponse, responses=ERROR_RESPONSES, summary="Cancel"
    )
    async def cancel_job(
        self, job_id: str, request: Request, authorization: AuthorizationHeader = None
    ) -> Response:
        job = await self.service.jobs.cancel(self.principal(authorization), job_id, str(request.base_url))
        return JSONResponse(job.model_dump(exclude_none=True))

    @api.get("/v1/models", response_model=ModelList, responses=ERROR_RESPONSES, summary="List model variants")
    async def list_models(self, authorization: AuthorizationHeader = None) -> ModelList:
        self.principal(authorization)
        return self.service.model_list()

    @api.get(f"{FILES_ROUTE}/{{key:path}}", responses=ERROR_RESPONSES, summary="Fetch an image by signed URL")
    async def get_file(
        self, key: str, expires: Annotated[str, Query()] = "", signature: Annotated[str, Query()] = ""
    ) -> Response:
        data = await asyncio.to_thread(self.service.files.read, key, expires, signature)
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
