"""The stage chain preprocess -> model -> postprocess, shared by the ingress and the scheduler.

Stage results travel as ``DeploymentResponse`` objects straight into the next stage, so image
data never passes through the caller. A replica that dies mid-batch fails the whole chain,
which is then run again (bounded): the tasks are deterministic and jobs have stable object
keys, so a retry neither changes the images nor stores them twice.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from ray.serve.handle import DeploymentHandle

from deployments.contracts import EncodeOptions, ImageRequest, StoredImage
from serve_app.call_timeouts import UpstreamTimeoutError, bounded
from serve_app.errors import is_replica_failure

RETRY_BACKOFF_S = 0.5


@dataclass(frozen=True)
class StageHandles:
    preprocess: DeploymentHandle
    postprocess: DeploymentHandle
    models: dict[str, DeploymentHandle]

    async def run(
        self,
        request: ImageRequest,
        options: EncodeOptions,
        attempts: int,
        timeout_s: float,
        on_retry: Callable[[], None] = lambda: None,
    ) -> list[StoredImage]:
        """Run the chain for one request, retrying up to ``attempts`` times when a replica dies.

        Each run is bounded by ``timeout_s`` (then cancelled: UpstreamTimeoutError, a 504).
        ``on_retry`` is called before each run after the first (jobs count their attempts).
        """
        for attempt in range(attempts):
            if attempt:
                on_retry()
            try:
                tasks = self.preprocess.prepare.remote(request)
                generated = self.models[request.variant].generate.remote(tasks)
                try:
                    stored: list[StoredImage] = await bounded(
                        self.postprocess.finish.remote(generated, options), timeout_s, "The image pipeline"
                    )
                except (asyncio.CancelledError, UpstreamTimeoutError):
                    # Each stage call is its own request: cancel the model's too, so it stops
                    # between denoising steps instead of finishing work nobody wants.
                    generated.cancel()
                    tasks.cancel()
                    raise
                return stored
            except Exception as failure:
                if attempt == attempts - 1 or not is_replica_failure(failure):
                    raise
                await asyncio.sleep(RETRY_BACKOFF_S * 2**attempt)  # let Serve replace the replica
        raise AssertionError("unreachable: attempts >= 1")
