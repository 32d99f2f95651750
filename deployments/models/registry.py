"""Model families: the hook class every family implements, and how a variant finds its family.

Quick start for a new family (one file, one line here)::

    # deployments/models/my_family.py
    class MyFamily(ImageFamily):
        def load(self) -> str:
            self.net = build_or_load(self.weights_source())    # weights, once per replica
            return "device=cpu dtype=float32"                   # said once in the log
        def generate(self, tasks, hooks):                       # tasks share one ShapeBucket
            for step in range(steps):
                ...                                             # one denoising step
                for row in hooks.after_step(step, steps):       # may raise PassCancelled
                    hooks.preview(row, uint8_hwc_preview(row))  # streaming previews
            return [uint8_hwc_array_for(task) for task in tasks]

    # below: FAMILIES["my-family"] = "deployments.models.my_family:MyFamily"

A variant YAML then says ``family: my-family``. A family may also be named by its import path
(``family: my_package.module:MyFamily``) without touching this file.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from deployments.config import VariantConfig, parse_size
from deployments.contracts import ImageTask
from deployments.models.builtin import resolve_weights

FAMILIES: dict[str, str] = {
    "diffusion": "deployments.models.diffusion:DiffusionFamily",
    "autoregressive": "deployments.models.autoregressive:AutoregressiveFamily",
}


def generation_tasks(
    variant: VariantConfig,
    prompts_and_seeds: Sequence[tuple[str, int]],
    request_id: str,
    size: str | None = None,
    steps: int | None = None,
) -> list[ImageTask]:
    """Plain generations for a family called directly (start-up calibration, the benchmarks' bare
    pipeline and quality runs): one task per (prompt, seed), at the variant's default size and
    quality ``medium`` unless given."""
    width, height = parse_size(size or variant.default_size)
    return [
        ImageTask(
            request_id=request_id,
            index=index,
            tenant="local",
            variant=variant.name,
            kind="generate",
            prompt=prompt,
            negative_prompt=None,
            width=width,
            height=height,
            steps=steps or variant.steps.medium,
            guidance_scale=variant.guidance_scale,
            seed=seed,
        )
        for index, (prompt, seed) in enumerate(prompts_and_seeds)
    ]


class PassCancelled(Exception):
    """Raised between denoising steps when no task of the forward pass is wanted any more."""


class DenoisingHooks:
    """What a family calls between denoising steps; the model replica implements it.

    This base asks for nothing, so a family can be run alone (``family.generate(tasks)``).
    A family that never calls the hooks still works: it sends no previews and is cancelled
    only between forward passes.
    """

    def after_step(self, step: int, total_steps: int) -> list[int]:
        """Called after step ``step`` (0-based) of ``total_steps``: the rows that want a preview now.

        Raises PassCancelled when every task of the pass has been cancelled.
        """
        return []

    def preview(self, row: int, pixels: np.ndarray) -> None:
        """Hand over row ``row``'s preview: uint8 (H, W, 3), the current latents decoded."""


class ImageFamily:
    """A model family: loads a variant's weights once and turns batches of image tasks into pixels."""

    def __init__(self, variant: VariantConfig, cache_dir: Path) -> None:
        self.variant = variant
        self.cache_dir = cache_dir

    def weights_source(self) -> str:
        """What to hand to ``from_pretrained``: a local path or a hub id (builtins built on first use)."""
        return resolve_weights(self.variant.weights, self.cache_dir)

    def load(self) -> str:
        """Load the weights; return one line saying the device, dtype and attention backend chosen."""
        raise NotImplementedError

    def generate(self, tasks: Sequence[ImageTask], hooks: DenoisingHooks | None = None) -> list[np.ndarray]:
        """One contiguous uint8 (H, W, 3) array per task; every task shares one shape bucket.

        Edits and variations carry ``task.image`` (and for inpainting ``task.mask``) and ``strength``.
        """
        raise NotImplementedError

    def lane(self) -> ImageFamily:
        """Another view of this loaded family whose passes may run at the same time as this one's,
        on another thread (``concurrent_passes`` above 1): the same weights, so no more memory, but
        its own copy of whatever a pass changes as it runs (a diffusers scheduler's step count, a
        tokenizer's padding settings). A family without it serves one pass at a time."""
        raise NotImplementedError(
            f"the {type(self).__name__} family runs one forward pass at a time: "
            f"variant {self.variant.name!r} needs concurrent_passes: 1"
        )


def family_class(name: str) -> type[ImageFamily]:
    target = FAMILIES.get(name, name)
    if ":" not in target:
        raise ValueError(f"unknown model family {name!r}; known: {sorted(FAMILIES)} or 'module:Class'")
    module_name, class_name = target.split(":", 1)
    family = getattr(importlib.import_module(module_name), class_name)
    if not (isinstance(family, type) and issubclass(family, ImageFamily)):
        raise TypeError(f"{target} is not an ImageFamily subclass")
    return family


def load_family(variant: VariantConfig, cache_dir: Path) -> tuple[ImageFamily, str]:
    """Instantiate and load a variant's family; returns it with its one-line description."""
    family = family_class(variant.family)(variant, cache_dir)
    return family, family.load()
