"""The objects that cross stage boundaries, defined once and imported by both sides.

Pixels travel as contiguous ``uint8`` (H, W, C) numpy arrays: small, zero-copy in Ray's object
store, cheap to encode. Nothing here imports torch, so the HTTP-facing stages stay light.
Uploaded files cross one boundary as the raw bytes the client sent (ingress -> preprocess); from
preprocess on they are decoded arrays, shared by the ``n`` tasks of a request.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

TaskKind = Literal["generate", "edit", "variation"]
OutputFormat = Literal["png", "jpeg", "webp"]
Background = Literal["auto", "opaque", "transparent"]
ModerationLevel = Literal["auto", "low"]
TaskKey = tuple[str, int]
"""(request id, image index): one image task, across stages."""
MASK_EDIT_THRESHOLD = 128
"""Mask values at or above this are repainted (alpha below 128: mostly transparent)."""


@dataclass(frozen=True)
class ShapeBucket:
    """Image tasks that may share one forward pass: same variant, task kind, shape and schedule.

    ``masked`` splits edits with a mask (inpainting) from edits without (image-to-image): they
    run different pipelines. ``strength`` is part of the schedule of both.
    """

    variant: str
    kind: TaskKind
    width: int
    height: int
    steps: int
    guidance_scale: float
    strength: float | None = None
    masked: bool = False


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
    strength: float | None = None
    partial_images: int = 0
    images: tuple[bytes, ...] = field(default=(), repr=False)
    mask: bytes | None = field(default=None, repr=False)
    input_keys: tuple[str, ...] = ()
    """A job's uploads, stashed in the object store instead of ``images`` (preprocess reads them)."""
    mask_key: str | None = None
    safety_identifier: str | None = None
    """The end user: the request's ``safety_identifier``, else its ``user`` (for the log and limits)."""
    moderation: ModerationLevel = "auto"
    moderation_checks: tuple[str, ...] = ()
    """The moderation checks this request runs (by name), chosen by its tier and variant."""
    alias: str | None = None
    """The alias the request's ``model`` named, when it named one (``variant`` is its choice)."""

    @property
    def input_images(self) -> int:
        """How many images the client uploaded (held as bytes, or stashed under ``input_keys``)."""
        return len(self.images) or len(self.input_keys)


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
    strength: float | None = None
    partial_images: int = 0
    image: np.ndarray | None = field(default=None, compare=False, repr=False)
    """The starting image of an edit or variation: uint8 (height, width, 3)."""
    mask: np.ndarray | None = field(default=None, compare=False, repr=False)
    """Where to edit: uint8 (height, width, 1), >= MASK_EDIT_THRESHOLD repaints (from the mask's alpha)."""
    moderation: ModerationLevel = "auto"
    moderation_checks: tuple[str, ...] = ()

    @property
    def key(self) -> TaskKey:
        return (self.request_id, self.index)

    @property
    def bucket(self) -> ShapeBucket:
        return ShapeBucket(
            self.variant,
            self.kind,
            self.width,
            self.height,
            self.steps,
            self.guidance_scale,
            self.strength,
            self.mask is not None,
        )


@dataclass(frozen=True)
class GeneratedImage:
    """What a model replica returns for one task."""

    task: ImageTask
    pixels: np.ndarray
    batch_size: int
    timings: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class PartialImage:
    """A preview of one task, decoded from its latents between denoising steps (streaming)."""

    task: ImageTask
    partial_image_index: int
    pixels: np.ndarray


ModelEvent = PartialImage | GeneratedImage
"""What a model replica streams for one task: its previews, then its image."""


@dataclass(frozen=True)
class EncodeOptions:
    """How postprocess encodes and delivers the images of one request."""

    output_format: OutputFormat = "png"
    compression: int | None = None
    response_format: Literal["url", "b64_json"] = "b64_json"
    background: Background = "auto"
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


@dataclass(frozen=True)
class EncodedPartialImage:
    """A preview as the client gets it: base64 in the request's output format."""

    task_index: int
    partial_image_index: int
    b64_json: str


StreamEvent = EncodedPartialImage | StoredImage
"""What postprocess streams to the ingress: previews, then each finished image."""


def group_by_bucket(tasks: list[ImageTask]) -> dict[ShapeBucket, list[int]]:
    """Indices of ``tasks`` grouped by shape bucket, buckets in order of first arrival."""
    groups: dict[ShapeBucket, list[int]] = {}
    for position, task in enumerate(tasks):
        groups.setdefault(task.bucket, []).append(position)
    return groups
