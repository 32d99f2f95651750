"""A model replica in the caller's process (``stages.ingress.colocate_models``), called through
`InProcessHandle` as the stage chain calls a deployment: the real replica class on a tiny model,
built by `ColocatedModel.start`. A unary call is a task; a streamed call gives the replica's
events and, cancelled, stops its work as a closed handle stream does."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import numpy as np
import pytest

from deployments.contracts import GeneratedImage, PartialImage
from deployments.in_process import InProcessHandle, LocalEvents
from deployments.model_replica import ColocatedModel
from tests.conftest import make_test_config
from tests.replica_loop import make_task, replica_event_loop

DEADLINE_S = 60.0


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    yield from replica_event_loop()


@pytest.fixture(scope="module")
def model(loop: asyncio.AbstractEventLoop, tmp_path_factory: pytest.TempPathFactory) -> InProcessHandle:
    config = make_test_config(tmp_path_factory.mktemp("store"))

    async def start() -> InProcessHandle:
        return ColocatedModel(config.variants[0], config.cache_dir).start()

    return loop.run_until_complete(start())


def test_a_unary_call_is_a_task_with_the_images(
    model: InProcessHandle, loop: asyncio.AbstractEventLoop
) -> None:
    async def call() -> list[GeneratedImage]:
        response = model.generate.remote([make_task(1), make_task(2)])
        assert isinstance(response, asyncio.Task)
        return await asyncio.wait_for(response, DEADLINE_S)

    images = loop.run_until_complete(call())
    assert [image.task.request_id for image in images] == ["req-1", "req-2"]
    assert all(image.pixels.shape == (64, 64, 3) and image.pixels.dtype == np.uint8 for image in images)


def test_a_stream_gives_previews_then_the_image(
    model: InProcessHandle, loop: asyncio.AbstractEventLoop
) -> None:
    async def call() -> list[object]:
        events = model.options(stream=True).generate_stream.remote([make_task(3, steps=4, partial_images=2)])
        assert isinstance(events, LocalEvents)
        return [event async for event in events]

    events = loop.run_until_complete(asyncio.wait_for(call(), DEADLINE_S))
    assert [type(event) for event in events] == [PartialImage, PartialImage, GeneratedImage]


def test_a_cancelled_stream_cancels_its_task_in_the_replica(
    model: InProcessHandle, loop: asyncio.AbstractEventLoop
) -> None:
    async def call() -> None:
        cancelled_before = (await model.stats.remote()).cancelled
        events = model.options(stream=True).generate_stream.remote([make_task(4, steps=12, partial_images=3)])
        first = await asyncio.wait_for(events.__anext__(), DEADLINE_S)
        assert isinstance(first, PartialImage)
        events.cancel()  # the client went away after its first preview
        deadline = asyncio.get_running_loop().time() + DEADLINE_S
        while (await model.stats.remote()).in_flight:  # the replica lets go of the task
            assert asyncio.get_running_loop().time() < deadline, "the cancelled task stayed in flight"
            await asyncio.sleep(0.05)  # the pace of the polling
        assert (await model.stats.remote()).cancelled == cancelled_before + 1

    loop.run_until_complete(call())


def test_private_names_are_not_calls() -> None:
    for handle in (InProcessHandle(object()), InProcessHandle(object()).options(stream=True)):
        with pytest.raises(AttributeError):
            _ = handle._anything


def test_a_handle_without_stream_options_is_itself() -> None:
    handle = InProcessHandle(object())
    assert handle.options() is handle and handle.options(stream=False) is handle
