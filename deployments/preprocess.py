"""Preprocess stage: normalize a validated request and expand it into one task per image."""

from __future__ import annotations

import dataclasses
import time
import unicodedata

from ray import serve

from deployments.contracts import ImageRequest, ImageTask
from deployments.metrics import stage_metrics


def normalize_prompt(text: str) -> str:
    """NFC-normalized, control characters (other than newline and tab) removed, ends trimmed."""
    text = unicodedata.normalize("NFC", text)
    kept = (char for char in text if char in "\n\t" or unicodedata.category(char)[0] != "C")
    return "".join(kept).strip()


def expand_request(request: ImageRequest) -> list[ImageTask]:
    """Image ``i`` of the request gets seed ``seed + i``, so any image can be reproduced alone."""
    prompt = normalize_prompt(request.prompt)
    negative = normalize_prompt(request.negative_prompt) if request.negative_prompt else None
    return [
        ImageTask(
            request_id=request.request_id,
            index=index,
            tenant=request.tenant,
            variant=request.variant,
            kind=request.kind,
            prompt=prompt,
            negative_prompt=negative,
            width=request.width,
            height=request.height,
            steps=request.steps,
            guidance_scale=request.guidance_scale,
            seed=request.seed + index,
        )
        for index in range(request.n)
    ]


@serve.deployment
class Preprocess:
    def __init__(self) -> None:
        self.metrics = stage_metrics()

    async def ready(self) -> bool:
        return True

    async def prepare(self, request: ImageRequest) -> list[ImageTask]:
        start = time.perf_counter()
        tasks = expand_request(request)
        elapsed = time.perf_counter() - start
        self.metrics.observe_stage("preprocess", request.variant, elapsed)
        return [dataclasses.replace(task, preprocess_s=elapsed) for task in tasks]
