"""The contract every model family and every shipped variant file keeps, run over all of them.

A new family (a line in ``FAMILIES``) or a new variant file in ``serve_app/configs/variants`` is
covered without touching this file, as long as its weights ship locally. A variant whose weights
come from a hub needs a tiny stand-in checkpoint of the same layout in ``STAND_INS`` (nothing can be
downloaded here); ``test_every_variant_and_family_is_covered`` fails until it has one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import yaml
from pydantic import ValidationError

from deployments.config import VariantConfig
from deployments.contracts import ImageTask
from deployments.models.builtin import BUILTIN_PREFIX, EMBEDDED_PREFIX
from deployments.models.cpu_threads import set_pass_threads
from deployments.models.registry import FAMILIES, ImageFamily, family_class, generation_tasks, load_family
from serve_app.config import CONFIG_DIR
from tests.janus import save_tiny_janus

VARIANT_FILES = sorted(CONFIG_DIR.glob("variants/*.yaml"))
STAND_INS: dict[str, Callable[[Path], None]] = {"janus-pro-1b": save_tiny_janus}
"""Variant name -> a builder of a tiny checkpoint with the layout of its hub weights."""
BATCH = 3
BATCH_ROUNDING_LEVELS = 1
"""A batched forward pass may sum in another order: float32's last bits can move a pixel across a
rounding boundary (1 pixel in 12,288 here), never further."""
STAND_IN_SIZE = 32  # the tiny Janus decodes a 4x4 token grid to 8x8 pixels: keep its pixels few


def read_variant(path: Path) -> VariantConfig:
    return VariantConfig(**yaml.safe_load(path.read_text()))


def ships_weights(variant: VariantConfig) -> bool:
    return variant.weights.startswith((EMBEDDED_PREFIX, BUILTIN_PREFIX))


def test_every_variant_and_family_is_covered() -> None:
    variants = [read_variant(path) for path in VARIANT_FILES]
    assert variants, "no variant files found"
    no_weights = [v.name for v in variants if not ships_weights(v) and v.name not in STAND_INS]
    assert not no_weights, f"variants with hub weights and no tiny stand-in in STAND_INS: {no_weights}"
    families = {variant.family for variant in variants}
    assert set(FAMILIES) <= families, f"families with no variant file: {sorted(set(FAMILIES) - families)}"


@pytest.fixture(scope="module")
def load_variant_family(tmp_path_factory: pytest.TempPathFactory) -> Callable[[Path], ImageFamily]:
    """Each variant file's family, loaded once (a stand-in's weights where the real ones are remote)."""
    loaded: dict[str, ImageFamily] = {}
    cache_dir = tmp_path_factory.mktemp("cache")

    def load(path: Path) -> ImageFamily:
        variant = read_variant(path)
        if variant.name not in loaded:
            if not ships_weights(variant):
                target = tmp_path_factory.mktemp(variant.name)
                STAND_INS[variant.name](target)
                size = f"{STAND_IN_SIZE}x{STAND_IN_SIZE}"
                update = {"weights": str(target), "device": "cpu", "dtype": "float32", "sizes": [size]}
                variant = variant.model_copy(update=update)
            loaded[variant.name] = load_family(variant, cache_dir)[0]
        return loaded[variant.name]

    return load


def make_task(family: ImageFamily, seed: int, prompt: str = "a handwritten 3", **extra: object) -> ImageTask:
    variant = family.variant
    (task,) = generation_tasks(variant, [(prompt, seed)], "contract", steps=variant.steps.low)
    return dataclasses.replace(task, index=seed, **extra)  # type: ignore[arg-type]


def assert_images(images: list[np.ndarray], tasks: list[ImageTask]) -> None:
    assert len(images) == len(tasks)
    for image, task in zip(images, tasks, strict=True):
        assert image.dtype == np.uint8 and image.flags["C_CONTIGUOUS"]
        assert image.shape == (task.height, task.width, 3)


@pytest.fixture(params=VARIANT_FILES, ids=[path.stem for path in VARIANT_FILES])
def family(request: pytest.FixtureRequest, load_variant_family: Callable[[Path], ImageFamily]) -> ImageFamily:
    return load_variant_family(request.param)


def test_output_shapes_and_same_seed_same_image(family: ImageFamily) -> None:
    tasks = [make_task(family, seed=11)]
    first = family.generate(tasks)
    assert_images(first, tasks)
    again = family.generate([dataclasses.replace(tasks[0], request_id="other", index=4)])
    assert np.array_equal(first[0], again[0])
    other = family.generate([make_task(family, seed=12)])
    assert not np.array_equal(first[0], other[0])


def test_batch_of_k_equals_k_single_runs(family: ImageFamily) -> None:
    prompts = ["a handwritten 3", "the digit seven", "0"]
    tasks = [make_task(family, seed=20 + k, prompt=prompts[k]) for k in range(BATCH)]
    batch = family.generate(tasks)
    assert_images(batch, tasks)
    for task, image in zip(tasks, batch, strict=True):
        alone = family.generate([task])[0]
        difference = np.abs(image.astype(np.int16) - alone.astype(np.int16))
        assert difference.max() <= BATCH_ROUNDING_LEVELS, f"seed {task.seed}"


@pytest.mark.usefixtures("torch_threads_restored")
def test_a_lane_runs_passes_beside_its_family_and_gives_the_same_images(family: ImageFamily) -> None:
    """``concurrent_passes``: a lane shares the weights but no per-call state, so passes on the
    family and on its lane, overlapping on two threads, give what each gives one at a time."""
    views = (family, family.lane())
    tasks = [[make_task(family, seed=41 + k, prompt=f"lane {k}")] for k in range(len(views))]

    def passes(view: ImageFamily, view_tasks: list[ImageTask], count: int) -> list[np.ndarray]:
        set_pass_threads(1)  # one thread per lane, as the replica runs them side by side
        return [view.generate(view_tasks)[0] for _ in range(count)]

    with ThreadPoolExecutor(len(views)) as pool:
        pairs = list(zip(views, tasks, strict=True))
        one_at_a_time = [pool.submit(passes, *pair, 1).result()[0] for pair in pairs]
        side_by_side = [pool.submit(passes, *pair, 3) for pair in pairs]
        overlapping = [future.result() for future in side_by_side]
    for expected, images in zip(one_at_a_time, overlapping, strict=True):
        assert all(np.array_equal(expected, image) for image in images)


def test_edits_keep_the_contract_where_supported(family: ImageFamily) -> None:
    start = family.generate([make_task(family, seed=31)])[0]
    steps = family.variant.steps.low
    edit = make_task(family, seed=32, kind="edit", image=start, strength=0.5, steps=steps)
    try:
        edited = family.generate([edit])
    except Exception as unsupported:  # a family says so with a clear error, before any work
        assert "does not support" in str(unsupported)
        return
    assert_images(edited, [edit])
    assert np.array_equal(edited[0], family.generate([dataclasses.replace(edit, index=9)])[0])
    mask = np.zeros((edit.height, edit.width, 1), dtype=np.uint8)
    mask[edit.height // 2 :] = 255
    inpaint = dataclasses.replace(edit, mask=mask)
    try:
        inpainted = family.generate([inpaint])[0]
    except Exception as unsupported:
        assert "does not support" in str(unsupported)
        return
    keep = mask[:, :, 0] < 128
    assert np.array_equal(inpainted[keep], start[keep])  # outside the mask: byte for byte


@pytest.mark.parametrize("path", VARIANT_FILES, ids=[path.stem for path in VARIANT_FILES])
def test_variant_file_is_strict(path: Path) -> None:
    data = yaml.safe_load(path.read_text())
    family_class(read_variant(path).family)  # the family it names exists
    broken: list[dict[str, object]] = [
        {**data, "batchng": {"max_batch_size": 4}},  # a typo
        {**data, "sizes": ["65x64"]},
        {**data, "max_steps": 0},
        {key: value for key, value in data.items() if key != "family"},
        {**data, "batching": {"max_batch_size": 0}},
    ]
    for bad in broken:
        with pytest.raises(ValidationError):
            VariantConfig(**bad)
    with pytest.raises(ValueError, match="unknown model family"):
        family_class(f"{data['family']}-typo")
