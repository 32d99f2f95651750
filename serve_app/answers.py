"""How a client asked to be answered, and what it gets: the service's inputs and outcomes.

`Delivery` says which path a request takes (docs/architecture.md has a table for each);
`PlannedRequest` is a validated request ready for the stages; `Completed`, `Accepted` and
`Streaming` are what the routes turn into a JSON response, a 202 or server-sent events.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal

from deployments.contracts import EncodeOptions, ImageRequest, StoredImage
from serve_app.protocol import ImageData, ImageOutputFields, ImagesResponse, JobResponse, ResolvedQuality
from serve_app.streaming import EventPrefix, estimate_usage

RequestPath = Literal["sync", "streamed", "async_job", "idempotent"]


def wants_async(prefer: str | None) -> bool:
    """RFC 7240: ``Prefer: respond-async`` (possibly among other preferences)."""
    return any(part.strip().lower() == "respond-async" for part in (prefer or "").split(","))


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
    def path(self) -> RequestPath:
        """The way the request runs.

        ``Prefer: respond-async`` makes it a job answered with 202. An ``Idempotency-Key`` makes
        it a job too, whose caller waits for the result: a key must be matched against earlier
        requests by one owner and outlive this ingress replica, and the scheduler's durable job
        records are exactly that. Otherwise it runs now, streamed or not.
        """
        if wants_async(self.prefer):
            return "async_job"
        if self.idempotency_key is not None:
            return "idempotent"
        return "streamed" if self.stream else "sync"

    def with_body(self, body_sha256: str, fields: ImageOutputFields | None = None) -> Delivery:
        """This delivery with the body's digest and, for generations and edits, what their fields
        ask: streaming, a webhook."""
        if fields is None:
            return dataclasses.replace(self, body_sha256=body_sha256)
        stream, webhook_url = fields.stream, fields.webhook_url
        return dataclasses.replace(self, body_sha256=body_sha256, stream=stream, webhook_url=webhook_url)

    @property
    def as_job(self) -> bool:
        return self.path in ("async_job", "idempotent")


@dataclass(frozen=True)
class ResponseFields:
    """What the response repeats about the request, beside the images."""

    prefix: EventPrefix
    quality: ResolvedQuality
    revised_prompt: str | None


@dataclass(frozen=True)
class PlannedRequest:
    """A validated request, ready for the stages, and what its response will repeat."""

    request: ImageRequest
    options: EncodeOptions
    fields: ResponseFields


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


def response_background(options: EncodeOptions) -> Literal["transparent", "opaque"]:
    """The background the images have: transparent only when asked for (and planning allowed it)."""
    return "transparent" if options.background == "transparent" else "opaque"


def variant_headers(request: ImageRequest) -> dict[str, str]:
    """Which variant served the request, and through which alias."""
    headers = {"x-model-variant": request.variant}
    if request.alias is not None:
        headers["x-model-alias"] = request.alias
    return headers


def server_timing(images: list[StoredImage], scheduler_s: float) -> str:
    """A Server-Timing header: the scheduler wait, then each stage's slowest time, in ms."""
    stages: dict[str, float] = {"scheduler": scheduler_s}
    for image in images:
        for stage, seconds in image.timings.items():
            stages[stage] = max(stages.get(stage, 0.0), seconds)
    return ", ".join(f"{stage};dur={seconds * 1000:.1f}" for stage, seconds in stages.items())


def images_response(
    request: ImageRequest, options: EncodeOptions, quality: str, data: list[ImageData]
) -> ImagesResponse:
    """OpenAI's images response for ``data``, made for ``request``."""
    return ImagesResponse(
        created=int(time.time()),
        data=data,
        output_format=options.output_format,
        size=f"{request.width}x{request.height}",
        quality=quality,
        background=response_background(options),
        usage=estimate_usage(request.prompt, request.width, request.height, request.input_images, len(data)),
        safety_identifier=request.safety_identifier,
        variant=request.variant,
        alias=request.alias,
    )
