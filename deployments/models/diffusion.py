"""The diffusion family: diffusers pipelines loaded with ``from_pretrained``.

Text-to-image, image-to-image and inpainting run on one set of weights: the edit pipelines are
built with ``from_pipe`` from the loaded components, so they add no memory. Streaming previews
and cancellation hang off ``callback_on_step_end``: between steps the replica's hooks say which
rows want a preview (their current latents are decoded with the VAE) or that nobody is waiting.

On a GPU it runs in half precision with memory-efficient attention (xformers when installed,
PyTorch SDPA otherwise), a channels-last denoiser and optional ``torch.compile``; on a CPU it
runs in float32. Seeds drive CPU generators, so one seed gives the same latents on any device.
"""

from __future__ import annotations

import copy
import importlib.util
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from deployments.contracts import MASK_EDIT_THRESHOLD, ImageTask
from deployments.errors import InvalidRequestError
from deployments.images import to_uint8
from deployments.models.cpu_threads import cpu_thread_count
from deployments.models.registry import DenoisingHooks, ImageFamily

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
PER_CALL = frozenset({"scheduler", "tokenizer", "tokenizer_2", "tokenizer_3"})
"""Pipeline components that change as a pass runs (not weights): each lane has its own copies."""
StepCallback = Callable[[Any, int, Any, dict[str, Any]], dict[str, Any]]


def choose_device(requested: str) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("variant asks for device 'cuda' but no CUDA device is visible")
    return requested


def choose_dtype(requested: str, device: str) -> torch.dtype:
    if requested == "auto":
        return torch.float16 if device == "cuda" else torch.float32
    return DTYPES[requested]


def keep_unmasked(task: ImageTask, pixels: np.ndarray) -> np.ndarray:
    """An inpainted image with the pixels outside its mask put back exactly as they were sent."""
    if task.mask is None or task.image is None:
        return pixels
    return np.ascontiguousarray(np.where(task.mask >= MASK_EDIT_THRESHOLD, pixels, task.image))


class DiffusionFamily(ImageFamily):
    """Any diffusers pipeline that takes prompts, sizes, steps and generators, plus its edit pipelines."""

    pipeline: Any
    image_to_image: Any | None
    inpainting: Any | None

    def load(self) -> str:
        from diffusers import DiffusionPipeline
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()
        device = choose_device(self.variant.device)
        dtype = choose_dtype(self.variant.dtype, device)
        pipeline = DiffusionPipeline.from_pretrained(self.weights_source(), dtype=dtype)
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
        self._serve(pipeline)
        derived = {"img2img": self.image_to_image, "inpaint": self.inpainting}
        edits = [name for name, pipe in derived.items() if pipe is not None]
        return (
            f"variant {self.variant.name}: {type(pipeline).__name__} on {device}, "
            f"dtype={str(dtype).removeprefix('torch.')}, attention={attention}, "
            f"compile={self.variant.compile and device == 'cuda'}, edits={'+'.join(edits) or 'none'}"
            + (f", threads={torch.get_num_threads()}" if device == "cpu" else "")
        )

    def lane(self) -> DiffusionFamily:
        """The same modules under pipelines of their own: a pipeline keeps per-call state on itself
        and on its scheduler (timesteps, step index) and tokenizer, so each lane copies those."""
        components = self.pipeline.components.items()
        own = {name: copy.deepcopy(part) for name, part in components if name in PER_CALL}
        pipeline = type(self.pipeline).from_pipe(self.pipeline, **own)
        view = copy.copy(self)
        view._serve(pipeline)
        return view

    def _serve(self, pipeline: Any) -> None:
        """Serve ``pipeline``, and the edits diffusers has for it on the same components."""
        from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting

        def sharing_weights(auto_pipeline: Any) -> Any | None:
            try:
                derived = auto_pipeline.from_pipe(pipeline)
            except ValueError:
                return None
            derived.set_progress_bar_config(disable=True)
            return derived

        pipeline.set_progress_bar_config(disable=True)
        self.pipeline = pipeline
        self.image_to_image = sharing_weights(AutoPipelineForImage2Image)
        self.inpainting = sharing_weights(AutoPipelineForInpainting)

    def generate(self, tasks: Sequence[ImageTask], hooks: DenoisingHooks | None = None) -> list[np.ndarray]:
        first = tasks[0]
        negative = [task.negative_prompt or "" for task in tasks]
        arguments: dict[str, Any] = {
            "prompt": [task.prompt for task in tasks],
            "negative_prompt": negative if any(negative) else None,
            "num_inference_steps": first.steps,
            "guidance_scale": first.guidance_scale,
            "generator": [torch.Generator("cpu").manual_seed(task.seed) for task in tasks],
            "output_type": "np",
            "callback_on_step_end": self._step_callback(tasks, hooks or DenoisingHooks()),
        }
        if first.kind == "generate":
            output = self.pipeline(height=first.height, width=first.width, **arguments)
        else:
            output = self._edit(tasks, arguments)
        images = zip(tasks, output.images, strict=True)
        return [keep_unmasked(task, to_uint8(image)) for task, image in images]

    def _edit(self, tasks: Sequence[ImageTask], arguments: dict[str, Any]) -> Any:
        first = tasks[0]
        pipeline = self.image_to_image if first.mask is None else self.inpainting
        if pipeline is None:
            raise InvalidRequestError(
                f"Model {self.variant.name!r} does not support this kind of edit.", param="model"
            )
        images = [task.image for task in tasks if task.image is not None]
        if first.strength is None or len(images) != len(tasks):
            raise ValueError("edits and variations need an image and a strength")
        arguments["image"] = [Image.fromarray(image) for image in images]
        arguments["strength"] = first.strength
        if first.mask is not None:
            arguments["mask_image"] = [Image.fromarray(task.mask[:, :, 0]) for task in tasks]  # type: ignore[index]
            arguments.update(height=first.height, width=first.width)
        return pipeline(**arguments)

    @staticmethod
    def _step_callback(tasks: Sequence[ImageTask], hooks: DenoisingHooks) -> StepCallback:
        def on_step_end(pipeline: Any, step: int, timestep: Any, outputs: dict[str, Any]) -> dict[str, Any]:
            rows = hooks.after_step(step, pipeline.num_timesteps)
            if rows:
                vae = pipeline.vae
                latents = outputs["latents"][rows].to(vae.dtype) / vae.config.scaling_factor
                decoded = vae.decode(latents, return_dict=False)[0]
                previews = pipeline.image_processor.postprocess(decoded, output_type="np")
                for row, preview in zip(rows, previews, strict=True):
                    hooks.preview(row, keep_unmasked(tasks[row], to_uint8(preview)))
            return outputs

        return on_step_end
