"""The batched model replica: one deployment per variant, one copy of the weights per replica.

Calls carry a request's image tasks; each task joins the replica's batch queue
(``deployments.batch_queue``) on its own, so images of concurrent requests share forward passes,
streaming or not. A batch is split by shape bucket and never mixes buckets in one pass. The
forward pass runs in a worker thread so the replica keeps answering (health checks, new arrivals,
cancellations) while it computes.

With ``concurrent_passes`` above 1 the replica is data parallel on one copy of the weights: each
*lane* is a compute thread with its own view of the family (``ImageFamily.lane``), and under load
batches run side by side, each on its share of the cores (one thread each on two cores). A batch
that runs alone (nothing else running or waiting: a lone request) takes every core on lane 0, on
``cpu_threads`` (or, for ``auto``, on the count measured best). Only lane 0 ever runs a pass on more
than its share: each thread that has run a multi-threaded pass keeps an OpenMP team, and once
OpenMP counts more team threads than cores it stops spinning between parallel regions, which on
this 2-core VM made every pass 3x slower (2026-12-01: a pass on two threads took 563-890 ms on a
thread started after another thread's two-thread pass, 172-370 ms without it).

One batch queue serves both kinds of call: each task gets its own events of the batch, its
previews and then its image. ``generate`` keeps only the images; ``generate_stream`` (called with
``handle.options(stream=True)``) passes every event on.

Cancellation: a caller that goes away (a client disconnect cancels the call) marks its tasks
cancelled. A task still queued leaves the queue; a forward pass checks its tasks
between denoising steps and stops as soon as all of them are cancelled, which frees the batch
slot for the next batch. A cancelled task in a pass that others still need is computed to the
end with them (rows cannot leave a running pass) but gets no previews and its image is dropped.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import sys
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing
from dataclasses import dataclass
from functools import cache, partial
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from ray import serve

from deployments.batch_queue import BatchQueue
from deployments.config import BatchingConfig, VariantConfig
from deployments.contracts import GeneratedImage, ImageTask, ModelEvent, PartialImage, group_by_bucket
from deployments.errors import quiet_serve_logs
from deployments.in_process import InProcessHandle
from deployments.metrics import stage_metrics
from deployments.models.cpu_threads import ThreadTuner, set_pass_threads, thread_candidates, usable_cores
from deployments.models.diffusion import choose_device
from deployments.models.registry import DenoisingHooks, PassCancelled, generation_tasks, load_family

logger = logging.getLogger("ray.serve")

T = TypeVar("T")


@dataclass(eq=False)
class QueuedTask:
    """One task in the batch queue. ``cancelled`` is set on the event loop, read by the worker thread."""

    task: ImageTask
    arrived: float
    cancelled: bool = False


@dataclass(frozen=True)
class ReplicaStats:
    """The replica's scheduling state, for operators and tests (``handle.stats.remote()``)."""

    in_flight: int
    """Tasks whose caller is waiting: queued or in a forward pass."""
    running: int
    """Tasks in the forward pass that is computing now."""
    cancelled: int
    """Tasks whose caller went away before their image was done (since start)."""
    stopped_passes: int
    """Forward passes stopped between denoising steps because all their tasks were cancelled."""
    received: int
    """Image tasks handed to this replica (since start): none for a request stopped before the model."""
    generated: int
    """Images whose forward pass completed (since start)."""
    threads_by_batch: dict[int, int]
    """``cpu_threads: auto``: the torch threads each batch size runs on now (empty otherwise)."""
    peak_concurrent_passes: int
    """The most forward passes that have run at once (since start); at most ``concurrent_passes``."""


@cache
def preview_steps(total_steps: int, count: int) -> frozenset[int]:
    """The steps (0-based) after which ``count`` previews are taken, spread evenly over the run.

    Never the last step (that is the image itself), so short runs give fewer previews, as
    OpenAI's API allows ("the final image may be sent before all partial images").
    """
    if total_steps < 2 or count < 1:
        return frozenset()
    return frozenset(
        min(total_steps - 2, max(0, round(k * total_steps / (count + 1)) - 1)) for k in range(1, count + 1)
    )


