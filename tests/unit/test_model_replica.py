"""The batched replica without a cluster, as Ray's own batching tests do: real tiny model, asyncio."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import Iterator
from types import SimpleNamespace

import numpy as np
import pytest
from ray.serve import batching as serve_batching

from deployments.contracts import ImageTask
from deployments.model_replica import ModelReplica
from serve_app.config import AppConfig
from tests.conftest import make_test_config

ReplicaClass = ModelReplica.func_or_class  # type: ignore[attr-defined]


def make_task(index: int, width: int = 64, steps: int = 2) -> ImageTask:
    return ImageTask(
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


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    # Serve's batch queue binds to the loop it was created on: one loop for the whole module.
    event_loop = asyncio.new_event_loop()
    yield event_loop
    event_loop.close()


@pytest.fixture(scope="module")
def replica(loop: asyncio.AbstractEventLoop, tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    # Outside a cluster Serve's batch queue only asks the replica context for max_ongoing_requests.
    replica_context = SimpleNamespace(_deployment_config=SimpleNamespace(max_ongoing_requests=64))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(serve_batching.serve, "get_replica_context", lambda: replica_context)
        config: AppConfig = make_test_config(tmp_path_factory.mktemp("store"))

        async def build() -> object:
            return ReplicaClass(config.variants[0], config.cache_dir)

        yield loop.run_until_complete(build())


async def generate_concurrently(replica: object, tasks: list[ImageTask]) -> list[int]:
    results = await asyncio.gather(*(replica.generate([task]) for task in tasks))  # type: ignore[attr-defined]
    for (image,), task in zip(results, tasks, strict=True):
        assert image.pixels.dtype == np.uint8
        assert image.pixels.shape == (task.height, task.width, 3)
        assert image.pixels.flags["C_CONTIGUOUS"]
        assert image.task == task
    return [image.batch_size for (image,) in results]


def test_concurrent_tasks_are_batched(replica: object, loop: asyncio.AbstractEventLoop) -> None:
    sizes = loop.run_until_complete(generate_concurrently(replica, [make_task(i) for i in range(6)]))
    assert max(sizes) > 1


def test_buckets_never_share_a_forward_pass(replica: object, loop: asyncio.AbstractEventLoop) -> None:
    tasks = [make_task(i, width=64) for i in range(3)] + [make_task(i, width=128) for i in range(3, 5)]
    sizes = loop.run_until_complete(generate_concurrently(replica, tasks))
    assert all(size <= 3 for size in sizes[:3])
    assert all(size <= 2 for size in sizes[3:])


def test_reconfigure_changes_batch_size_live(replica: object, loop: asyncio.AbstractEventLoop) -> None:
    replica.reconfigure({"max_batch_size": 1, "batch_wait_timeout_s": 0.0})  # type: ignore[attr-defined]
    try:
        sizes = loop.run_until_complete(generate_concurrently(replica, [make_task(i) for i in range(4)]))
        assert sizes == [1, 1, 1, 1]
    finally:
        replica.reconfigure({"max_batch_size": 8, "batch_wait_timeout_s": 0.01})  # type: ignore[attr-defined]


def test_reconfigure_rejects_bad_values(replica: object, loop: asyncio.AbstractEventLoop) -> None:
    with pytest.raises(ValueError, match="max_batch_size"):
        replica.reconfigure({"max_batch_size": 0})  # type: ignore[attr-defined]


def test_same_seed_same_pixels(replica: object, loop: asyncio.AbstractEventLoop) -> None:
    task = make_task(7)
    first = loop.run_until_complete(generate_concurrently(replica, [task]))
    (a,) = loop.run_until_complete(replica.generate([task]))  # type: ignore[attr-defined]
    (b,) = loop.run_until_complete(replica.generate([dataclasses.replace(task, request_id="other")]))  # type: ignore[attr-defined]
    assert first == [1]
    assert np.array_equal(a.pixels, b.pixels)


def test_tasks_arriving_behind_a_busy_model_leave_in_one_batch(
    replica: object, loop: asyncio.AbstractEventLoop, monkeypatch: pytest.MonkeyPatch
) -> None:
    family = replica.family  # type: ignore[attr-defined]
    entered, release = threading.Event(), threading.Event()
    forward = family.generate

    def held_forward(tasks: list[ImageTask]) -> list[np.ndarray]:
        entered.set()
        release.wait()
        return forward(tasks)

    monkeypatch.setattr(family, "generate", held_forward)
    # No batch wait: without the gate each arrival would become its own batch behind the busy model.
    replica.reconfigure({"max_batch_size": 8, "batch_wait_timeout_s": 0.0})  # type: ignore[attr-defined]

    async def arrive_while_busy() -> list[int]:
        first = asyncio.ensure_future(generate_concurrently(replica, [make_task(0)]))
        await asyncio.to_thread(entered.wait)
        later = []
        for index in range(1, 4):
            later.append(asyncio.ensure_future(generate_concurrently(replica, [make_task(index)])))
            for _ in range(5):  # let this arrival reach the replica before the next one
                await asyncio.sleep(0)
        release.set()
        await first
        return [size for sizes in await asyncio.gather(*later) for size in sizes]

    try:
        assert loop.run_until_complete(arrive_while_busy()) == [3, 3, 3]
    finally:
        release.set()
        replica.reconfigure({"max_batch_size": 8, "batch_wait_timeout_s": 0.01})  # type: ignore[attr-defined]
