"""The batched model replica: one deployment per variant, one copy of the weights per replica.

Calls carry a request's image tasks; each task joins the replica's batch queue on its own, so
images of concurrent requests share forward passes. A batch is split by shape bucket and never
mixes buckets in one pass. The forward pass runs in a worker thread so the replica keeps
answering (health checks, new arrivals) while it computes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

from ray import serve

from deployments.contracts import GeneratedImage, ImageTask, group_by_bucket
from deployments.metrics import stage_metrics
from deployments.models.registry import load_family
from serve_app.config import BatchingConfig, VariantConfig

logger = logging.getLogger("ray.serve")

QueuedTask = tuple[ImageTask, float]


@serve.deployment
class ModelReplica:
    def __init__(self, variant: VariantConfig, cache_dir: Path) -> None:
        self.variant = variant
        self.family, description = load_family(variant, cache_dir)
        self.metrics = stage_metrics()
        self.batching = variant.batching
        self._model_free = asyncio.Event()
        self._model_free.set()
        self._apply_batching(variant.batching)
        logger.info(description)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Live batching changes from a Serve config's ``user_config`` (validated like the YAML)."""
        self._apply_batching(BatchingConfig(**user_config))

    def _apply_batching(self, batching: BatchingConfig) -> None:
        self.batching = batching
        self._run_batch.set_max_batch_size(batching.max_batch_size)  # type: ignore[attr-defined]
        self._run_batch.set_batch_wait_timeout_s(batching.batch_wait_timeout_s)  # type: ignore[attr-defined]

    async def ready(self) -> bool:
        return True

    async def generate(self, tasks: list[ImageTask]) -> list[GeneratedImage]:
        """Generate every task of one request; each task is batched with whatever else is queued."""
        arrived = time.perf_counter()
        # Serve forms the next batch as soon as a task arrives, even while a forward pass runs, so
        # tasks arriving behind a busy model would wait in many small batches. Held here, they join
        # the queue together when it frees up and leave in one full batch.
        await self._model_free.wait()
        return list(await asyncio.gather(*(self._run_batch((task, arrived)) for task in tasks)))

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _run_batch(self, queued: list[QueuedTask]) -> list[GeneratedImage]:
        tasks = [task for task, _ in queued]
        results: list[GeneratedImage | None] = [None] * len(tasks)
        self._model_free.clear()
        try:
            for positions in group_by_bucket(tasks).values():
                group = [tasks[position] for position in positions]
                started = time.perf_counter()
                pixels = await asyncio.to_thread(self.family.generate, group)
                elapsed = time.perf_counter() - started
                self.metrics.observe_batch(self.variant.name, len(group))
                self.metrics.observe_stage("model", self.variant.name, elapsed)
                for position, image in zip(positions, pixels, strict=True):
                    task, arrived = queued[position]
                    timings = {"preprocess": task.preprocess_s, "queue": started - arrived, "model": elapsed}
                    results[position] = GeneratedImage(task, image, batch_size=len(group), timings=timings)
        finally:
            self._model_free.set()
        return [result for result in results if result is not None]
