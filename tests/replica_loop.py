"""An in-process ModelReplica for unit tests (no Ray): its event loop, the replica, image tasks."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from ray.serve import batching as serve_batching

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
    # Outside a cluster Serve's batch queue only asks the replica context for max_ongoing_requests.
    replica_context = SimpleNamespace(_deployment_config=SimpleNamespace(max_ongoing_requests=64))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(serve_batching.serve, "get_replica_context", lambda: replica_context)
        config = make_test_config(storage_dir)
        variant = config.variants[0].model_copy(update=variant_changes or {})

        async def build() -> Any:
            built = ReplicaClass(variant, config.cache_dir)
            built.family = wrap_family(built.family)
            return built

        yield loop.run_until_complete(build())


def replica_event_loop() -> Iterator[asyncio.AbstractEventLoop]:
    """A fresh loop, closed cleanly after the module's tests.

    Serve keeps one batch queue per decorated method, bound to the loop that first uses it: each
    module starts with a new queue, and the queue's tasks are cancelled and awaited before the loop
    closes (otherwise their coroutines are collected later, on a closed loop, in another test).
    """
    batch_queue: Any = ReplicaClass._run_batch.set_max_batch_size.__self__
    batch_queue._queue = None
    loop = asyncio.new_event_loop()
    try:
        yield loop
    finally:
        pending = asyncio.all_tasks(loop)
        for task in pending:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        if batch_queue._queue is not None:
            # Its task is done: without this, the queue's __del__ opens a new loop to cancel it.
            batch_queue._queue._handle_batch_task = None
        batch_queue._queue = None
        loop.close()
