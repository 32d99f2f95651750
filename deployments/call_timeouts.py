"""Bounds on every call made through a Ray Serve handle, so no caller waits forever.

A ``DeploymentResponse`` can be awaited for ever: a wedged replica (a stopped process, a hung
forward pass) never answers. `bounded` awaits a call for at most its timeout, cancels it (Serve
passes the cancellation on to the stages behind it) and raises `UpstreamTimeoutError` (the face
answers it with a 504 in OpenAI's shape). Serve's health check replaces the wedged replica
meanwhile; the timeouts here are the caller's backstop, set above the health check's own bound.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol, TypeVar

from deployments.errors import UpstreamTimeoutError, is_replica_failure

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)
RETRY_AFTER_S = 5


class CancellableStream(Protocol[T_co]):
    def __aiter__(self) -> AsyncIterator[T_co]: ...
    def __anext__(self) -> Awaitable[T_co]: ...
    def cancel(self) -> None: ...


async def bounded(call: Awaitable[T], timeout_s: float, what: str) -> T:
    """``await call``, for at most ``timeout_s``; then cancel it and raise UpstreamTimeoutError."""
    try:
        return await asyncio.wait_for(call, timeout_s)
    except TimeoutError:
        cancel: Any = getattr(call, "cancel", None)
        if callable(cancel):
            cancel()
        raise UpstreamTimeoutError(
            f"{what} did not answer within {math.ceil(timeout_s)}s; the work was cancelled. Retry shortly.",
            retry_after_s=RETRY_AFTER_S,
        ) from None


async def bounded_on_a_live_replica(
    make_call: Callable[[], Awaitable[T]], timeout_s: float, what: str, calls: int = 3
) -> T:
    """`bounded` ``make_call()``, made again (``calls`` in all) while it fails because the replica
    that took it stopped, e.g. replaced by a rollout: for calls that are safe to make twice."""
    for attempt in range(calls):
        try:
            return await bounded(make_call(), timeout_s, what)
        except Exception as failure:
            if attempt == calls - 1 or not is_replica_failure(failure):
                raise
    raise AssertionError("unreachable: calls >= 1")


async def each_within(stream: CancellableStream[T], timeout_s: float, what: str) -> AsyncIterator[T]:
    """The events of ``stream``, each awaited for at most ``timeout_s``; a stall cancels the stream."""
    events = aiter(stream)
    while True:
        try:
            yield await bounded(anext(events), timeout_s, what)
        except StopAsyncIteration:
            return
        except UpstreamTimeoutError:
            stream.cancel()
            raise
