"""OpenAI's image streams as server-sent events: partial images, then the completed image.

Each event is ``event: <type>`` and ``data: <json>``, with the fields OpenAI sends (see the SDK's
``ImageGenPartialImageEvent`` / ``ImageEditCompletedEvent``). A failure after the stream has
started is sent as an ``error`` event in OpenAI's error shape, which the SDKs raise.
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from typing import Literal

from deployments.contracts import EncodedPartialImage, StreamEvent
from deployments.errors import APIError
from serve_app.errors import as_api_error, error_body
from serve_app.protocol import (
    ImageCompletedEvent,
    ImagePartialImageEvent,
    ImageUsage,
    ImageUsageDetails,
    ResolvedQuality,
)

EventPrefix = Literal["image_generation", "image_edit"]
PartialType = Literal["image_generation.partial_image", "image_edit.partial_image"]
CompletedType = Literal["image_generation.completed", "image_edit.completed"]
PARTIAL_TYPES: dict[EventPrefix, PartialType] = {
    "image_generation": "image_generation.partial_image",
    "image_edit": "image_edit.partial_image",
}
COMPLETED_TYPES: dict[EventPrefix, CompletedType] = {
    "image_generation": "image_generation.completed",
    "image_edit": "image_edit.completed",
}
LATENT_CELL = 8
"""Pixels per side of one image token: a latent cell of a Stable-Diffusion-style VAE."""


@dataclass(frozen=True)
class StreamDescription:
    """What every event of one stream repeats about the request."""

    prefix: EventPrefix
    size: str
    quality: ResolvedQuality
    background: Literal["transparent", "opaque", "auto"]
    output_format: Literal["png", "jpeg", "webp"]
    usage: ImageUsage
    safety_identifier: str | None = None


def estimate_usage(
    prompt: str, width: int, height: int, input_images: int, output_images: int = 1
) -> ImageUsage:
    """OpenAI's usage fields, estimated: image tokens are latent cells, text tokens ~4 UTF-8 bytes."""
    cells = (width // LATENT_CELL) * (height // LATENT_CELL)
    text_tokens = math.ceil(len(prompt.encode()) / 4)
    input_image_tokens = cells * input_images
    output_image_tokens = cells * output_images
    return ImageUsage(
        input_tokens=text_tokens + input_image_tokens,
        input_tokens_details=ImageUsageDetails(image_tokens=input_image_tokens, text_tokens=text_tokens),
        output_tokens=output_image_tokens,
        output_tokens_details=ImageUsageDetails(image_tokens=output_image_tokens, text_tokens=0),
        total_tokens=text_tokens + input_image_tokens + output_image_tokens,
    )


def server_sent_event(name: str, data: str) -> bytes:
    return f"event: {name}\ndata: {data}\n\n".encode()


def image_event(event: StreamEvent, description: StreamDescription) -> bytes:
    model: ImagePartialImageEvent | ImageCompletedEvent
    if isinstance(event, EncodedPartialImage):
        model = ImagePartialImageEvent(
            type=PARTIAL_TYPES[description.prefix],
            b64_json=event.b64_json,
            partial_image_index=event.partial_image_index,
            size=description.size,
            quality=description.quality,
            background=description.background,
            output_format=description.output_format,
            created_at=int(time.time()),
        )
    else:
        model = ImageCompletedEvent(
            type=COMPLETED_TYPES[description.prefix],
            b64_json=event.b64_json or "",
            size=description.size,
            quality=description.quality,
            background=description.background,
            output_format=description.output_format,
            created_at=int(time.time()),
            usage=description.usage,
            safety_identifier=description.safety_identifier,
        )
    return server_sent_event(model.type, model.model_dump_json())


def error_event(error: APIError) -> bytes:
    return server_sent_event("error", error_body(error).model_dump_json())


async def event_stream(
    first: StreamEvent,
    rest: AsyncIterator[StreamEvent],
    description: StreamDescription,
    cancel: Callable[[], None],
) -> AsyncGenerator[bytes, None]:
    """The SSE body: ``first`` (awaited before the response started, so errors could still be a
    plain 4xx), then the rest. ``cancel`` stops the work upstream if the client goes away."""
    finished = False
    try:
        yield image_event(first, description)
        async for event in rest:
            yield image_event(event, description)
        finished = True
    except Exception as failure:  # headers are sent: the error travels as an event
        finished = True
        yield error_event(as_api_error(failure))
    finally:
        if not finished:
            cancel()
