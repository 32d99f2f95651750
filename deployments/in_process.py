"""A deployment handle's face on an object in this process: a colocated scheduler or model replica.

``handle.method.remote(...)`` on an `InProcessHandle` starts ``method(...)`` as a task on the
running loop, awaited and cancelled as a handle's response is (a cancel reaches the method as it
would the replica's), without the hop. ``handle.options(stream=True).method.remote(...)`` calls an
async generator method and gives `LocalEvents`: iterate it, cancel it. Arguments are shared, not
copied: what crosses (requests, tasks, grants, job views, images) is frozen or a snapshot, or not
touched again by the caller.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from ray.serve.handle import DeploymentHandle

T = TypeVar("T")


class LocalEvents(Generic[T]):
    """An async generator in this process with a handle stream's face: iterate it, cancel it."""

    def __init__(self, events: AsyncGenerator[T, None]) -> None:
        self._events = events
        self._running = False
        self._closing: asyncio.Task[None] | None = None

    def __aiter__(self) -> LocalEvents[T]:
        return self

    async def __anext__(self) -> T:
        self._running = True
        try:
            return await self._events.__anext__()
        finally:
            self._running = False

    def cancel(self) -> None:
        """Close the stream (what it awaits is cancelled as it closes). A pending `__anext__` is
        cancelled by its own caller, which also ends the stream."""
        if self._closing is None and not self._running:
            self._closing = asyncio.get_running_loop().create_task(self._events.aclose())


@dataclass(frozen=True)
class InProcessMethod:
    method: Callable[..., Awaitable[Any]]

    def remote(self, *args: Any, **kwargs: Any) -> asyncio.Task[Any]:
        return asyncio.ensure_future(self.method(*args, **kwargs))


@dataclass(frozen=True)
class InProcessStreamMethod:
    method: Callable[..., AsyncGenerator[Any, None]]

    def remote(self, *args: Any, **kwargs: Any) -> LocalEvents[Any]:
        return LocalEvents(self.method(*args, **kwargs))


class InProcessHandle:
    """A deployment handle's calls on ``target``, an object in this process (see the module)."""

    def __init__(self, target: Any) -> None:
        self.target = target

    def options(self, *, stream: bool = False) -> InProcessHandle | InProcessStreamHandle:
        return InProcessStreamHandle(self.target) if stream else self

    def __getattr__(self, name: str) -> InProcessMethod:
        if name.startswith("_"):
            raise AttributeError(name)
        return InProcessMethod(getattr(self.target, name))


class InProcessStreamHandle:
    """``InProcessHandle.options(stream=True)``: calls of ``target``'s async generator methods."""

    def __init__(self, target: Any) -> None:
        self.target = target

    def __getattr__(self, name: str) -> InProcessStreamMethod:
        if name.startswith("_"):
            raise AttributeError(name)
        return InProcessStreamMethod(getattr(self.target, name))


StageHandle = DeploymentHandle | InProcessHandle
"""How a caller reaches a stage: its deployment's handle, or the stage itself in this process."""
