"""The stage chain preprocess -> model -> postprocess: the one object that holds the stage handles.

`serve_app/app.py` builds one `StageChain` and hands it to the ingress (synchronous and streamed
requests) and the scheduler (jobs); nothing else calls a stage. Stage results are handed on as
``DeploymentResponse`` objects. Over Serve's gRPC transport (serve_app/replica_environment.py)
the caller's router awaits each and sends its value on, so a stage's output passes through the
caller (over Ray's actor transport it would go through the object store instead). A CPU stage
may be colocated (``stages.<stage>.colocate``, the default): it then runs in the caller's own
process, a `LocalStage`, and its hop (a request through Serve each way, and its serialization)
is gone. The model replicas are deployments of their own, or on a single-process service
(``stages.ingress.colocate_models``) built in the ingress as it starts (`StageChain.started`) and
called there through an `InProcessHandle`. A replica that dies mid-batch fails the
whole chain, which is then run again (bounded): the tasks are deterministic and jobs have stable
object keys, so a retry neither changes the images nor stores them twice.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field, replace
from typing import Any

from ray.serve.handle import DeploymentHandle, DeploymentResponse, DeploymentResponseGenerator

from deployments.call_timeouts import CancellableStream, bounded
from deployments.contracts import EncodeOptions, ImageRequest, ImageTask, StoredImage, StreamEvent
from deployments.errors import UpstreamTimeoutError, is_replica_failure
from deployments.in_process import InProcessHandle, LocalEvents, StageHandle
from deployments.model_replica import ColocatedModel
from deployments.postprocess import Postprocessor
from deployments.preprocess import Preprocessor

RETRY_BACKOFF_S = 0.5


@dataclass
class LocalStage:
    """A colocated stage: built from its arguments in the process that first uses it (the
    ingress, or the scheduler for jobs), and called there directly. Model handles among the
    arguments travel like any other bound deployment: Serve hands the process handles."""

    stage_class: type[Preprocessor] | type[Postprocessor]
    args: tuple[Any, ...]
    _instance: Any = field(default=None, init=False, repr=False, compare=False)

    @property
    def instance(self) -> Any:
        if self._instance is None:
            self._instance = self.stage_class(*self.args)
        return self._instance

    def __getstate__(self) -> dict[str, Any]:  # the instance stays in the process that built it
        return {"stage_class": self.stage_class, "args": self.args, "_instance": None}


@dataclass
class StageChain:
    preprocess: DeploymentHandle | LocalStage
    postprocess: DeploymentHandle | LocalStage
    models: dict[str, StageHandle]

    def started(self) -> StageChain:
        """This chain with its colocated model replicas (`ColocatedModel`) built and started in
        this process, each called through an `InProcessHandle`; the chain itself without any."""
        models = {
            name: model.start() if isinstance(model, ColocatedModel) else model
            for name, model in self.models.items()
        }
        return replace(self, models=models)

    async def make_images(
        self,
        request: ImageRequest,
        options: EncodeOptions,
        attempts: int,
        timeout_s: float,
        on_retry: Callable[[], None] = lambda: None,
    ) -> list[StoredImage]:
        """The request's images, encoded and stored; run again up to ``attempts`` times when a
        replica dies. Each run is bounded by ``timeout_s`` (then cancelled: UpstreamTimeoutError).
        ``on_retry`` is called before each run after the first (jobs count them)."""
        for attempt in range(attempts):
            if attempt:
                on_retry()
            try:
                return await self.make_images_once(request, options, timeout_s)
            except Exception as failure:
                if attempt == attempts - 1 or not is_replica_failure(failure):
                    raise
                await asyncio.sleep(RETRY_BACKOFF_S * 2**attempt)  # let Serve replace the replica
        raise AssertionError("unreachable: attempts >= 1")

    async def make_images_once(
        self, request: ImageRequest, options: EncodeOptions, timeout_s: float
    ) -> list[StoredImage]:
        """One pass through the chain, bounded by ``timeout_s``: preprocess, the request's model
        replica, postprocess. On a timeout or a cancel every stage call still running is
        cancelled too (each is its own request), so the model stops between denoising steps
        instead of finishing work nobody wants."""
        calls: list[DeploymentResponse[Any] | DeploymentResponseGenerator[Any] | asyncio.Future[Any]] = []

        async def run() -> list[StoredImage]:
            tasks: Any
            if isinstance(self.preprocess, LocalStage):
                tasks = await self.preprocess.instance.prepare(request)
            else:
                tasks = self.preprocess.prepare.remote(request)
                calls.append(tasks)
            generated = self.models[request.variant].generate.remote(tasks)
            calls.append(generated)
            if isinstance(self.postprocess, LocalStage):
                stored: list[StoredImage] = await self.postprocess.instance.finish(await generated, options)
                return stored
            finished = self.postprocess.finish.remote(generated, options)
            calls.append(finished)
            result: list[StoredImage] = await finished
            return result

        try:
            return await bounded(run(), timeout_s, "The image pipeline")
        except (asyncio.CancelledError, UpstreamTimeoutError):
            for call in calls:
                call.cancel()
            raise

    def stream_events(self, request: ImageRequest, options: EncodeOptions) -> CancellableStream[StreamEvent]:
        """The request's previews and images as postprocess encodes them from the model's stream.

        Postprocess calls the model replica itself (its handle goes with the call), so the pixels
        go model -> postprocess and only encoded events come back to the caller.
        """
        if isinstance(self.preprocess, LocalStage) or isinstance(self.postprocess, LocalStage):
            return LocalEvents(self._stream_here(request, options))
        tasks = self.preprocess.prepare.remote(request)
        assert isinstance(tasks, DeploymentResponse)  # a unary call
        model = self.models[request.variant]
        events = self.postprocess.options(stream=True).stream.remote(tasks, options, model)
        assert isinstance(events, DeploymentResponseGenerator)  # what options(stream=True) returns
        return events

    async def _stream_here(
        self, request: ImageRequest, options: EncodeOptions
    ) -> AsyncGenerator[StreamEvent, None]:
        """The stream when a stage runs in this process: the tasks are made here or come back
        here, and the events are encoded here or streamed from Postprocess."""
        tasks: list[ImageTask]
        if isinstance(self.preprocess, LocalStage):
            tasks = await self.preprocess.instance.prepare(request)
        else:
            tasks = await self.preprocess.prepare.remote(request)
        model = self.models[request.variant]
        if isinstance(self.postprocess, LocalStage):
            async for event in self.postprocess.instance.stream(tasks, options, model):
                yield event
            return
        events = self.postprocess.options(stream=True).stream.remote(tasks, options, model)
        assert isinstance(events, DeploymentResponseGenerator)  # what options(stream=True) returns
        finished = False
        try:
            async for event in events:
                yield event
            finished = True
        finally:
            if not finished:
                events.cancel()

    def colocated(self) -> list[str]:
        """The stages that run in this process (ready whenever it answers)."""
        stages = (("preprocess", self.preprocess), ("postprocess", self.postprocess))
        names = [name for name, stage in stages if isinstance(stage, LocalStage)]
        return names + [
            f"model:{name}" for name, model in self.models.items() if isinstance(model, InProcessHandle)
        ]

    def probes(self, cold_variants: set[str]) -> dict[str, StageHandle]:
        """The stages to ask for readiness: every one but the variants that may sit at zero."""
        stages: dict[str, StageHandle] = {
            name: stage
            for name, stage in (("preprocess", self.preprocess), ("postprocess", self.postprocess))
            if not isinstance(stage, LocalStage)
        }
        stages.update(
            {
                f"model:{name}": handle
                for name, handle in self.models.items()
                if name not in cold_variants and not isinstance(handle, InProcessHandle)
            }
        )
        return stages
