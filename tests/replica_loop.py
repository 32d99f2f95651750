"""An in-process ModelReplica for unit tests (no Ray): its event loop, the replica, image tasks."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from deployments.contracts import ImageTask
from deployments.model_replica import ModelReplica
from tests.conftest import make_test_config

ReplicaClass: Any = ModelReplica.func_or_class  # type: ignore[attr-defined]


def make_task(index: int, width: int = 64, steps: int = 2, **changes: object) -> ImageTask:
    """A tiny-sd generation task; ``changes`` replace any of its fields."""
    task = ImageTask(
        request_id=f"req-{index}",
        index=0,
        tenant="local",
        variant="tiny-sd",
        kind="generate",
        prompt=f"prompt {index}",
        negative_prompt=None,
        width=width,
        height=width,
        steps=steps,
        guidance_scale=5.0,
        seed=index,
    )
    return dataclasses.replace(task, **changes)  # type: ignore[arg-type]


def in_process_replica(
    loop: asyncio.AbstractEventLoop,
    storage_dir: Path,
    variant_changes: dict[str, Any] | None = None,
    wrap_family: Callable[[Any], Any] = lambda family: family,
) -> Iterator[Any]:
    """The test config's tiny-sd ModelReplica, built on ``loop``, with ``variant_changes``."""
    config = make_test_config(storage_dir)
    variant = config.variants[0].model_copy(update=variant_changes or {})

    async def build() -> Any:
        built = ReplicaClass(variant, config.cache_dir)
        built.family = wrap_family(built.family)
        return built

    yield loop.run_until_complete(build())


def replica_event_loop() -> Iterator[asyncio.AbstractEventLoop]:
    """A fresh loop; the tasks left on it (replicas' batch queues) are cancelled and awaited before
    it closes."""
    loop = asyncio.new_event_loop()
    try:
        yield loop
    finally:
        pending = asyncio.all_tasks(loop)
        for task in pending:
            task.cancel()
        if pending:  # gather() of nothing makes a future on another loop
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.close()
