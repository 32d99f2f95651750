"""The model replica's batch queue: which waiting image tasks leave together for the next pass, and when.

Tasks wait in arrival order; a batch takes at most ``max_batch_size`` of them, and tasks that
arrive while no pass may start wait for the next one, so under load every batch leaves full. A
partial batch waits ``batch_wait_timeout_s`` after its first task for more. While the callers of
the batch that ended last may be on their way back, it also waits, up to ``company_wait_s`` after
that end, for its even share of the work (:func:`even_share`).

Up to ``concurrent`` batches run at once (the replica's ``concurrent_passes``), each told whether it
runs *alone*: it started with no other batch running, none left waiting behind it, no company on
its way (:func:`expects_company`), and no task arriving during a pass of late
(:func:`expects_arrivals`). A batch alone may use every core, so no other starts until
it ends (:func:`may_start`); under load batches run side by side, each on its share.

Serve's ``@serve.batch`` does not do this: it forms the next batch as soon as a task arrives, even
while a pass runs, and takes at most a full batch of what is queued, so what is left over forms a
small batch at once. With 16 clients on batches of 8 (2 CPU cores, `make bench`), 43 of 91 images
ran in batches under 8 with it, and 3 of 91 with this queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from deployments.config import BatchingConfig

logger = logging.getLogger("ray.serve")

ItemT = TypeVar("ItemT")
EventT = TypeVar("EventT")
RunBatch = Callable[[list[ItemT], bool], AsyncIterator[tuple[int, EventT]]]
"""Runs one batch (and whether it runs alone); yields ``(position in the batch, event for that item)``."""

END = object()
"""Put on a waiting item's events when its batch has run."""


def may_start(running: int, running_alone: bool, concurrent: int) -> bool:
    """Whether another batch may start: always when none runs, else while there is room beside
    the ones running and none of them runs alone."""
    return running == 0 or (running < concurrent and not running_alone)


def expects_company(last_callers: int, last_started: float, last_ended: float, now: float) -> bool:
    """Whether callers of the batch that ended last may be on their way back: it served several,
    and ended less than a quarter of its run ago. Their next requests come back a few at a time
    (the front end answers them and takes the next ones one after another), so without this the
    first few ran alone on every core and held the rest back until they ended: at 8 clients,
    batches of about 5 and 3 took turns on one lane (make bench, 2026-12-01 19:01: 5.93 images/s,
    the bare pipeline 8.22)."""
    return last_callers > 1 and now - last_ended < (last_ended - last_started) / 4


def expects_arrivals(last_overlap: float, last_started: float, last_ended: float, now: float) -> bool:
    """Whether a task may arrive while the next batch runs: one arrived during a pass less than
    ten passes' time ago (``last_overlap``; the last batch's run gives a pass's time). A batch
    alone takes every core, and a task that arrives meanwhile waits for its end before it may
    start: under an open loop at 80% of capacity the tail was such tasks (make bench, 2026-12-02
    14:43: 37 of 84 images ran alone, p99 3.3x the p50). A lone client's requests never overlap
    a pass, so they still run alone, on every core."""
    return now - last_overlap < 10 * (last_ended - last_started)


def callers_on_the_way(
    last_callers: int, last_started: float, last_ended: float, back: int, now: float
) -> int:
    """How many callers of the batch that ended last may still be on their way back: those not
    ``back`` yet, while they may come at all (:func:`expects_company`)."""
    if not expects_company(last_callers, last_started, last_ended, now):
        return 0
    return max(0, last_callers - back)


def even_share(running: int, waiting: int, on_the_way: int, concurrent: int, max_batch_size: int) -> int:
    """How many tasks a batch waits for while callers are on their way: its even share, over the
    ``concurrent`` lanes, of every task running, waiting or on its way, at most a full batch.

    Closed-loop clients come back a few at a time after their batch ends (the front end answers
    them one after another). Without this, a task that waited through a pass (or the first few
    back) left at once on the freed lane and the rest waited a whole pass behind it (make bench,
    2026-12-02 14:43: at 16 clients on two lanes of 8, 23 of 249 images ran in passes of one).
    Waiting for all of them instead put 8 clients' batch on one lane of one thread while the other
    core idled (4.91 images/s against 5.93); their share is 4 a lane."""
    return min(max_batch_size, math.ceil((running + waiting + on_the_way) / concurrent))


@dataclass(eq=False)
class Waiting(Generic[ItemT]):
    item: ItemT
    arrived: float  # loop time
    events: asyncio.Queue[object] = field(default_factory=asyncio.Queue)


