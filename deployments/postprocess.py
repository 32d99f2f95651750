"""Postprocess stage: encode each image and return it as base64 or as a stored object.

Streaming requests run through here too: ``stream`` calls the request's model replica (its handle
comes with the call) with ``options(stream=True)`` and encodes each preview and image as it
arrives, so every output pixel passes this stage (and only encoded bytes go on to the ingress).
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import time
from collections.abc import AsyncGenerator

import numpy as np
from ray import serve
from ray.serve.handle import DeploymentResponseGenerator

from deployments.config import StorageConfig
from deployments.contracts import (
    EncodedPartialImage,
    EncodeOptions,
    GeneratedImage,
    ImageTask,
    PartialImage,
    StoredImage,
    StreamEvent,
)
from deployments.errors import quiet_serve_logs
from deployments.images import encode_image
from deployments.in_process import LocalEvents, StageHandle
from deployments.metrics import stage_metrics
from deployments.moderation import ModerationConfig, Moderator
from deployments.storage import ObjectStore, build_object_key


def encode_and_store(image: GeneratedImage, options: EncodeOptions, store: ObjectStore) -> StoredImage:
    """Encode one image and either inline it or write it to the store (blocking; run in a thread)."""
    started = time.perf_counter()
    data = encode_image(image.pixels, options.output_format, options.compression)
    encoded = time.perf_counter()
    b64_json = object_key = None
    if options.response_format == "b64_json":
        b64_json = base64.b64encode(data).decode("ascii")
    else:
        stable_name = f"{options.job_id}/{image.task.index}" if options.job_id else None
        created = (
            dt.datetime.fromtimestamp(options.job_created_at, dt.UTC) if options.job_created_at else None
        )
        object_key = build_object_key(image.task.tenant, options.output_format, created, stable_name)
        store.put(object_key, data)
    timings = {"postprocess": encoded - started}
    if object_key:
        timings["upload"] = time.perf_counter() - encoded
    return StoredImage(
        seed=image.task.seed,
        output_format=options.output_format,
        byte_count=len(data),
        batch_size=image.batch_size,
        timings={**image.timings, **timings},
        b64_json=b64_json,
        object_key=object_key,
    )


def encode_partial(partial: PartialImage, options: EncodeOptions) -> EncodedPartialImage:
    """A preview in the request's output format, as base64 (blocking; run in a thread)."""
    data = encode_image(partial.pixels, options.output_format, options.compression)
    return EncodedPartialImage(
        task_index=partial.task.index,
        partial_image_index=partial.partial_image_index,
        b64_json=base64.b64encode(data).decode("ascii"),
    )


class Postprocessor:
    """The postprocess stage's work, in whichever process runs it: its own deployment
    (`Postprocess`), or the caller's when the stage is colocated (``stages.postprocess.colocate``)."""

    def __init__(self, storage: StorageConfig, moderation: ModerationConfig | None = None) -> None:
        self.store = ObjectStore(storage)
        self.metrics = stage_metrics()
        self.moderator = Moderator(moderation or ModerationConfig(), self.metrics.count_moderation_block)
        quiet_serve_logs()  # a stream's bad input surfaces here too

    async def ready(self) -> bool:
        return True

    async def screen(self, task: ImageTask, pixels: np.ndarray) -> None:
        """Output moderation of one image (a preview or the image) before it leaves this stage."""
        await self.moderator.screen(
            task.request_id, task.moderation_checks, "output", task.moderation, task.prompt, (pixels,)
        )

    async def finish(self, images: list[GeneratedImage], options: EncodeOptions) -> list[StoredImage]:
        # Every image is screened before any is stored: a blocked request leaves nothing behind.
        await asyncio.gather(*(self.screen(image.task, image.pixels) for image in images))
        stored = await asyncio.gather(
            *(asyncio.to_thread(encode_and_store, image, options, self.store) for image in images)
        )
        for item in stored:
            for stage in ("postprocess", "upload"):
                if stage in item.timings:
                    self.metrics.observe_stage(stage, images[0].task.variant, item.timings[stage])
        return list(stored)

    async def stream(
        self, tasks: list[ImageTask], options: EncodeOptions, model: StageHandle
    ) -> AsyncGenerator[StreamEvent, None]:
        """A request's previews and images from its model replica (``model``), each encoded as it
        comes. Closing this stream (a client disconnect) cancels the model call, which stops the task.
        """
        events = model.options(stream=True).generate_stream.remote(tasks)
        assert isinstance(events, DeploymentResponseGenerator | LocalEvents)  # a stream call's answer
        finished = False
        try:
            async for event in events:
                await self.screen(event.task, event.pixels)
                if isinstance(event, PartialImage):
                    yield await asyncio.to_thread(encode_partial, event, options)
                else:
                    stored = await asyncio.to_thread(encode_and_store, event, options, self.store)
                    seconds = stored.timings["postprocess"]
                    self.metrics.observe_stage("postprocess", event.task.variant, seconds)
                    yield stored
            finished = True
        finally:
            if not finished:
                events.cancel()


@serve.deployment
class Postprocess(Postprocessor):
    """Postprocess as its own deployment, scaled apart from its callers."""
