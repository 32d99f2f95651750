"""An event loop for one test module's in-process ModelReplica (unit tests, no Ray)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

from deployments.model_replica import ModelReplica


def replica_event_loop() -> Iterator[asyncio.AbstractEventLoop]:
    """A fresh loop, closed cleanly after the module's tests.

    Serve keeps one batch queue per decorated method, bound to the loop that first uses it: each
    module starts with a new queue, and the queue's tasks are cancelled and awaited before the loop
    closes (otherwise their coroutines are collected later, on a closed loop, in another test).
    """
    batch_queue: Any = ModelReplica.func_or_class._run_batch.set_max_batch_size.__self__  # type: ignore[attr-defined]
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
