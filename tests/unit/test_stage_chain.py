"""The stage chain with colocated stages, without Ray: the stages run in the caller, only the model
is called through its handle, and a timeout or a closed stream still stops the model's work.

The model handle is a stand-in with a handle's face (``generate.remote`` returns an awaitable
that can be cancelled); the stages are small stand-ins built the way a `LocalStage` builds them.
The chain with every stage deployed runs on real Serve in tests/integration/test_faults.py; the
colocated default in the other integration tests.
"""

from __future__ import annotations

import asyncio
import pickle
from collections.abc import AsyncGenerator, Coroutine, Generator
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from deployments.contracts import EncodeOptions, ImageRequest
from deployments.errors import UpstreamTimeoutError
from deployments.in_process import LocalEvents
from deployments.stage_chain import LocalStage, StageChain
from serve_app.config import ChainStageConfig, StageConfig
from tests.job_harness import scheduler_config, submission

DEADLINE_S = 10.0


class Call:
    """A unary call through a handle: awaitable once, cancellable."""

    def __init__(self, work: Coroutine[Any, Any, Any]) -> None:
        self.task = asyncio.ensure_future(work)
        self.cancelled = False

    def __await__(self) -> Generator[Any, None, Any]:
        return self.task.__await__()

    def cancel(self) -> None:
        self.cancelled = True
        self.task.cancel()


class ModelStandIn:
    def __init__(self, answers: bool = True) -> None:
        self.answers = answers
        self.received: list[Any] = []
        self.calls: list[Call] = []

    @property
    def generate(self) -> ModelStandIn:
        return self

    def remote(self, tasks: Any) -> Call:
        self.received.append(tasks)
        self.calls.append(Call(self._generate(tasks)))
        return self.calls[-1]

    async def _generate(self, tasks: list[str]) -> list[str]:
        if not self.answers:
            await asyncio.Event().wait()  # a wedged replica
        return [f"pixels of {task}" for task in tasks]


class PrepareHere:
    built = 0

    def __init__(self, suffix: str) -> None:
        PrepareHere.built += 1
        self.suffix = suffix

    async def prepare(self, request: ImageRequest) -> list[str]:
        return [f"task {index}{self.suffix}" for index in range(request.n)]


class FinishHere:
    def __init__(self) -> None:
        self.closed = asyncio.Event()

    async def finish(self, images: list[str], options: EncodeOptions) -> list[str]:
        return [f"{image} as {options.output_format}" for image in images]

    async def stream(self, tasks: list[str], options: EncodeOptions, model: Any) -> AsyncGenerator[str, None]:
        self.model = model  # the request's model replica, handed over with the call
        try:
            for task in tasks:
                yield f"{task} streamed"
                await asyncio.Event().wait()  # the next event never comes
        finally:
            self.closed.set()


def chain_with(model: ModelStandIn) -> StageChain:
    return StageChain(
        LocalStage(PrepareHere, ("!",)),  # type: ignore[arg-type]
        LocalStage(FinishHere, ()),  # type: ignore[arg-type]
        {"tiny-sd": model},  # type: ignore[dict-item]
    )


def request_and_options(tmp_path: Path) -> tuple[ImageRequest, EncodeOptions]:
    job = submission(scheduler_config(tmp_path))
    return job.request, job.options


def test_colocated_stages_run_in_the_caller_and_only_the_model_is_called(tmp_path: Path) -> None:
    async def scenario() -> None:
        request, options = request_and_options(tmp_path)
        model = ModelStandIn()
        chain = chain_with(model)
        stored = await chain.make_images(request, options, attempts=1, timeout_s=DEADLINE_S)
        assert model.received == [["task 0!"]]  # the tasks themselves, made here
        assert stored == ["pixels of task 0! as png"]
        # readiness probes only what runs elsewhere; the colocated stages are this process
        assert set(chain.probes(cold_variants=set())) == {"model:tiny-sd"}
        assert chain.colocated() == ["preprocess", "postprocess"]

    asyncio.run(scenario())


def test_a_timeout_cancels_the_model_call_of_a_colocated_chain(tmp_path: Path) -> None:
    async def scenario() -> None:
        request, options = request_and_options(tmp_path)
        model = ModelStandIn(answers=False)
        with pytest.raises(UpstreamTimeoutError):
            await chain_with(model).make_images_once(request, options, timeout_s=0.05)
        assert [call.cancelled for call in model.calls] == [True]

    asyncio.run(scenario())


def test_closing_a_colocated_stream_closes_the_stage_stream(tmp_path: Path) -> None:
    async def scenario() -> None:
        request, options = request_and_options(tmp_path)
        model = ModelStandIn()
        chain = chain_with(model)
        events = chain.stream_events(request, options)
        assert isinstance(events, LocalEvents)
        assert await events.__anext__() == "task 0! streamed"
        events.cancel()  # the client went away after the first event
        stage = chain.postprocess.instance  # type: ignore[union-attr]
        assert stage.model is model  # the stage streams from the request's variant
        await asyncio.wait_for(stage.closed.wait(), DEADLINE_S)

    asyncio.run(scenario())


def test_a_local_stage_travels_without_its_instance_and_is_built_once_where_used() -> None:
    stage = LocalStage(PrepareHere, ("!",))  # type: ignore[arg-type]
    built = PrepareHere.built
    first = stage.instance
    assert stage.instance is first and PrepareHere.built == built + 1
    copy = pickle.loads(pickle.dumps(stage))
    assert copy.instance.suffix == "!" and PrepareHere.built == built + 2  # built again there


def test_stages_are_colocated_unless_asked_apart_or_autoscaled() -> None:
    stages = StageConfig()
    assert stages.preprocess.colocate and stages.postprocess.colocate
    assert not ChainStageConfig(colocate=False).colocate
    autoscaled = ChainStageConfig(autoscaling={"replicas_per_model_replica": 1})  # type: ignore[arg-type]
    assert not autoscaled.colocate
    with pytest.raises(ValidationError, match="colocated stage scales with its caller"):
        ChainStageConfig(colocate=True, autoscaling={"replicas_per_model_replica": 1})  # type: ignore[arg-type]
