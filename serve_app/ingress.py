"""The HTTP face: thin FastAPI routes over `ImageService`, which chains the three stages.

Stage results are passed as ``DeploymentResponse`` objects straight into the next stage, so
image bytes go preprocess -> model -> postprocess without a round trip through the ingress.
Uploads (edits, variations) pass through once, as the bytes the client sent, to preprocess.
A streaming request is handed to postprocess, which streams from the model replica; the
ingress turns the encoded events into server-sent events.
"""

# No `from __future__ import annotations` here: Serve re-creates the routes in its proxy and
# FastAPI must see real types, not strings, to build the request models there.
import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import FastAPI, Query, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve.context import _get_serve_request_context
from ray.serve.handle import DeploymentHandle, DeploymentResponse, DeploymentResponseGenerator

from deployments.contracts import EncodeOptions, ImageRequest, ImageTask, StoredImage
from deployments.images import MEDIA_TYPES
from deployments.storage import ObjectStore, UrlSigner, is_valid_object_key
from serve_app.config import AppConfig, VariantConfig
from serve_app.errors import (
    ForbiddenError,
    InvalidRequestError,
    NotFoundError,
    as_api_error,
    error_response,
    install_error_handlers,
)
from serve_app.planning import ResolvedQuality, plan_edit, plan_generation, plan_variation, resolve_quality
from serve_app.protocol import (
    ErrorResponse,
    ImageData,
    ImageEditRequest,
    ImageGenerationRequest,
    ImagesResponse,
    ImageVariationRequest,
    ModelCard,
    ModelList,
)
from serve_app.streaming import EventPrefix, StreamDescription, estimate_usage, event_stream
from serve_app.uploads import UploadLimits, form_openapi, parse_fields, read_form

FILES_ROUTE = "/v1/images/files"
READY_TIMEOUT_S = 5.0
LOCAL_TENANT = "local"

