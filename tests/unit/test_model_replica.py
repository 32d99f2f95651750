"""The batched replica without a cluster, as Ray's own batching tests do: real tiny model, asyncio."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
import time
from collections.abc import Callable, Iterator

import numpy as np
import pytest

from deployments.contracts import GeneratedImage, ImageTask, ModelEvent, PartialImage
from deployments.model_replica import ReplicaStats, preview_steps
from tests.replica_loop import in_process_replica, make_task, replica_event_loop


def make_edit(index: int, masked: bool, strength: float = 0.75, **changes: object) -> ImageTask:
    """An edit of a fixed random 64x64 image; the mask repaints the centre square."""
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    mask = None
    if masked:
        mask = np.zeros((64, 64, 1), dtype=np.uint8)
        mask[16:48, 16:48] = 255
    return make_task(index, kind="edit", image=image, mask=mask, strength=strength, steps=4, **changes)


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    yield from replica_event_loop()


@pytest.fixture(scope="module")
def replica(loop: asyncio.AbstractEventLoop, tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    yield from in_process_replica(loop, tmp_path_factory.mktemp("store"))


async def generate_concurrently(replica: object, tasks: list[ImageTask]) -> list[int]:
    results = await asyncio.gather(*(replica.generate([task]) for task in tasks))  # type: ignore[attr-defined]
    for (image,), task in zip(results, tasks, strict=True):
        assert image.pixels.dtype == np.uint8
        assert image.pixels.shape == (task.height, task.width, 3)
        assert image.pixels.flags["C_CONTIGUOUS"]
        assert image.task == task
    return [image.batch_size for (image,) in results]


@contextlib.contextmanager
def batches_of(replica: object, max_batch_size: int) -> Iterator[None]:
    """A batch leaves only when full (the longest wait allowed is far beyond the arrivals): exact sizes."""
    replica.reconfigure({"max_batch_size": max_batch_size, "batch_wait_timeout_s": 10.0})  # type: ignore[attr-defined]
    try:
        yield
    finally:
        replica.reconfigure({"max_batch_size": 8, "batch_wait_timeout_s": 0.01})  # type: ignore[attr-defined]


def test_concurrent_tasks_are_batched(replica: object, loop: asyncio.AbstractEventLoop) -> None:
    with batches_of(replica, 6):
        sizes = loop.run_until_complete(generate_concurrently(replica, [make_task(i) for i in range(6)]))
    assert sizes == [6] * 6


def test_buckets_never_share_a_forward_pass(replica: object, loop: asyncio.AbstractEventLoop) -> None:
    tasks = [make_task(i, width=64) for i in range(3)] + [make_task(i, width=128) for i in range(3, 5)]
    with batches_of(replica, 5):  # one batch of five, two buckets: two forward passes
        sizes = loop.run_until_complete(generate_concurrently(replica, tasks))
    assert sizes == [3, 3, 3, 2, 2]


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


async def collect(replica: object, tasks: list[ImageTask]) -> list[ModelEvent]:
    return [event async for event in replica.generate_stream(tasks)]  # type: ignore[attr-defined]


async def wait_for_stats(
    replica: object, condition: Callable[[ReplicaStats], bool], timeout_s: float = 120.0
) -> ReplicaStats:
    """Poll the replica's state until ``condition`` holds (a deadline, not a guess at timing)."""
    deadline = time.monotonic() + timeout_s
    while True:
        stats: ReplicaStats = await replica.stats()  # type: ignore[attr-defined]
        if condition(stats) or time.monotonic() > deadline:
            return stats
        await asyncio.sleep(0.01)


@pytest.mark.parametrize(
    ("total", "count", "expected"),
    [(4, 2, {0, 2}), (4, 3, {0, 1, 2}), (50, 3, {11, 24, 37}), (2, 3, {0}), (1, 2, set()), (8, 0, set())],
)
def test_preview_steps_are_spread_and_never_the_last(total: int, count: int, expected: set[int]) -> None:
    assert preview_steps(total, count) == expected


