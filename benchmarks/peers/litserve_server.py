"""LitServe with its dynamic batching, serving the same diffusion family as imagegen-serve.

Requests of one size are batched into one pipeline call (up to ``--max-batch-size``, waiting at
most ``--batch-timeout`` seconds for a batch to fill), through the same `DiffusionFamily` code
the imagegen-serve replica runs, so only the serving around the model differs.

    python -m benchmarks.peers.litserve_server --port 8002
"""

# No `from __future__ import annotations`: LitServe reads decode_request's and encode_response's
# annotations at run time to build the FastAPI route.
import argparse
import base64
import secrets
import time
from typing import Any

import litserve as ls
import numpy as np
from fastapi import HTTPException
from pydantic import BaseModel

from benchmarks.systems import single_process_variant
from deployments.config import VariantConfig
from deployments.contracts import ImageTask
from deployments.images import encode_image
from deployments.models.cpu_threads import usable_cores
from serve_app.config import load_config

Item = tuple[str, int, int]  # prompt, width, height


class GenerationBody(BaseModel):
    """The part of OpenAI's image generation request this peer reads."""

    prompt: str
    size: str = "64x64"
    n: int = 1


class DiffusionLitAPI(ls.LitAPI):
    def __init__(self, variant: VariantConfig, steps: int, **batching: Any) -> None:
        super().__init__(api_path="/v1/images/generations", **batching)
        self.variant = variant
        self.steps = steps

    def setup(self, device: str) -> None:
        from deployments.models.diffusion import DiffusionFamily

        self.family = DiffusionFamily(self.variant, load_config().cache_dir)
        print(self.family.load(), flush=True)

    def decode_request(self, request: GenerationBody) -> Item:
        if request.n != 1:
            raise HTTPException(400, "this peer makes one image per request (n=1)")
        width, height = (int(side) for side in request.size.split("x"))
        return request.prompt, width, height

    def batch(self, inputs: list[Item]) -> list[Item]:
        return inputs

    def predict(self, items: list[Item]) -> list[np.ndarray]:
        outputs: list[np.ndarray | None] = [None] * len(items)
        by_size: dict[tuple[int, int], list[int]] = {}
        for position, (_, width, height) in enumerate(items):
            by_size.setdefault((width, height), []).append(position)
        for (width, height), positions in by_size.items():
            tasks = [self._task(items[position][0], width, height) for position in positions]
            for position, pixels in zip(positions, self.family.generate(tasks), strict=True):
                outputs[position] = pixels
        return [pixels for pixels in outputs if pixels is not None]

    def unbatch(self, output: list[np.ndarray]) -> list[np.ndarray]:
        return output

    def encode_response(self, pixels: np.ndarray) -> dict[str, Any]:
        b64 = base64.b64encode(encode_image(pixels, "png", None)).decode("ascii")
        return {"created": int(time.time()), "data": [{"b64_json": b64}]}

    def _task(self, prompt: str, width: int, height: int) -> ImageTask:
        return ImageTask(
            request_id="litserve",
            index=0,
            tenant="bench",
            variant=self.variant.name,
            kind="generate",
            prompt=prompt,
            negative_prompt=None,
            width=width,
            height=height,
            steps=self.steps,
            guidance_scale=self.variant.guidance_scale,
            seed=secrets.randbelow(2**31),
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8002)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--batch-timeout", type=float, default=0.01)
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="model worker processes, each on its share of the cores (2 on 2 cores: one thread each)",
    )
    args = parser.parse_args(argv)
    variant = single_process_variant()
    if args.workers > 1:
        variant = variant.model_copy(update={"cpu_threads": max(1, usable_cores() // args.workers)})
    api = DiffusionLitAPI(
        variant,
        steps=variant.steps.medium,
        max_batch_size=args.max_batch_size,
        batch_timeout=args.batch_timeout,
    )
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=args.workers, timeout=120)
    server.run(host=args.host, port=args.port, generate_client_file=False, num_api_servers=1)


if __name__ == "__main__":
    main()
