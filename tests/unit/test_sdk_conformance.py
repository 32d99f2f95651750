"""Conformance with the installed openai SDK, read from its own types.

Every field of the SDK's request types (``image_generate_params``, ``image_edit_params``,
``image_create_variation_params``), with every value its type allows, is sent by the real SDK
(its transport captures the request), parsed and planned by the service's own code, and either
accepted or refused with a 400 (404 for an unknown model) that names the field. Every response
made for an accepted request validates against ``openai.types.ImagesResponse`` with no fields
beyond our documented extensions; streamed events validate against the SDK's event types.
"""

from __future__ import annotations

import asyncio
import io
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import httpx
import openai.types as sdk
import pytest
import typing_extensions
from openai import OpenAI
from openai.types import image_create_variation_params, image_edit_params, image_generate_params
from PIL import Image
from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from deployments.contracts import EncodedPartialImage, ImageRequest, StoredImage
from deployments.errors import APIError
from deployments.stage_chain import StageChain
from serve_app.answers import Completed, Delivery, Outcome, PlannedRequest, images_response
from serve_app.auth import Principal
from serve_app.config import AppConfig
from serve_app.errors import http_status
from serve_app.protocol import ImageData
from serve_app.service import ImageService
from serve_app.streaming import StreamDescription, estimate_usage, image_event
from serve_app.uploads import UploadLimits, read_edit, read_generation, read_variation
from tests.conftest import make_test_config
from tests.sdk_shapes import RESPONSE_EXTENSIONS, extra_fields

Route = Literal["generations", "edits", "variations"]
SDK_REQUEST_TYPES: dict[Route, list[type]] = {
    "generations": [
        image_generate_params.ImageGenerateParamsNonStreaming,
        image_generate_params.ImageGenerateParamsStreaming,
    ],
    "edits": [image_edit_params.ImageEditParamsNonStreaming, image_edit_params.ImageEditParamsStreaming],
    "variations": [image_create_variation_params.ImageCreateVariationParams],
}
VARIANT_SIZES = {"auto", "64x64", "128x128"}
NEVER_HONOURED = {"complexity", "frame_count", "frame_duration_ms", "svg", "markup"}


