"""The ingress's side of the slots without Ray: one scheduler round trip per request, releases
batched and carried on the next acquire, resent only when their delivery is uncertain, and a
tier the scheduler sheds shed at the edge for a moment.

Below `SlotClient` the scheduler handle is a plain stand-in that records what it receives (the
boundary under test is what the client sends, and when); the scheduler's own handling of carried
releases is tested on the real deployment class in tests/unit/test_scheduler_faults.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from deployments.errors import APIError
from deployments.in_process import InProcessMethod
from serve_app.admission_policy import WorkRequest
from serve_app.errors import OverloadedError, RateLimitError
from serve_app.scheduler import Grant, Release
from serve_app.slot_client import SHED_MEMORY_S, SlotClient

DEADLINE_S = 10.0


class SchedulerStandIn:
    """Records each acquire (with the releases it carries) and each batch of releases."""

    def __init__(self, answer: Callable[[WorkRequest], Awaitable[Grant]] | None = None) -> None:
        self.acquires: list[tuple[str, list[Release]]] = []
        self.release_calls: list[list[Release]] = []
        self.acquire_arrived = asyncio.Event()
        self.releases_arrived = asyncio.Event()
        self.answer = answer or grant
        self.acquire = InProcessMethod(self._acquire)
        self.release_all = InProcessMethod(self._release_all)

    async def _acquire(self, work: WorkRequest, released: list[Release]) -> Grant:
        self.acquires.append((work.ticket_id, list(released)))
        self.acquire_arrived.set()
        return await self.answer(work)

    async def _release_all(self, releases: list[Release]) -> None:
        self.release_calls.append(list(releases))
        self.releases_arrived.set()

    async def next_releases(self) -> list[Release]:
        await asyncio.wait_for(self.releases_arrived.wait(), DEADLINE_S)
        self.releases_arrived.clear()
        return self.release_calls[-1]


async def grant(work: WorkRequest) -> Grant:
    return Grant(work.ticket_id, 0.0, False, {})


def work(tier: str = "paid", images: int = 1) -> WorkRequest:
    return WorkRequest(tenant="local", tier=tier, variant="tiny-sd", images=images, cost=0.01 * images)


def client_for(scheduler: SchedulerStandIn, clock: Callable[[], float] | None = None) -> SlotClient:
    if clock is None:
        return SlotClient(scheduler, slot_wait_s=DEADLINE_S)  # type: ignore[arg-type]
    return SlotClient(scheduler, slot_wait_s=DEADLINE_S, clock=clock)  # type: ignore[arg-type]


def test_a_release_rides_on_the_next_acquire_instead_of_a_call_of_its_own() -> None:
    async def scenario() -> None:
        scheduler = SchedulerStandIn()
        slots = client_for(scheduler)
        slots.release("tkt_done", 1)
        request = work()
        await slots.acquire(request)
        assert scheduler.acquires == [(request.ticket_id, [("tkt_done", 1)])]
        slots.release(request.ticket_id, 1)
        # the next batch holds only the later release: the first went with the acquire, once
        assert await scheduler.next_releases() == [(request.ticket_id, 1)]
        assert len(scheduler.release_calls) == 1

    asyncio.run(scenario())


def test_releases_due_together_go_in_one_call() -> None:
    async def scenario() -> None:
        scheduler = SchedulerStandIn()
        slots = client_for(scheduler)
        for index in range(3):
            slots.release(f"tkt_{index}", index)
        assert await scheduler.next_releases() == [("tkt_0", 0), ("tkt_1", 1), ("tkt_2", 2)]
        assert len(scheduler.release_calls) == 1

    asyncio.run(scenario())


def test_an_unanswered_acquire_sends_its_carried_releases_again_and_frees_its_own_ticket() -> None:
    async def scenario() -> None:
        never = asyncio.Event()

        async def wait_forever(request: WorkRequest) -> Grant:
            await never.wait()
            raise AssertionError("unreachable")

        scheduler = SchedulerStandIn(wait_forever)
        slots = client_for(scheduler)
        slots.release("tkt_done", 1)
        request = work()
        acquiring = asyncio.ensure_future(slots.acquire(request))
        await asyncio.wait_for(scheduler.acquire_arrived.wait(), DEADLINE_S)
        acquiring.cancel()  # the client left while its acquire was in flight
        with pytest.raises(asyncio.CancelledError):
            await acquiring
        assert await scheduler.next_releases() == [("tkt_done", 1), (request.ticket_id, 0)]

    asyncio.run(scenario())


@pytest.mark.parametrize(
    "refusal",
    [
        RateLimitError("slow down", retry_after_s=1.0),
        OverloadedError("shedding", retry_after_s=1.0),
        APIError("the scheduler answered with an error"),
    ],
    ids=["rate-limited", "shed", "error"],
)
def test_an_acquire_the_scheduler_answered_does_not_resend_its_releases(refusal: APIError) -> None:
    async def scenario() -> None:
        async def refuse(request: WorkRequest) -> Grant:
            raise refusal

        scheduler = SchedulerStandIn(refuse)
        slots = client_for(scheduler)
        slots.release("tkt_done", 1)
        with pytest.raises(type(refusal)):
            await slots.acquire(work())
        slots.release("tkt_later", 1)
        assert await scheduler.next_releases() == [("tkt_later", 1)]

    asyncio.run(scenario())


LIMITS = {"x-ratelimit-limit-requests": "60", "x-ratelimit-remaining-requests": "12"}


def test_a_shed_tier_is_shed_at_the_edge_for_a_moment_and_other_tiers_are_not() -> None:
    async def scenario() -> None:
        now = [100.0]

        async def shed_free(request: WorkRequest) -> Grant:
            if request.tier == "free":
                raise OverloadedError(
                    "the service is at peak load; this tier is paused",
                    retry_after_s=5.0,
                    rate_limit_headers=LIMITS,
                )
            return await grant(request)

        scheduler = SchedulerStandIn(shed_free)
        slots = client_for(scheduler, clock=lambda: now[0])
        with pytest.raises(OverloadedError):
            await slots.acquire(work("free"))
        with pytest.raises(OverloadedError) as shed_here:
            await slots.acquire(work("free"))
        assert len(scheduler.acquires) == 1  # the second never reached the scheduler
        assert shed_here.value.retry_after_s == 5.0
        assert "paused" in shed_here.value.message
        assert shed_here.value.rate_limit_headers == LIMITS  # as every 429 carries them
        await slots.acquire(work("paid"))
        assert len(scheduler.acquires) == 2
        now[0] += SHED_MEMORY_S + 0.01  # the memory passes: the scheduler decides again
        with pytest.raises(OverloadedError):
            await slots.acquire(work("free"))
        assert len(scheduler.acquires) == 3

    asyncio.run(scenario())


def test_a_request_shed_for_its_own_size_does_not_shed_smaller_ones_at_the_edge() -> None:
    """Over the hard backlog limit a request is shed for its size: a smaller one may still fit."""

    async def scenario() -> None:
        async def shed_large(request: WorkRequest) -> Grant:
            if request.images > 8:
                raise OverloadedError("the service is at its hard backlog limit", retry_after_s=1.0)
            return await grant(request)

        scheduler = SchedulerStandIn(shed_large)
        slots = client_for(scheduler, clock=lambda: 100.0)
        with pytest.raises(OverloadedError):
            await slots.acquire(work(images=9))
        await slots.acquire(work(images=2))  # asked of the scheduler, and granted
        assert len(scheduler.acquires) == 2
        with pytest.raises(OverloadedError):
            await slots.acquire(work(images=9))  # as large: shed at the edge
        assert len(scheduler.acquires) == 2

    asyncio.run(scenario())
