"""Every call through a Serve handle is bounded: a stage that never answers is cancelled and the
caller gets a 504 in OpenAI's shape, never a hang. Below the boundary, the handles are fakes whose
responses never finish (a wedged replica)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from deployments.call_timeouts import bounded, bounded_on_a_live_replica, each_within
from deployments.contracts import EncodeOptions
from deployments.errors import UpstreamTimeoutError
from deployments.stage_chain import StageChain
from serve_app.errors import as_api_error, error_headers, error_info, http_status
from serve_app.planning import PlanTarget, plan_generation
from serve_app.protocol import ImageGenerationRequest
from tests.conftest import make_test_config

HANG_GUARD_S = 30.0  # the test fails, instead of hanging, when nothing bounds the call


class Wedged:
    """A handle method whose calls never answer (a stopped replica); it remembers them."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.calls: list[asyncio.Future[Any]] = []

    def remote(self, *args: object) -> asyncio.Future[Any]:
        response = self.loop.create_future()
        self.calls.append(response)
        return response


class WedgedHandle:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.prepare = Wedged(loop)
        self.generate = Wedged(loop)
        self.finish = Wedged(loop)


def test_a_call_that_never_answers_is_cancelled_and_becomes_a_504() -> None:
    async def scenario() -> None:
        never = asyncio.get_running_loop().create_future()
        with pytest.raises(UpstreamTimeoutError) as raised:
            await asyncio.wait_for(bounded(never, 0.05, "The scheduler"), HANG_GUARD_S)
        assert never.cancelled()
        error = as_api_error(raised.value)
        assert http_status(error) == 504
        assert error_info(error).model_dump()["code"] == "upstream_timeout"
        assert "The scheduler did not answer" in error.message
        assert error_headers(error)["retry-after"] and error_headers(error)["x-should-retry"] == "true"

    asyncio.run(scenario())


def test_a_wedged_stage_chain_fails_cleanly_once_and_cancels_every_stage(tmp_path: Any) -> None:
    config = make_test_config(tmp_path)
    target = PlanTarget(config.variants[0], config.limits, request_id="req_1", tenant="local")
    request, _ = plan_generation(ImageGenerationRequest(prompt="a square", size="64x64"), target)

    async def scenario() -> None:
        handle: Any = WedgedHandle(asyncio.get_running_loop())
        chain = StageChain(handle, handle, {request.variant: handle})
        retries: list[int] = []
        run = chain.make_images(request, EncodeOptions(), 4, 0.05, on_retry=lambda: retries.append(1))
        with pytest.raises(UpstreamTimeoutError):
            await asyncio.wait_for(run, HANG_GUARD_S)
        assert retries == []  # a timeout is not retried: the work may be stuck behind a wedged pass
        calls = [*handle.prepare.calls, *handle.generate.calls, *handle.finish.calls]
        assert len(calls) == 3 and all(call.cancelled() for call in calls)

    asyncio.run(scenario())


class StalledStream:
    """A stream of events that sends one, then never another (a replica stopped mid-stream)."""

    def __init__(self) -> None:
        self.sent = False
        self.cancelled = False

    def __aiter__(self) -> StalledStream:
        return self

    async def __anext__(self) -> str:
        if not self.sent:
            self.sent = True
            return "partial"
        await asyncio.Event().wait()  # never set
        raise AssertionError("unreachable")

    def cancel(self) -> None:
        self.cancelled = True


def test_a_stream_that_stalls_is_cancelled_and_ends_with_a_timeout() -> None:
    async def scenario() -> None:
        stream = StalledStream()
        received: list[str] = []
        with pytest.raises(UpstreamTimeoutError):
            async for event in each_within(stream, 0.05, "The image stream"):
                received.append(event)
        assert received == ["partial"] and stream.cancelled

    asyncio.run(asyncio.wait_for(scenario(), HANG_GUARD_S))


def test_a_call_whose_replica_stopped_is_made_again_and_other_failures_are_not() -> None:
    from ray.exceptions import ActorDiedError

    made: list[str] = []

    def call(outcomes: list[BaseException | str]) -> Any:
        async def once() -> str:
            outcome = outcomes.pop(0)
            made.append(str(outcome))
            if isinstance(outcome, BaseException):
                raise outcome
            return outcome

        return lambda: once()

    stopped = ActorDiedError()  # what a handle call raises when a rollout stops its replica
    assert asyncio.run(bounded_on_a_live_replica(call([stopped, "granted"]), 5, "The scheduler")) == "granted"
    assert len(made) == 2
    with pytest.raises(ValueError):  # not a replica failure: raised at once
        asyncio.run(bounded_on_a_live_replica(call([ValueError("bad"), "granted"]), 5, "The scheduler"))
    with pytest.raises(ActorDiedError):  # the calls run out
        asyncio.run(bounded_on_a_live_replica(call([stopped, stopped]), 5, "The scheduler", calls=2))