class PassHooks(DenoisingHooks):
    """The replica's side of one forward pass; called from the worker thread between steps."""

    def __init__(self, queued: list[QueuedTask], emit: Callable[[int, PartialImage], None]) -> None:
        self.queued = queued
        self.emit = emit
        self.sent = [0] * len(queued)
        self.stopped = False

    def after_step(self, step: int, total_steps: int) -> list[int]:
        live = [row for row, item in enumerate(self.queued) if not item.cancelled]
        if self.stopped or not live:
            raise PassCancelled
        wanted = [preview_steps(total_steps, self.queued[row].task.partial_images) for row in live]
        return [row for row, steps in zip(live, wanted, strict=True) if step in steps]

    def preview(self, row: int, pixels: np.ndarray) -> None:
        self.emit(row, PartialImage(self.queued[row].task, self.sent[row], pixels))
        self.sent[row] += 1


def retrieve_outcome(future: asyncio.Future[Any]) -> None:
    """Mark a future's exception as seen (asyncio logs unseen ones)."""
    if not future.cancelled():
        future.exception()


async def merge(streams: list[AsyncIterator[T]]) -> AsyncGenerator[T, None]:
    """The items of several async iterators as they come; closing the merge cancels them all."""
    queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

    async def pump(stream: AsyncIterator[T]) -> None:
        try:
            async for item in stream:
                queue.put_nowait(("item", item))
            queue.put_nowait(("done", None))
        except Exception as error:
            queue.put_nowait(("error", error))

    pumps = [asyncio.ensure_future(pump(stream)) for stream in streams]
    try:
        remaining = len(pumps)
        while remaining:
            kind, value = await queue.get()
            if kind == "error":
                raise value
            if kind == "done":
                remaining -= 1
            else:
                yield value
    finally:
        for task in pumps:
            task.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)


LANE_THREAD_PREFIX = "torch-lane-"
LANE_THREAD_NAME = LANE_THREAD_PREFIX + "{lane}"
"""A lane's compute thread, by name in the OS too (``/proc/<pid>/task/<tid>/comm``), so that its
CPU (with its OpenMP team's, which inherits the name) can be told from the rest of its process."""


def name_os_thread(name: str) -> None:
    """Give the calling thread ``name`` (up to 15 bytes) where the OS keeps one (Linux)."""
    if sys.platform == "linux":
        pr_set_name = 15
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_name, name.encode()[:15], 0, 0, 0)


def calibration_tasks(variant: VariantConfig, batch_size: int) -> list[ImageTask]:
    """A batch of the variant's default request, to time its passes before the first request."""
    return generation_tasks(
        variant, [("a lighthouse at dusk", seed) for seed in range(batch_size)], "calibration"
    )


