"""A naive FastAPI + diffusers server, written the way most first image servers are.

One ``async def`` route calls the pipeline directly, so the event loop blocks for the whole
forward pass and requests are handled strictly one at a time, each at batch size 1. It speaks
just enough of the OpenAI Images API for the load generator: a prompt, ``size`` and ``n`` in,
base64 PNGs out.

    python -m benchmarks.peers.naive_fastapi --weights PATH --port 8001
"""

from __future__ import annotations

import argparse
import base64
import io
import time
from typing import Any

from fastapi import FastAPI


def build_app(weights: str, steps: int, guidance_scale: float) -> FastAPI:
    from diffusers import DiffusionPipeline

    pipeline = DiffusionPipeline.from_pretrained(weights)
    pipeline.set_progress_bar_config(disable=True)
    app = FastAPI()

    @app.post("/v1/images/generations")
    async def generate(body: dict[str, Any]) -> dict[str, Any]:
        width, height = (int(side) for side in body.get("size", "64x64").split("x"))
        images = pipeline(
            prompt=body["prompt"],
            num_images_per_prompt=int(body.get("n", 1)),
            width=width,
            height=height,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
        ).images
        data = []
        for image in images:
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            data.append({"b64_json": base64.b64encode(buffer.getvalue()).decode("ascii")})
        return {"created": int(time.time()), "data": data}

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    return app


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", required=True, help="a diffusers directory or hub id")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--guidance-scale", type=float, default=5.0)
    args = parser.parse_args(argv)
    app = build_app(args.weights, args.steps, args.guidance_scale)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")


if __name__ == "__main__":
    main()