def png(size: tuple[int, int] = (64, 64), mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, (10, 20, 30, 0) if mode == "RGBA" else (10, 20, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def is_file_type(annotation: Any) -> bool:
    return "IO[bytes]" in str(annotation)


def samples(annotation: Any) -> list[Any]:
    """Every value a field's type allows, one sample per open type (str, int, an object)."""
    origin = get_origin(annotation)
    if origin is Literal:
        return list(get_args(annotation))
    if origin is Union:
        return [value for member in get_args(annotation) for value in samples(member)]
    if annotation is type(None):
        return [None]
    if annotation is str:
        return ["sample"]
    if annotation is int:
        return [2]
    if typing_extensions.is_typeddict(annotation):
        return [{name: samples(hint)[0] for name, hint in typing.get_type_hints(annotation).items()}]
    raise AssertionError(f"no sample for {annotation}")


def sdk_fields(route: Route) -> dict[str, list[Any]]:
    """Each field of the route's SDK request types, with the values to try (files: one upload)."""
    fields: dict[str, list[Any]] = {}
    for request_type in SDK_REQUEST_TYPES[route]:
        for name, hint in typing.get_type_hints(request_type).items():
            values = [("file.png", png(mode="RGBA"), "image/png")] if is_file_type(hint) else samples(hint)
            fields.setdefault(name, [])
            fields[name] += [value for value in values if value not in fields[name]]
    return fields


def expected_refusal(field: str, value: Any) -> bool:
    if value is None:
        return False  # null means the default
    return (
        field in NEVER_HONOURED
        or (field == "output_format" and value in ("gif", "svg"))
        or (field == "background" and value == "transparent")
        or (field == "model" and value != "tiny-sd")
        or (field == "size" and value not in VARIANT_SIZES)
    )


def capture(send: Callable[[OpenAI], object]) -> httpx.Request:
    """The HTTP request the real SDK makes for ``send`` (answered with an empty response)."""
    sent: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(200, json={"created": 0, "data": []})

    transport = httpx.Client(transport=httpx.MockTransport(answer))
    client = OpenAI(base_url="http://sdk.test/v1", api_key="sk-test", http_client=transport, max_retries=0)
    send(client)
    return sent[0]


def starlette_request(request: httpx.Request) -> Request:
    body = request.read()
    headers = [(name.lower(), value) for name, value in request.headers.raw]
    scope = {"type": "http", "method": "POST", "path": request.url.path, "headers": headers}
    delivered = False

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if delivered:
            return {"type": "http.disconnect"}
        delivered = True
        return {"type": "http.request", "body": body, "more_body": False}

    return Request(scope, receive)


class PlanningService(ImageService):
    """The real service down to planning; ``answer`` answers at once instead of running models."""

    planned: list[ImageRequest]

    async def answer(self, planned: PlannedRequest, principal: Principal, delivery: Delivery) -> Outcome:
        request = planned.request
        self.planned.append(request)
        data = [ImageData(b64_json="AAAA", seed=request.seed + i) for i in range(request.n)]
        return Completed(images_response(request, planned.options, planned.fields.quality, data))


@pytest.fixture
def service(tmp_path: Path) -> PlanningService:
    service = PlanningService(make_test_config(tmp_path / "store"), StageChain(None, None, {}), None)  # type: ignore[arg-type]
    service.planned = []
    return service


def handle(service: PlanningService, route: Route, request: httpx.Request) -> Outcome:
    """What the ingress does with the SDK's request: read the body into its typed object, then
    hand it to the service."""
    principal, delivery = Principal("acme", "paid"), Delivery("http://test/")
    limits = UploadLimits.from_config(service.config.limits)

    async def run() -> Outcome:
        http_request = starlette_request(request)
        if route == "generations":
            body = await read_generation(http_request, limits)
            return await service.generate(body, principal, "req_1", delivery)
        if route == "edits":
            upload = await read_edit(http_request, limits)
            return await service.edit(upload, principal, "req_1", delivery)
        variation = await read_variation(http_request, limits)
        return await service.variation(variation, principal, "req_1", delivery)

    return asyncio.run(run())


def send(route: Route, field: str, value: Any) -> Callable[[OpenAI], object]:
    image = ("image.png", png(), "image/png")
    if route == "generations":
        base: dict[str, Any] = {"prompt": "a lighthouse"}
        return lambda client: client.images.generate(**{**base, field: value})
    if route == "edits":
        base = {"prompt": "a lighthouse", "image": image}
        return lambda client: client.images.edit(**{**base, field: value})
    return lambda client: client.images.create_variation(**{"image": image, field: value})


CASES = [
    (route, field, value)
    for route in typing.get_args(Route)
    for field, values in sdk_fields(route).items()
    for value in values
]


@pytest.mark.parametrize(("route", "field", "value"), CASES, ids=[f"{r}-{f}-{v!r:.20}" for r, f, v in CASES])
def test_every_sdk_field_is_accepted_or_refused_by_name(
    service: PlanningService, route: Route, field: str, value: Any
) -> None:
    request = capture(send(route, field, value))
    try:
        outcome = handle(service, route, request)
    except APIError as error:
        assert expected_refusal(field, value), f"{field}={value!r} refused: {error.message}"
        assert error.param == field
        assert http_status(error) == (404 if field == "model" else 400)
        assert field in error.message
        assert "Unrecognized" not in error.message
        return
    assert not expected_refusal(field, value), f"{field}={value!r} was accepted"
    assert isinstance(outcome, Completed)
    body = outcome.response.model_dump(mode="json", exclude_none=True)
    response = sdk.ImagesResponse.model_validate(body)
    assert extra_fields(response) <= RESPONSE_EXTENSIONS
    assert response.usage is not None and response.usage.output_tokens_details is not None
    assert response.usage.total_tokens == response.usage.input_tokens + response.usage.output_tokens


def test_the_sdk_fields_reach_the_planned_request(service: PlanningService) -> None:
    """Not only accepted: safety_identifier (over user), moderation and quality take effect."""
    request = capture(
        lambda client: client.images.generate(
            prompt="a lighthouse", safety_identifier="hash-1", user="u", quality="xhigh", moderation="low"
        )
    )
    outcome = handle(service, "generations", request)
    planned = service.planned[-1]
    assert (planned.safety_identifier, planned.moderation, planned.steps) == ("hash-1", "low", 12)
    assert isinstance(outcome, Completed)
    assert (outcome.response.safety_identifier, outcome.response.quality) == ("hash-1", "xhigh")
    fallback = capture(
        lambda client: client.images.generate(prompt="a lighthouse", user="u", safety_identifier="")
    )
    handle(service, "generations", fallback)
    assert service.planned[-1].safety_identifier == "u"


def test_a_variant_without_xhigh_refuses_it_by_name(tmp_path: Path) -> None:
    config = make_test_config(tmp_path / "store")
    variant = config.variants[0]
    plain = variant.model_copy(
        update={"steps": variant.steps.model_copy(update={"xhigh": None, "max": None})}
    )
    service = PlanningService(
        config.model_copy(update={"variants": [plain]}), StageChain(None, None, {}), None
    )  # type: ignore[arg-type]
    service.planned = []
    request = capture(lambda client: client.images.generate(prompt="a lighthouse", quality="max"))
    with pytest.raises(APIError) as refused:
        handle(service, "generations", request)
    assert (refused.value.param, refused.value.code) == ("quality", "unsupported_value")
    assert "low, medium, high" in refused.value.message


def test_quality_steps_config_is_strict(config: AppConfig) -> None:
    variant = config.variants[0].model_dump()
    for steps in (
        {"low": 2, "medium": 4, "high": 8, "max": 16},
        {"low": 2, "medium": 4, "high": 8, "xhigh": 6},
    ):
        with pytest.raises(ValidationError):
            type(config.variants[0]).model_validate({**variant, "steps": steps})


@pytest.mark.parametrize(
    ("prefix", "event_type"),
    [
        ("image_generation", sdk.ImageGenCompletedEvent),
        ("image_edit", sdk.ImageEditCompletedEvent),
        ("image_generation", sdk.ImageGenPartialImageEvent),
        ("image_edit", sdk.ImageEditPartialImageEvent),
    ],
)
def test_stream_events_validate_against_the_sdk_event_types(prefix: str, event_type: type[BaseModel]) -> None:
    usage = estimate_usage("a lighthouse", 64, 64, input_images=1 if prefix == "image_edit" else 0)
    description = StreamDescription(prefix, "64x64", "xhigh", "opaque", "png", usage, "hash-1")  # type: ignore[arg-type]
    partial = "Partial" in event_type.__name__
    event = (
        EncodedPartialImage(0, 0, "AAAA")
        if partial
        else StoredImage(seed=1, output_format="png", byte_count=3, batch_size=1, timings={}, b64_json="AAAA")
    )
    data = image_event(event, description).decode().split("data: ", 1)[1]
    parsed = event_type.model_validate_json(data)
    allowed = set() if partial else {"usage.output_tokens_details"}  # the same usage shape as responses
    assert extra_fields(parsed) <= allowed
    if not partial:
        assert parsed.safety_identifier == "hash-1"  # type: ignore[attr-defined]
