"""The ingress's side of the scheduler's slots: one scheduler round trip per request (none when
the scheduler lives in the ingress, ``scheduler.colocate``).

A request asks for its slots once (`SlotClient.acquire`). Giving them back costs no round trip of
its own: a release waits a moment (`RELEASE_DELAY_S`) and rides on the next acquire, or, when none
comes, goes with every other release due in one call. A tier the scheduler is shedding is shed
here, at the edge, for a moment (`SHED_MEMORY_S`, at most its Retry-After), so a shed request
crosses no hop; only requests at least as large as the one shed, since a request can be shed for
its own size (over the hard backlog limit) while smaller ones still fit.

Every grant is released, and frees its slots exactly once: the scheduler's release is idempotent
(a second release of a ticket frees nothing), so releases whose delivery is uncertain (their call
was cancelled, timed out or lost its replica) are sent again; releases the scheduler answered are
not.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from deployments.call_timeouts import bounded_on_a_live_replica
from deployments.errors import APIError, UpstreamTimeoutError, unwrap_remote_error
from deployments.in_process import StageHandle
from serve_app.admission_policy import WorkRequest
from serve_app.errors import OverloadedError
from serve_app.scheduler import Grant, Release

RELEASE_DELAY_S = 0.01  # a slot held this much longer is noise beside a forward pass
SHED_MEMORY_S = 1.0


class SlotClient:
    def __init__(
        self, scheduler: StageHandle, slot_wait_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.scheduler = scheduler
        self.slot_wait_s = slot_wait_s
        self.clock = clock
        self._due: list[Release] = []
        self._flush: asyncio.TimerHandle | None = None
        # (variant, tier) -> until when, the 429, and the images of the request that got it
        self._shedding: dict[tuple[str, str], tuple[float, OverloadedError, int]] = {}

    async def acquire(self, work: WorkRequest) -> Grant:
        """Admit ``work`` and wait for its slots (within ``slot_wait_s``), carrying the releases
        that are due; raises the scheduler's 429s, or the edge's while the tier is shed."""
        self._shed_at_edge(work)
        carried, self._due = self._due, []
        try:
            # Asked again of the next scheduler if a rollout stops this one under the wait: the
            # work has not started, and a release sent twice frees nothing twice.
            grant: Grant = await bounded_on_a_live_replica(
                lambda: self.scheduler.acquire.remote(work, carried), self.slot_wait_s, "The scheduler"
            )
        except BaseException as failure:
            answered = unwrap_remote_error(failure)
            if not isinstance(answered, APIError) or isinstance(answered, UpstreamTimeoutError):
                # Not answered (the client left, or the call timed out or failed): send the
                # carried releases again, and this ticket's, which may have been granted meanwhile.
                self.release_all([*carried, (work.ticket_id, 0)])
            elif isinstance(answered, OverloadedError):
                self._remember_shedding(work, answered)
            raise
        return grant

    def release(self, ticket_id: str, completed_images: int) -> None:
        """Give a grant back, soon, without waiting for the scheduler."""
        self.release_all([(ticket_id, completed_images)])

    def release_all(self, releases: list[Release]) -> None:
        self._due.extend(releases)
        if self._flush is None:
            self._flush = asyncio.get_running_loop().call_later(RELEASE_DELAY_S, self._send_due)

    def _send_due(self) -> None:
        self._flush = None
        if self._due:
            due, self._due = self._due, []
            self.scheduler.release_all.remote(due)

    def _shed_at_edge(self, work: WorkRequest) -> None:
        key = (work.variant, work.tier)
        if (remembered := self._shedding.get(key)) is None:
            return
        until, error, images = remembered
        if until <= self.clock():
            del self._shedding[key]
            return
        if work.images < images:  # a smaller request may fit where that one did not: ask
            return
        # The scheduler's rate-limit headers as of its 429: an edge 429 carries them as every 429 does.
        raise OverloadedError(
            error.message,
            retry_after_s=error.retry_after_s or SHED_MEMORY_S,
            rate_limit_headers=error.rate_limit_headers,
        )

    def _remember_shedding(self, work: WorkRequest, error: OverloadedError) -> None:
        memory_s = min(SHED_MEMORY_S, error.retry_after_s or SHED_MEMORY_S)
        self._shedding[(work.variant, work.tier)] = (self.clock() + memory_s, error, work.images)