class BatchQueue(Generic[ItemT, EventT]):
    """Items join with :meth:`submit` and get their own events of the batch they run in.

    Runs on the replica's event loop; ``batching`` may be replaced at any time (the next batch uses it).
    ``caller`` names the caller an item came from (by default each item is its own).
    """

    def __init__(
        self,
        run_batch: RunBatch[ItemT, EventT],
        batching: BatchingConfig,
        concurrent: int = 1,
        caller: Callable[[ItemT], Hashable] = id,
    ) -> None:
        self.run_batch = run_batch
        self.batching = batching
        self.concurrent = concurrent
        self.caller = caller
        self._last_batch = (0, 0.0, 0.0)  # the batch that ended last: its callers, start and end
        self._callers_since = set[Hashable]()  # callers whose tasks arrived since it ended
        self._last_overlap = -math.inf  # when a task last arrived while a batch ran (loop time)
        self._waiting: list[Waiting[ItemT]] = []
        self._changed = asyncio.Event()  # a task arrived or a batch ended
        self._batches: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()
        self._running_tasks = 0  # tasks in the batches running
        self._running_alone = False

    async def submit(self, item: ItemT) -> AsyncGenerator[EventT, None]:
        """``item``'s events from the batch it runs in. Closing this takes the item out of the
        queue if it is still waiting (a pass it is already in goes on)."""
        if self._batches is None or self._batches.done():
            self._batches = asyncio.create_task(self._start_batches())
        waiting = Waiting[ItemT](item, asyncio.get_running_loop().time())
        if self._running_tasks:  # (not self._running: a batch that has answered may not be done yet)
            self._last_overlap = waiting.arrived
        self._waiting.append(waiting)
        self._callers_since.add(self.caller(item))
        self._changed.set()
        try:
            while (event := await waiting.events.get()) is not END:
                yield event  # type: ignore[misc]  # everything but END is an EventT
        finally:
            if waiting in self._waiting:
                self._waiting.remove(waiting)

    async def _start_batches(self) -> None:
        while True:
            batch = await self._next_batch()
            now = asyncio.get_running_loop().time()
            _, last_started, last_ended = self._last_batch
            alone = (
                not self._running
                and not self._waiting
                and not expects_company(*self._last_batch, now)
                and not expects_arrivals(self._last_overlap, last_started, last_ended, now)
            )
            self._running_alone = alone
            self._running_tasks += len(batch)
            running = asyncio.create_task(self._run(batch, alone))
            self._running.add(running)
            running.add_done_callback(self._ended)

    def _ended(self, batch: asyncio.Task[None]) -> None:
        self._running.discard(batch)
        self._running_alone = False
        self._changed.set()

    async def _run(self, batch: list[Waiting[ItemT]], alone: bool) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            async for position, event in self.run_batch([waiting.item for waiting in batch], alone):
                batch[position].events.put_nowait(event)
        except Exception as error:  # run_batch gives each item its own errors: this is a fault in it
            logger.exception("a batch failed as a whole")
            for waiting in batch:
                waiting.events.put_nowait(error)
        finally:
            self._last_batch = (len({self.caller(waiting.item) for waiting in batch}), started, loop.time())
            self._callers_since = set()
            self._running_tasks -= len(batch)
            for waiting in batch:
                waiting.events.put_nowait(END)

    async def _next_batch(self) -> list[Waiting[ItemT]]:
        """The next batch, once one may start: a full one, or what is there once the first task
        has waited ``batch_wait_timeout_s`` (tasks that waited through a pass have). While the last
        batch's callers may be on their way, a batch is its even share instead, and leaves once
        that is there or ``company_wait_s`` has passed since the last batch ended."""
        loop = asyncio.get_running_loop()
        while True:
            batching = self.batching
            timeout = None
            if self._waiting and may_start(len(self._running), self._running_alone, self.concurrent):
                now = loop.time()
                timeout = self._waiting[0].arrived + batching.batch_wait_timeout_s - now
                on_the_way = callers_on_the_way(*self._last_batch, len(self._callers_since), now)
                size = batching.max_batch_size
                if on_the_way:
                    waiting = len(self._waiting)
                    size = even_share(self._running_tasks, waiting, on_the_way, self.concurrent, size)
                if len(self._waiting) < size and on_the_way:
                    timeout = max(timeout, self._last_batch[2] + batching.company_wait_s - now)
                if len(self._waiting) >= size or timeout <= 0:
                    batch = self._waiting[:size]
                    del self._waiting[:size]
                    return batch
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout)