@serve.deployment
class ModelReplica:
    def __init__(self, variant: VariantConfig, cache_dir: Path) -> None:
        self.variant = variant
        # Every torch call runs on this one thread. Each OS thread that enters torch's CPU kernels gets
        # its own OpenMP team, and idle teams keep spinning: with forward passes spread over
        # asyncio.to_thread's pool, a 2-core replica ran batch 1 at half speed (measured: 110 ms on
        # one thread, 240 ms once a second thread had used torch).
        # The same holds for lanes: each has its own compute thread, always the same one.
        self._lanes = [
            ThreadPoolExecutor(
                max_workers=1,
                thread_name_prefix=LANE_THREAD_NAME.format(lane=lane),
                initializer=name_os_thread,
                initargs=(LANE_THREAD_NAME.format(lane=lane),),
            )
            for lane in range(variant.concurrent_passes)
        ]
        self.family, description = self._lanes[0].submit(load_family, variant, cache_dir).result()
        self._lane_views = [executor.submit(self.family.lane).result() for executor in self._lanes[1:]]
        self._idle_lanes = list(range(variant.concurrent_passes))
        on_cpu = choose_device(variant.device) == "cpu"
        # A pass alone runs on the threads the family loaded with (every core for all and auto);
        # side by side, each pass runs on its share of them. None: threads left as loaded.
        cores = self._lanes[0].submit(torch.get_num_threads).result()
        self._threads_alone_shared = (
            (cores, max(1, cores // len(self._lanes))) if on_cpu and len(self._lanes) > 1 else None
        )
        self.threads = (
            ThreadTuner(thread_candidates(usable_cores()))
            if variant.cpu_threads == "auto" and on_cpu
            else None
        )
        if self.threads is not None and variant.thread_calibration_s > 0:
            sizes = sorted({1, variant.batching.max_batch_size})
            calibrate = self.threads.calibrate
            tasks_for = partial(calibration_tasks, variant)
            self._lanes[0].submit(
                calibrate, sizes, tasks_for, self.family.generate, variant.thread_calibration_s
            ).result()
            description += f"; thread counts by batch size after calibrating: {self.threads.best()}"
            if self.threads.provisional:  # (batch size, threads) that other processes disturbed
                description += f", to be checked by requests: {sorted(self.threads.provisional)}"
        self.metrics = stage_metrics()
        self._batches = BatchQueue[QueuedTask, ModelEvent | Exception](
            self._run_batch,
            variant.batching,
            concurrent=variant.concurrent_passes,
            caller=lambda queued: queued.task.request_id,
        )
        self._in_flight = 0
        self._running = 0
        self._pass_started: dict[int, float] = {}  # lane -> monotonic start of its pass now running
        self._peak_concurrent_passes = 0
        self._cancelled = 0
        self._stopped_passes = 0
        self._received = 0
        self._generated = 0
        quiet_serve_logs()
        logger.info(description)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Live batching changes from a Serve config's ``user_config`` (validated like the YAML)."""
        self._batches.batching = BatchingConfig(**user_config)

    async def ready(self) -> bool:
        return True

    def check_health(self) -> None:
        """Serve's periodic check: a forward pass stuck past ``max_pass_s`` makes this replica
        unhealthy, so Serve replaces it and callers retry elsewhere. (A process that is stopped
        altogether does not answer at all, which Serve's check timeout catches.)"""
        started = min(self._pass_started.values(), default=None)
        if started is not None and time.monotonic() - started > self.variant.max_pass_s:
            raise RuntimeError(
                f"a forward pass has run {time.monotonic() - started:.0f}s, over max_pass_s "
                f"({self.variant.max_pass_s:g}s): the model is wedged"
            )

    async def stats(self) -> ReplicaStats:
        return ReplicaStats(
            self._in_flight,
            self._running,
            self._cancelled,
            self._stopped_passes,
            self._received,
            self._generated,
            self.threads.best() if self.threads else {},
            self._peak_concurrent_passes,
        )

    async def generate(self, tasks: list[ImageTask]) -> list[GeneratedImage]:
        """Generate every task of one request; each task is batched with whatever else is queued."""
        arrived = time.perf_counter()
        return list(await asyncio.gather(*(self._image(task, arrived) for task in tasks)))

    async def generate_stream(self, tasks: list[ImageTask]) -> AsyncGenerator[ModelEvent, None]:
        """Every task's previews and then its image, as they are made (``options(stream=True)``)."""
        arrived = time.perf_counter()
        async with aclosing(merge([self._events(task, arrived) for task in tasks])) as events:
            async for event in events:
                yield event

    async def _image(self, task: ImageTask, arrived: float) -> GeneratedImage:
        image = None
        async for event in self._events(task, arrived):
            if isinstance(event, GeneratedImage):
                image = event
        if image is None:
            raise RuntimeError(f"the batch ended without an image for task {task.key}")
        return image

    async def _events(self, task: ImageTask, arrived: float) -> AsyncGenerator[ModelEvent, None]:
        """One task through the batch queue. A caller that stops listening cancels the task."""
        queued = QueuedTask(task, arrived)
        self._received += 1
        ended = False  # the image (or an error) was delivered: nothing left to cancel
        failure: Exception | None = None
        self._track_in_flight(+1)
        try:
            async with aclosing(self._batches.submit(queued)) as events:
                async for event in events:
                    if isinstance(event, Exception):
                        ended, failure = True, event
                        break
                    ended = isinstance(event, GeneratedImage)
                    yield event
                    if ended:
                        break
        finally:
            self._track_in_flight(-1)
            if not ended:
                queued.cancelled = True
                self._cancelled += 1
                self.metrics.count_cancelled(self.variant.name)
        if failure is not None:
            raise failure

    def _track_in_flight(self, change: int) -> None:
        self._in_flight += change
        self.metrics.set_in_flight(self.variant.name, self._in_flight)

    async def _run_batch(
        self, queued: list[QueuedTask], alone: bool
    ) -> AsyncGenerator[tuple[int, ModelEvent | Exception], None]:
        """One batch from the queue, on a lane of its own (lane 0 when it runs alone): a forward
        pass per shape bucket, skipping cancelled tasks."""
        lane = 0 if alone else self._idle_lanes[-1]
        self._idle_lanes.remove(lane)
        try:
            for positions in group_by_bucket([item.task for item in queued]).values():
                live = [position for position in positions if not queued[position].cancelled]
                if live:
                    group = [queued[position] for position in live]
                    async for row, event in self._run_isolated(group, lane, alone):
                        yield live[row], event
        finally:
            self._idle_lanes.append(lane)

    async def _run_isolated(
        self, group: list[QueuedTask], lane: int, alone: bool
    ) -> AsyncGenerator[tuple[int, ModelEvent | Exception], None]:
        """A forward pass; when one of several images fails it, each half runs again, and so on.

        Only an image that fails alone fails: one bad input (or a pass too big for memory)
        costs its batch-mates a rerun, not their images. Previews already sent may come again.
        """
        failed = False
        async for row, event in self._run_pass(group, lane, alone):
            if isinstance(event, Exception) and len(group) > 1:
                failed = True
            else:
                yield row, event
        if not failed:
            return
        half = len(group) // 2
        for offset, part in ((0, group[:half]), (half, group[half:])):
            async for row, event in self._run_isolated(part, lane, alone):
                yield offset + row, event

    def _forward_pass(
        self, lane: int, alone: bool, tasks: list[ImageTask], hooks: PassHooks
    ) -> list[np.ndarray]:
        """On the lane's compute thread: its family's pass, on every core when it runs alone (on
        the count ``cpu_threads: auto`` picks), else on its share."""
        family = self.family if lane == 0 else self._lane_views[lane - 1]
        if self.threads is not None and (alone or len(self._lanes) == 1):
            # With lanes the tuner chooses for a lone request only, so it trusts only passes
            # during which no request arrived: beside a burst's others the front end slows a
            # two-thread pass, and such first samples chose one thread (make bench 19:01: the
            # batch-8 pass timed in turn 1.20x the bare two-thread pass). One lane trusts all.
            received = self._received
            undisturbed = None if len(self._lanes) == 1 else (lambda: self._received == received)
            return self.threads.run(tasks, lambda: family.generate(tasks, hooks), trusted=undisturbed)
        if self._threads_alone_shared is not None:
            set_pass_threads(self._threads_alone_shared[0 if alone else 1])
        return family.generate(tasks, hooks)

    async def _run_pass(
        self, group: list[QueuedTask], lane: int, alone: bool
    ) -> AsyncGenerator[tuple[int, ModelEvent | Exception], None]:
        """One forward pass in a worker thread: its previews as they come, then its images."""
        loop = asyncio.get_running_loop()
        previews: asyncio.Queue[tuple[int, PartialImage] | None] = asyncio.Queue()

        def emit(row: int, preview: PartialImage) -> None:  # runs in the worker thread
            loop.call_soon_threadsafe(previews.put_nowait, (row, preview))

        hooks = PassHooks(group, emit)
        tasks = [item.task for item in group]
        started = time.perf_counter()
        self._running += len(group)
        self._pass_started[lane] = time.monotonic()
        self._peak_concurrent_passes = max(self._peak_concurrent_passes, len(self._pass_started))
        forward = loop.run_in_executor(self._lanes[lane], self._forward_pass, lane, alone, tasks, hooks)
        forward.add_done_callback(lambda _: previews.put_nowait(None))
        try:
            while (preview := await previews.get()) is not None:
                yield preview
            pixels = await forward
        except PassCancelled:
            self._stopped_passes += 1
            return
        except Exception as error:  # this pass's callers get the error; other buckets go on
            for row in range(len(group)):
                yield row, error
            return
        finally:
            hooks.stopped = True  # if this generator is closed early, the thread stops at its next step
            forward.add_done_callback(retrieve_outcome)  # and nobody else will await it then
            self._running -= len(group)
            del self._pass_started[lane]
        elapsed = time.perf_counter() - started
        self._generated += len(group)
        self.metrics.observe_batch(self.variant.name, len(group))
        self.metrics.observe_stage("model", self.variant.name, elapsed)
        for row, (item, image) in enumerate(zip(group, pixels, strict=True)):
            queue_s = started - item.arrived
            timings = {"preprocess": item.task.preprocess_s, "queue": queue_s, "model": elapsed}
            yield row, GeneratedImage(item.task, image, batch_size=len(group), timings=timings)


@dataclass(frozen=True)
class ColocatedModel:
    """A variant's model replica that runs in the ingress's own process
    (``stages.ingress.colocate_models``), bound into the stage chain in place of its deployment;
    the ingress starts it as it starts (`StageChain.started`)."""

    variant: VariantConfig
    cache_dir: Path

    def start(self) -> InProcessHandle:
        """The replica, built here: its weights loaded and its threads calibrated before it returns."""
        replica_class = ModelReplica.func_or_class  # type: ignore[attr-defined]  # the class under @serve.deployment
        return InProcessHandle(replica_class(self.variant, self.cache_dir))
