"""Preprocess stage: normalize a validated request, decode its uploads, expand it into image tasks."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time
import unicodedata

import numpy as np
from PIL import Image, ImageOps
from ray import serve

from deployments.config import LimitsConfig, StorageConfig
from deployments.contracts import MASK_EDIT_THRESHOLD, ImageRequest, ImageTask
from deployments.decoding import mask_from_alpha, open_upload, to_rgb_array
from deployments.errors import InvalidRequestError, quiet_serve_logs
from deployments.metrics import stage_metrics
from deployments.moderation import ModerationConfig, Moderator
from deployments.storage import ObjectStore


def normalize_prompt(text: str) -> str:
    """NFC-normalized, control characters (other than newline and tab) removed, ends trimmed."""
    text = unicodedata.normalize("NFC", text)
    kept = (char for char in text if char in "\n\t" or unicodedata.category(char)[0] != "C")
    return "".join(kept).strip()


def collage(images: list[Image.Image], width: int, height: int) -> np.ndarray:
    """The images tiled in reading order on a width x height grid, each cropped to fill its cell."""
    columns = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    canvas = Image.new("RGB", (width, height))
    for position, image in enumerate(images):
        row, column = divmod(position, columns)
        left, top = column * width // columns, row * height // rows
        right, bottom = (column + 1) * width // columns, (row + 1) * height // rows
        canvas.paste(ImageOps.fit(image.convert("RGB"), (right - left, bottom - top)), (left, top))
    return to_rgb_array(canvas)


def prepare_inputs(request: ImageRequest, max_pixels: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Decode a request's uploads into its starting image and mask, at the request's size.

    Every image is cropped to fill the output size (aspect ratio kept) as soon as it is decoded,
    so at most one full-size upload is held at a time. Several images are tiled into one
    starting image. With a mask, the first image is the one edited (as in OpenAI's API) and the
    area to repaint starts from the other images, tiled, when there are any.
    """
    size = (request.width, request.height)
    first_size: tuple[int, int] | None = None
    images: list[Image.Image] = []
    for data in request.images:
        image = open_upload(data, max_pixels=max_pixels, param="image")
        first_size = first_size or image.size
        images.append(ImageOps.fit(image.convert("RGB"), size))
    if request.mask is None or first_size is None:
        return collage(images, *size), None
    mask_image = open_upload(request.mask, max_pixels=max_pixels, param="mask")
    if mask_image.size != first_size:
        raise InvalidRequestError(
            f"The mask is {mask_image.width}x{mask_image.height} but the image is "
            f"{first_size[0]}x{first_size[1]}; they must be the same size.",
            param="mask",
            code="invalid_mask",
        )
    alpha_mask = Image.fromarray(mask_from_alpha(mask_image)[:, :, 0])
    mask = np.ascontiguousarray(np.asarray(ImageOps.fit(alpha_mask, size), dtype=np.uint8)[:, :, None])
    first = to_rgb_array(images[0])
    fill = collage(images[1:], *size) if len(images) > 1 else first
    return np.ascontiguousarray(np.where(mask >= MASK_EDIT_THRESHOLD, fill, first)), mask


def expand_request(
    request: ImageRequest, image: np.ndarray | None = None, mask: np.ndarray | None = None
) -> list[ImageTask]:
    """Image ``i`` of the request gets seed ``seed + i``, so any image can be reproduced alone.

    The ``n`` tasks share one decoded image and mask (one copy in the object store).
    """
    prompt = normalize_prompt(request.prompt)
    negative = normalize_prompt(request.negative_prompt) if request.negative_prompt else None
    return [
        ImageTask(
            request_id=request.request_id,
            index=index,
            tenant=request.tenant,
            variant=request.variant,
            kind=request.kind,
            prompt=prompt,
            negative_prompt=negative,
            width=request.width,
            height=request.height,
            steps=request.steps,
            guidance_scale=request.guidance_scale,
            seed=request.seed + index,
            strength=request.strength,
            partial_images=request.partial_images,
            image=image,
            mask=mask,
            moderation=request.moderation,
            moderation_checks=request.moderation_checks,
        )
        for index in range(request.n)
    ]


class Preprocessor:
    """The preprocess stage's work, in whichever process runs it: its own deployment
    (`Preprocess`), or the caller's when the stage is colocated (``stages.preprocess.colocate``)."""

    def __init__(
        self, limits: LimitsConfig, storage: StorageConfig, moderation: ModerationConfig | None = None
    ) -> None:
        self.limits = limits
        self.store = ObjectStore(storage)
        self.metrics = stage_metrics()
        self.moderator = Moderator(moderation or ModerationConfig(), self.metrics.count_moderation_block)
        quiet_serve_logs()

    def load_stashed_uploads(self, request: ImageRequest) -> ImageRequest:
        """A job's uploads back from the store (the job record holds only their keys)."""
        images = tuple(self.store.get(key) for key in request.input_keys)
        mask = self.store.get(request.mask_key) if request.mask_key else None
        return dataclasses.replace(request, images=images, mask=mask)

    async def ready(self) -> bool:
        return True

    async def prepare(self, request: ImageRequest) -> list[ImageTask]:
        start = time.perf_counter()
        image = mask = None
        if request.input_keys:
            request = await asyncio.to_thread(self.load_stashed_uploads, request)
        if request.images:  # decoding is CPU work: keep the replica's loop free
            image, mask = await asyncio.to_thread(prepare_inputs, request, self.limits.max_image_pixels)
        # Normalising a prompt at the length limit takes milliseconds: off the loop too.
        tasks = await asyncio.to_thread(expand_request, request, image, mask)
        # Input moderation: the normalized prompt and the starting image the model would see.
        await self.moderator.screen(
            request.request_id,
            request.moderation_checks,
            "input",
            request.moderation,
            tasks[0].prompt,
            () if image is None else (image,),
        )
        elapsed = time.perf_counter() - start
        self.metrics.observe_stage("preprocess", request.variant, elapsed)
        return [dataclasses.replace(task, preprocess_s=elapsed) for task in tasks]


@serve.deployment
class Preprocess(Preprocessor):
    """Preprocess as its own deployment, scaled apart from its callers."""
