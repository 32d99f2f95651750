"""Postprocess stage: encode each image and deliver it as base64 or as a stored object."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import time

from ray import serve

from deployments.contracts import EncodeOptions, GeneratedImage, StoredImage
from deployments.images import encode_image
from deployments.metrics import stage_metrics
from deployments.storage import ObjectStore, build_object_key
from serve_app.config import StorageConfig


def deliver(image: GeneratedImage, options: EncodeOptions, store: ObjectStore) -> StoredImage:
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


@serve.deployment
class Postprocess:
    def __init__(self, storage: StorageConfig) -> None:
        self.store = ObjectStore(storage)
        self.metrics = stage_metrics()

    async def ready(self) -> bool:
        return True

    async def finish(self, images: list[GeneratedImage], options: EncodeOptions) -> list[StoredImage]:
        stored = await asyncio.gather(
            *(asyncio.to_thread(deliver, image, options, self.store) for image in images)
        )
        for item in stored:
            for stage in ("postprocess", "upload"):
                if stage in item.timings:
                    self.metrics.observe_stage(stage, images[0].task.variant, item.timings[stage])
        return list(stored)