def test_stream_sends_previews_then_the_image(replica: object, loop: asyncio.AbstractEventLoop) -> None:
    events = loop.run_until_complete(collect(replica, [make_task(20, steps=4, partial_images=2)]))
    assert [type(event) for event in events] == [PartialImage, PartialImage, GeneratedImage]
    previews = [event for event in events if isinstance(event, PartialImage)]
    assert [preview.partial_image_index for preview in previews] == [0, 1]
    for preview in previews:
        assert preview.pixels.dtype == np.uint8 and preview.pixels.shape == (64, 64, 3)
    assert not np.array_equal(previews[0].pixels, events[-1].pixels)  # type: ignore[union-attr]


def test_streaming_and_plain_tasks_share_one_batch(replica: object, loop: asyncio.AbstractEventLoop) -> None:
    async def both() -> tuple[list[ModelEvent], list[GeneratedImage]]:
        streamed = collect(replica, [make_task(30, steps=4, partial_images=1)])
        plain = replica.generate([make_task(31, steps=4)])  # type: ignore[attr-defined]
        return await asyncio.gather(streamed, plain)

    events, (image,) = loop.run_until_complete(both())
    assert [type(event) for event in events] == [PartialImage, GeneratedImage]
    assert image.batch_size == 2 and events[-1].batch_size == 2  # type: ignore[union-attr]


def test_closing_a_stream_stops_its_pass_and_frees_the_slot(
    replica: object, loop: asyncio.AbstractEventLoop
) -> None:
    async def disconnect() -> tuple[ReplicaStats, ReplicaStats]:
        before: ReplicaStats = await replica.stats()  # type: ignore[attr-defined]
        stream = replica.generate_stream([make_task(40, steps=50, partial_images=3)])  # type: ignore[attr-defined]
        assert isinstance(await anext(stream), PartialImage)
        assert (await replica.stats()).running == 1  # type: ignore[attr-defined]
        await stream.aclose()  # what a client disconnect does to the call
        after = await wait_for_stats(replica, lambda stats: stats.running == 0 and stats.in_flight == 0)
        return before, after

    before, after = loop.run_until_complete(disconnect())
    assert (after.running, after.in_flight) == (0, 0)
    assert after.cancelled == before.cancelled + 1
    assert after.stopped_passes == before.stopped_passes + 1  # stopped between steps, not run to the end
    sizes = loop.run_until_complete(generate_concurrently(replica, [make_task(41)]))
    assert sizes == [1]


def test_inpainting_keeps_every_pixel_outside_the_mask(
    replica: object, loop: asyncio.AbstractEventLoop
) -> None:
    task = make_edit(50, masked=True)
    (image,) = loop.run_until_complete(replica.generate([task]))  # type: ignore[attr-defined]
    assert task.mask is not None and task.image is not None
    keep = task.mask[:, :, 0] < 128
    assert np.array_equal(image.pixels[keep], task.image[keep])
    assert not np.array_equal(image.pixels[~keep], task.image[~keep])


def test_edits_are_reproducible_and_split_by_pipeline_and_strength(
    replica: object, loop: asyncio.AbstractEventLoop
) -> None:
    tasks = [
        make_edit(60, masked=False),
        make_edit(61, masked=False),
        make_edit(62, masked=True),
        make_edit(63, masked=False, strength=0.5),
    ]
    sizes = loop.run_until_complete(generate_concurrently(replica, tasks))
    assert sizes == [2, 2, 1, 1]
    (again,) = loop.run_until_complete(replica.generate([tasks[0]]))  # type: ignore[attr-defined]
    (first,) = loop.run_until_complete(replica.generate([tasks[0]]))  # type: ignore[attr-defined]
    assert np.array_equal(again.pixels, first.pixels)


def test_a_failing_pass_fails_only_its_own_callers(replica: object, loop: asyncio.AbstractEventLoop) -> None:
    broken = make_task(70, kind="edit", strength=0.5)  # an edit without an image

    async def run() -> list[object]:
        calls = [replica.generate([broken]), replica.generate([make_task(71)])]  # type: ignore[attr-defined]
        return await asyncio.gather(*calls, return_exceptions=True)

    failed, succeeded = loop.run_until_complete(run())
    assert isinstance(failed, ValueError)
    assert isinstance(succeeded, list) and succeeded[0].pixels.shape == (64, 64, 3)


