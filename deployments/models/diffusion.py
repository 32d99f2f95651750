"""The diffusion family: diffusers pipelines loaded with ``from_pretrained``.

On a GPU it runs in half precision with memory-efficient attention (xformers when installed,
PyTorch SDPA otherwise), a channels-last denoiser and optional ``torch.compile``; on a CPU it
runs in float32. Seeds drive CPU generators, so one seed gives the same latents on any device.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch

from deployments.contracts import ImageTask
from deployments.images import to_uint8
from deployments.models.registry import ImageFamily

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def choose_device(requested: str) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("variant asks for device 'cuda' but no CUDA device is visible")
    return requested


def cpu_thread_count(requested: int | Literal["all"]) -> int:
    """``"all"``: every core this process may run on (Ray itself gives a worker floor(num_cpus))."""
    if requested != "all":
        return requested
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def choose_dtype(requested: str, device: str) -> torch.dtype:
    if requested == "auto":
        return torch.float16 if device == "cuda" else torch.float32
    return DTYPES[requested]


class DiffusionFamily(ImageFamily):
    """Text-to-image with any diffusers pipeline that takes prompts, sizes, steps and generators."""

    pipeline: Any

    def load(self) -> str:
        from diffusers import DiffusionPipeline
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()
        device = choose_device(self.variant.device)
        dtype = choose_dtype(self.variant.dtype, device)
        pipeline = DiffusionPipeline.from_pretrained(self.weights_source(), dtype=dtype)
        pipeline.set_progress_bar_config(disable=True)
        pipeline.to(device)
        if device == "cpu" and self.variant.cpu_threads is not None:
            torch.set_num_threads(cpu_thread_count(self.variant.cpu_threads))
        attention = "sdpa"
        if device == "cuda":
            denoiser = getattr(pipeline, "unet", None) or pipeline.transformer
            denoiser.to(memory_format=torch.channels_last)
            if importlib.util.find_spec("xformers") is not None:
                pipeline.enable_xformers_memory_efficient_attention()
                attention = "xformers"
            if self.variant.compile:
                denoiser.compile(mode="max-autotune-no-cudagraphs")
        self.pipeline = pipeline
        return (
            f"variant {self.variant.name}: {type(pipeline).__name__} on {device}, "
            f"dtype={str(dtype).removeprefix('torch.')}, attention={attention}, "
            f"compile={self.variant.compile and device == 'cuda'}"
            + (f", threads={torch.get_num_threads()}" if device == "cpu" else "")
        )

    def generate(self, tasks: Sequence[ImageTask]) -> list[np.ndarray]:
        first = tasks[0]
        negative = [task.negative_prompt or "" for task in tasks]
        output = self.pipeline(
            prompt=[task.prompt for task in tasks],
            negative_prompt=negative if any(negative) else None,
            height=first.height,
            width=first.width,
            num_inference_steps=first.steps,
            guidance_scale=first.guidance_scale,
            generator=[torch.Generator("cpu").manual_seed(task.seed) for task in tasks],
            output_type="np",
        )
        return [to_uint8(image) for image in output.images]
