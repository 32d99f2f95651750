"""The stage chain preprocess -> model -> postprocess: the one object that holds the stage handles.

`serve_app/app.py` builds one `StageChain` and hands it to the ingress (synchronous and streamed
requests) and the scheduler (jobs); nothing else calls a stage. Stage results travel as
``DeploymentResponse`` objects straight into the next stage, so image data never passes through
the caller. A replica that dies mid-batch fails the whole chain, which is then run again
(bounded): the tasks are deterministic and jobs have stable object keys, so a retry neither
changes the images nor stores them twice.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from ray.serve.handle import DeploymentHandle, DeploymentResponse, DeploymentResponseGenerator

from deployments.call_timeouts import bounded
from deployments.contracts import EncodeOptions, ImageRequest, StoredImage
from deployments.errors import UpstreamTimeoutError, is_replica_failure

RETRY_BACKOFF_S = 0.5


@dataclass
class StageChain:
    preprocess: DeploymentHandle
    postprocess: DeploymentHandle
    models: dict[str, DeploymentHandle]

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
        """One pass through the chain: preprocess, the request's model replica, postprocess."""
        tasks = self.preprocess.prepare.remote(request)
        generated = self.models[request.variant].generate.remote(tasks)
        try:
            stored: list[StoredImage] = await bounded(
                self.postprocess.finish.remote(generated, options), timeout_s, "The image pipeline"
            )
        except (asyncio.CancelledError, UpstreamTimeoutError):
            # Each stage call is its own request: cancel the model's too, so it stops between
            # denoising steps instead of finishing work nobody wants.
            generated.cancel()
            tasks.cancel()
            raise
        return stored

    def stream_events(self, request: ImageRequest, options: EncodeOptions) -> DeploymentResponseGenerator:
        """The request's previews and images as postprocess encodes them from the model's stream.

        Postprocess calls the model replica itself (it holds the model handles for this leg), so
        the pixels go model -> postprocess and only encoded events come back to the caller.
        """
        tasks = self.preprocess.prepare.remote(request)
        assert isinstance(tasks, DeploymentResponse)  # a unary call
        events = self.postprocess.options(stream=True).stream.remote(tasks, options)
        assert isinstance(events, DeploymentResponseGenerator)  # what options(stream=True) returns
        return events

    def probes(self, cold_variants: set[str]) -> dict[str, DeploymentHandle]:
        """The stages to ask for readiness: every one but the variants that may sit at zero."""
        stages = {"preprocess": self.preprocess, "postprocess": self.postprocess}
        stages.update(
            {f"model:{name}": handle for name, handle in self.models.items() if name not in cold_variants}
        )
        return stages
