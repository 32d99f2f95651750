"""The objects that cross stage boundaries, defined once and imported by both sides.

Pixels travel as contiguous ``uint8`` (H, W, C) numpy arrays: small, zero-copy in Ray's object
store, cheap to encode. Nothing here imports torch, so the HTTP-facing stages stay light.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

TaskKind = Literal["generate", "edit", "variation"]
OutputFormat = Literal["png", "jpeg", "webp"]


@dataclass(frozen=True)
class ShapeBucket:
    """Image tasks that may share one forward pass: same variant, task kind, shape and schedule."""

    variant: str
    kind: TaskKind
    width: int
    height: int
    steps: int
    guidance_scale: float


@dataclass(frozen=True)
class ImageRequest:
    """One validated API request, before preprocess expands it into ``n`` image tasks."""

    request_id: str
    tenant: str
    variant: str
    kind: TaskKind
    prompt: str
    negative_prompt: str | None
    n: int
    width: int
    height: int
    steps: int
    guidance_scale: float
    seed: int


@dataclass(frozen=True)
class ImageTask:
    """One image to make. A request with ``n`` images becomes ``n`` tasks with seeds seed, seed+1, ..."""

    request_id: str
    index: int
    tenant: str
    variant: str
    kind: TaskKind
    prompt: str
    negative_prompt: str | None
    width: int
    height: int
    steps: int
    guidance_scale: float
    seed: int
    preprocess_s: float = 0.0

    @property
    def bucket(self) -> ShapeBucket:
        return ShapeBucket(self.variant, self.kind, self.width, self.height, self.steps, self.guidance_scale)


@dataclass(frozen=True)
class GeneratedImage:
    """What a model replica returns for one task."""

    task: ImageTask
    pixels: np.ndarray
    batch_size: int
    timings: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class EncodeOptions:
    """How postprocess encodes and delivers the images of one request."""

    output_format: OutputFormat = "png"
    compression: int | None = None
    response_format: Literal["url", "b64_json"] = "b64_json"
    job_id: str | None = None  # set for jobs: their objects get stable keys, so a retry never duplicates
    job_created_at: float | None = None  # the job's creation time (UNIX seconds) dates its keys


@dataclass(frozen=True)
class StoredImage:
    """What the client gets for one image: base64 bytes, or an object key to sign into a URL."""

    seed: int
    output_format: OutputFormat
    byte_count: int
    batch_size: int
    timings: dict[str, float]
    b64_json: str | None = None
    object_key: str | None = None


def group_by_bucket(tasks: list[ImageTask]) -> dict[ShapeBucket, list[int]]:
    """Indices of ``tasks`` grouped by shape bucket, buckets in order of first arrival."""
    groups: dict[ShapeBucket, list[int]] = {}
    for position, task in enumerate(tasks):
        groups.setdefault(task.bucket, []).append(position)
    return groups
