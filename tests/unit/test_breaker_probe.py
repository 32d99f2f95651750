"""A half-open breaker's probe is always resolved, whatever ends the work that holds it."""

from __future__ import annotations

import asyncio

import pytest

from deployments.resilience import CircuitBreaker, CircuitOpenError


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class StoreDown(Exception):
    pass


def half_open_breaker() -> tuple[CircuitBreaker, FakeClock]:
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=1, reset_timeout_s=5.0, clock=clock)
    breaker.record_failure()
    clock.now += 5.0
    assert breaker.state == "half_open"
    return breaker, clock


def is_store_down(error: BaseException) -> bool:
    return isinstance(error, StoreDown)


@pytest.mark.parametrize("ending", [ValueError("a 400"), asyncio.CancelledError()])
def test_a_probe_that_ends_unjudged_lets_the_next_call_probe(ending: BaseException) -> None:
    breaker, _ = half_open_breaker()
    with pytest.raises(type(ending)), breaker.guarded(is_store_down):
        raise ending
    assert breaker.state == "half_open"
    assert breaker.before_call() is True  # the next call is the probe


def test_a_probe_that_succeeds_closes_and_one_that_fails_reopens() -> None:
    breaker, clock = half_open_breaker()
    with pytest.raises(StoreDown), breaker.guarded(is_store_down):
        raise StoreDown()
    assert breaker.state == "open"
    with pytest.raises(CircuitOpenError), breaker.guarded(is_store_down):
        pass
    clock.now += 5.0
    with breaker.guarded(is_store_down):
        pass
    assert breaker.state == "closed"


def test_calls_inside_the_probe_go_ahead_and_others_wait() -> None:
    breaker, _ = half_open_breaker()

    async def scenario() -> None:
        probe_taken = asyncio.Event()

        async def other_request() -> None:
            await probe_taken.wait()
            breaker.before_call()

        other = asyncio.get_running_loop().create_task(other_request())  # a request of its own
        with breaker.guarded(is_store_down):
            assert breaker.before_call() is False  # the probe's own store call
            assert await asyncio.to_thread(breaker.before_call) is False  # also from its threads
            probe_taken.set()
            with pytest.raises(CircuitOpenError):
                await other

    asyncio.run(scenario())
    assert breaker.state == "closed"