ERROR_RESPONSES: dict[int | str, dict[str, object]] = {
    status: {"model": ErrorResponse} for status in (400, 401, 403, 404, 413, 415, 429, 500, 503)
}
IMAGE_RESPONSES: dict[int | str, dict[str, Any]] = {
    **ERROR_RESPONSES,
    200: {
        "description": "The images; with stream=true, server-sent events (partial images, then completed).",
        "content": {"text/event-stream": {}},
    },
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


@dataclass(frozen=True)
class ImageResult:
    """A finished request: OpenAI's response and what each image's stages reported."""

    response: ImagesResponse
    stored: list[StoredImage]

    def headers(self) -> dict[str, str]:
        return {
            "server-timing": server_timing(self.stored),
            "x-imagegen-batch-size": ",".join(str(item.batch_size) for item in self.stored),
        }


@dataclass(frozen=True)
class ImageStream:
    """A streaming request whose first event is made: the rest of its server-sent events."""

    body: AsyncIterator[bytes]


@dataclass(frozen=True)
class ResponseFields:
    """What the response repeats about the request, beside the images."""

    prefix: EventPrefix
    quality: ResolvedQuality
    revised_prompt: str | None
    input_images: int = 0


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
        self.store = ObjectStore(config.storage.url)
        assert config.storage.signing_key is not None, "build_app sets a signing key"
        self.signer = UrlSigner(config.storage.signing_key.get_secret_value())
        self.upload_limits = UploadLimits.from_config(config.limits)
        self.created = int(time.time())

    def find_variant(self, model: str | None) -> VariantConfig:
        variant = self.config.variant(model)
        if variant is None:
            raise NotFoundError(
                f"The model {model!r} does not exist. See GET /v1/models.",
                param="model",
                code="model_not_found",
            )
        return variant

    async def generate(
        self, request: ImageGenerationRequest, request_id: str, base_url: str
    ) -> ImageResult | ImageStream:
        variant = self.find_variant(request.model)
        image_request, options = plan_generation(
            request, variant, self.config.limits, request_id=request_id, tenant=LOCAL_TENANT
        )
        fields = ResponseFields("image_generation", resolve_quality(request.quality), request.prompt)
        return await self.run(image_request, options, fields, base_url, stream=request.stream)

    async def edit(self, http_request: Request, request_id: str, base_url: str) -> ImageResult | ImageStream:
        form = await read_form(http_request, self.upload_limits)
        form.only_files("image", "image[]", "mask")
        request = parse_fields(ImageEditRequest, form.fields)
        images, masks = form.files_of("image", "image[]"), form.files_of("mask")
        if len(masks) > 1:
            raise InvalidRequestError("Send at most one mask.", param="mask")
        variant = self.find_variant(request.model)
        image_request, options = plan_edit(
            request,
            images,
            masks[0] if masks else None,
            variant,
            self.config.limits,
            request_id=request_id,
            tenant=LOCAL_TENANT,
        )
        quality = resolve_quality(request.quality)
        fields = ResponseFields("image_edit", quality, request.prompt, input_images=1)
        return await self.run(image_request, options, fields, base_url, stream=request.stream)

    async def variation(self, http_request: Request, request_id: str, base_url: str) -> ImageResult:
        form = await read_form(http_request, self.upload_limits)
        form.only_files("image")
        request = parse_fields(ImageVariationRequest, form.fields)
        variant = self.find_variant(request.model)
        image_request, options = plan_variation(
            request,
            form.files_of("image"),
            variant,
            self.config.limits,
            request_id=request_id,
            tenant=LOCAL_TENANT,
        )
        fields = ResponseFields("image_edit", resolve_quality("auto"), None, input_images=1)
        result = await self.run(image_request, options, fields, base_url, stream=False)
        assert isinstance(result, ImageResult)
        return result

    async def run(
        self,
        image_request: ImageRequest,
        options: EncodeOptions,
        fields: ResponseFields,
        base_url: str,
        *,
        stream: bool,
    ) -> ImageResult | ImageStream:
        """preprocess -> model -> postprocess for one planned request, as JSON or as a stream."""
        size = f"{image_request.width}x{image_request.height}"
        tasks = self.preprocess.prepare.remote(image_request)
        assert isinstance(tasks, DeploymentResponse)  # a unary call
        if stream:
            usage = estimate_usage(
                image_request.prompt, image_request.width, image_request.height, fields.input_images
            )
            description = StreamDescription(
                fields.prefix, size, fields.quality, "opaque", options.output_format, usage
            )
            return await self.stream(tasks, options, description)
        generated = self.models[image_request.variant].generate.remote(tasks)
        stored: list[StoredImage] = await self.postprocess.finish.remote(generated, options)
        data = [
            ImageData(
                b64_json=item.b64_json,
                url=self.signed_url(base_url, item.object_key) if item.object_key else None,
                revised_prompt=fields.revised_prompt,
                seed=item.seed,
            )
            for item in stored
        ]
        response = ImagesResponse(
            created=int(time.time()),
            data=data,
            output_format=options.output_format,
            size=size,
            quality=fields.quality,
            background="opaque",
        )
        return ImageResult(response, stored)

    async def stream(
        self,
        tasks: DeploymentResponse[list[ImageTask]],
        options: EncodeOptions,
        description: StreamDescription,
    ) -> ImageStream:
        """Start the stream and wait for its first event, so a bad request still gets a plain 4xx."""
        events = self.postprocess.options(stream=True).stream.remote(tasks, options)
        assert isinstance(events, DeploymentResponseGenerator)  # what options(stream=True) returns
        try:
            first = await events.__anext__()
        except BaseException:
            events.cancel()
            raise
        return ImageStream(event_stream(first, events, description, events.cancel))

    def signed_url(self, base_url: str, key: str) -> str:
        expires = int(time.time()) + self.config.storage.url_ttl_s
        base = (self.config.storage.public_base_url or base_url).rstrip("/")
        signature = self.signer.signature(key, expires)
        return f"{base}{FILES_ROUTE}/{key}?expires={expires}&signature={signature}"

    def read_signed_object(self, key: str, expires: str, signature: str) -> bytes:
        valid = (
            is_valid_object_key(key)
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


def respond(result: ImageResult | ImageStream) -> Response:
    if isinstance(result, ImageStream):
        return StreamingResponse(
            result.body, media_type="text/event-stream", headers={"cache-control": "no-cache"}
        )
    return JSONResponse(result.response.model_dump(exclude_none=True), headers=result.headers())


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

    @api.post(
        "/v1/images/generations",
        response_model=ImagesResponse,
        response_model_exclude_none=True,
        responses=IMAGE_RESPONSES,
        summary="Create images from a prompt",
    )
    async def create_image(
        self,
        body: ImageGenerationRequest,
        request: Request,
    ) -> Response:
        try:
            result = await self.service.generate(body, current_request_id(), str(request.base_url))
        except Exception as exc:  # every failure leaves as the OpenAI error shape
            return error_response(as_api_error(exc))
        return respond(result)

    @api.post(
        "/v1/images/edits",
        response_model=ImagesResponse,
        response_model_exclude_none=True,
        responses=IMAGE_RESPONSES,
        summary="Edit images (multipart): image-to-image, or inpainting with a mask",
        openapi_extra=form_openapi(ImageEditRequest, EDIT_FILES),
    )
    async def create_edit(self, request: Request) -> Response:
        try:
            result = await self.service.edit(request, current_request_id(), str(request.base_url))
        except Exception as exc:
            return error_response(as_api_error(exc))
        return respond(result)

    @api.post(
        "/v1/images/variations",
        response_model=ImagesResponse,
        response_model_exclude_none=True,
        responses=ERROR_RESPONSES,
        summary="Create variations of an image (multipart)",
        openapi_extra=form_openapi(ImageVariationRequest, VARIATION_FILES),
    )
    async def create_variation(self, request: Request) -> Response:
        try:
            result = await self.service.variation(request, current_request_id(), str(request.base_url))
        except Exception as exc:
            return error_response(as_api_error(exc))
        return respond(result)

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