def test_tasks_arriving_behind_a_busy_model_leave_in_one_batch(
    replica: object, loop: asyncio.AbstractEventLoop, monkeypatch: pytest.MonkeyPatch
) -> None:
    family = replica.family  # type: ignore[attr-defined]
    entered, release = threading.Event(), threading.Event()
    forward = family.generate

    def held_forward(tasks: list[ImageTask], hooks: object = None) -> list[np.ndarray]:
        entered.set()
        release.wait()
        return forward(tasks, hooks)

    monkeypatch.setattr(family, "generate", held_forward)
    # No batch wait: without the gate each arrival would become its own batch behind the busy model.
    replica.reconfigure({"max_batch_size": 8, "batch_wait_timeout_s": 0.0})  # type: ignore[attr-defined]

    async def arrive_while_busy() -> list[int]:
        # After a lone request (not company an earlier test's batch may still expect), the next
        # pass runs alone and holds arrivals back, as one lane would.
        release.set()
        await replica.generate([make_task(99)])  # type: ignore[attr-defined]
        release.clear()
        entered.clear()
        first = asyncio.ensure_future(generate_concurrently(replica, [make_task(0)]))
        await asyncio.to_thread(entered.wait)
        later = []
        for index in range(1, 4):
            later.append(asyncio.ensure_future(generate_concurrently(replica, [make_task(index)])))
            # This arrival is held at the replica (counted in flight) before the next one comes.
            stats = await wait_for_stats(
                replica, lambda stats, expected=index + 1: stats.in_flight == expected
            )
            assert stats.in_flight == index + 1
        release.set()
        await first
        return [size for sizes in await asyncio.gather(*later) for size in sizes]

    try:
        assert loop.run_until_complete(arrive_while_busy()) == [3, 3, 3]
    finally:
        release.set()
        replica.reconfigure({"max_batch_size": 8, "batch_wait_timeout_s": 0.01})  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def two_lane_replica(
    loop: asyncio.AbstractEventLoop, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[object]:
    """``concurrent_passes: 2`` on two threads: a pass alone on both, side by side on one each."""
    changes = {"concurrent_passes": 2, "cpu_threads": 2}
    yield from in_process_replica(loop, tmp_path_factory.mktemp("lanes"), changes)


def test_two_lanes_run_batches_side_by_side_with_the_images_of_one_lane(
    replica: object, two_lane_replica: object, loop: asyncio.AbstractEventLoop
) -> None:
    # Two full batches; the second holds an inpainting edit too (a lane has its own edit pipelines).
    tasks = [make_task(90 + index) for index in range(7)] + [make_edit(97, masked=True)]

    async def images(on: object) -> list[np.ndarray]:
        results = await asyncio.gather(*(on.generate([task]) for task in tasks))  # type: ignore[attr-defined]
        return [image.pixels for (image,) in results]

    with batches_of(replica, 4), batches_of(two_lane_replica, 4):
        expected = loop.run_until_complete(images(replica))
        got = loop.run_until_complete(images(two_lane_replica))
    stats: ReplicaStats = loop.run_until_complete(two_lane_replica.stats())  # type: ignore[attr-defined]
    assert stats.peak_concurrent_passes == 2
    # One copy of the weights: the lane's pipelines hold the very modules lane 0's do.
    lanes = [two_lane_replica.family, *two_lane_replica._lane_views]  # type: ignore[attr-defined]
    assert len({id(lane.pipeline.unet) for lane in lanes}) == 1
    assert len({id(lane.inpainting.vae) for lane in lanes}) == 1
    assert len({id(lane.pipeline.scheduler) for lane in lanes}) == len(lanes)
    for want, image in zip(expected, got, strict=True):
        # Passes on other thread counts may sum in another order: a level at most, as in a batch.
        assert np.abs(want.astype(np.int16) - image.astype(np.int16)).max() <= 1
