"""Faults inside a model replica, without a cluster: one bad image in a batch, a wedged forward pass."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from deployments.contracts import ImageTask
from tests.replica_loop import in_process_replica, make_task, replica_event_loop

POISON = "poison"
DEADLINE_S = 60.0


class FaultyFamily:
    """The real family, except that a pass holding the poison prompt raises, and every pass
    first waits for ``unblock``, as a hung kernel would."""

    def __init__(self, family: Any) -> None:
        self.family = family
        self.pass_sizes: list[int] = []
        self.unblock = threading.Event()
        self.unblock.set()

    def generate(self, tasks: list[ImageTask], hooks: Any) -> Any:
        self.unblock.wait(DEADLINE_S)
        self.pass_sizes.append(len(tasks))
        if any(task.prompt == POISON for task in tasks):
            raise RuntimeError("this input breaks the model")
        return self.family.generate(tasks, hooks)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.family, name)


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    yield from replica_event_loop()


@pytest.fixture(scope="module")
def replica(loop: asyncio.AbstractEventLoop, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    storage_dir = tmp_path_factory.mktemp("store")
    yield from in_process_replica(loop, storage_dir, {"max_pass_s": 0.2}, wrap_family=FaultyFamily)


def test_one_bad_image_fails_only_itself(replica: Any, loop: asyncio.AbstractEventLoop) -> None:
    tasks = [make_task(index) for index in range(5)]
    tasks[2] = make_task(2, prompt=POISON)

    async def generate_all() -> list[Any]:
        return await asyncio.gather(*(replica.generate([task]) for task in tasks), return_exceptions=True)

    results = loop.run_until_complete(generate_all())
    assert max(replica.family.pass_sizes) > 1, "the tasks never shared a pass"
    assert isinstance(results[2], RuntimeError)
    for index in (0, 1, 3, 4):
        (image,) = results[index]
        assert image.task == tasks[index]
        assert image.pixels.dtype == np.uint8 and image.pixels.shape == (64, 64, 3)


def test_a_pass_past_max_pass_s_fails_the_health_check(replica: Any, loop: asyncio.AbstractEventLoop) -> None:
    family = replica.family
    task = make_task(9, prompt="stuck")

    async def scenario() -> None:
        replica.check_health()  # idle: healthy
        family.unblock.clear()
        generating = asyncio.ensure_future(replica.generate([task]))
        deadline = time.monotonic() + DEADLINE_S
        while True:  # poll as Serve does, until the stuck pass is over its bound
            try:
                replica.check_health()
            except RuntimeError as unhealthy:
                assert "wedged" in str(unhealthy)
                break
            assert time.monotonic() < deadline, "the wedged pass never failed the health check"
            await asyncio.sleep(0.05)  # the next periodic check
        family.unblock.set()
        (image,) = await generating
        assert image.task == task
        replica.check_health()  # the pass ended: healthy again

    loop.run_until_complete(scenario())
