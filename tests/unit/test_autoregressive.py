"""The autoregressive family on the committed digits-ar weights, run alone (no Ray): seeds, batches,
token-by-token cancellation, row-by-row previews, edits; and Janus from a tiny random config."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from deployments.contracts import ImageTask
from deployments.models.autoregressive import AutoregressiveFamily
from deployments.models.registry import DenoisingHooks, PassCancelled, load_family
from tests.conftest import load_variant

WHITE = 255


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> AutoregressiveFamily:
    loaded, description = load_family(load_variant("digits-ar"), tmp_path_factory.mktemp("cache"))
    assert "TokenGridModel" in description and "grid=8x8" in description
    assert isinstance(loaded, AutoregressiveFamily)
    return loaded


def task(
    prompt: str = "a handwritten 7", seed: int = 1, index: int = 0, size: int = 64, **fields: object
) -> ImageTask:
    return ImageTask(
        request_id="r", index=index, tenant="t", variant="digits-ar", kind="generate", prompt=prompt,
        negative_prompt=None, width=size, height=size, steps=1, guidance_scale=2.0, seed=seed, **fields,
    )  # fmt: skip


class Recording(DenoisingHooks):
    """Asks for previews after ``preview_at`` and cancels the pass after ``cancel_after`` tokens."""

    def __init__(self, preview_at: set[int] = frozenset(), cancel_after: int | None = None) -> None:  # type: ignore[assignment]
        self.preview_at = preview_at
        self.cancel_after = cancel_after
        self.steps: list[tuple[int, int]] = []
        self.previews: list[tuple[int, np.ndarray]] = []

    def after_step(self, step: int, total_steps: int) -> list[int]:
        self.steps.append((step, total_steps))
        if self.cancel_after is not None and len(self.steps) >= self.cancel_after:
            raise PassCancelled
        return [0] if step in self.preview_at else []

    def preview(self, row: int, pixels: np.ndarray) -> None:
        self.previews.append((row, pixels))


def test_images_have_the_requested_size(family: AutoregressiveFamily) -> None:
    images = family.generate([task(size=128), task(size=128, index=1)])
    assert [(image.shape, image.dtype) for image in images] == [((128, 128, 3), np.uint8)] * 2
    assert all(image.flags.c_contiguous for image in images)


def test_same_seed_same_image_and_a_batch_equals_single_runs(family: AutoregressiveFamily) -> None:
    batch = family.generate([task("3", seed=5), task("the digit eight", seed=6, index=1)])
    assert np.array_equal(batch[0], family.generate([task("3", seed=5)])[0])
    assert np.array_equal(batch[1], family.generate([task("the digit eight", seed=6)])[0])
    assert not np.array_equal(batch[0], family.generate([task("3", seed=7)])[0])


def test_a_cancelled_pass_stops_between_tokens(family: AutoregressiveFamily) -> None:
    hooks = Recording(cancel_after=10)
    with pytest.raises(PassCancelled):
        family.generate([task()], hooks)
    assert hooks.steps == [(step, 64) for step in range(10)]  # one call per token, none after the cancel


def test_previews_show_the_rows_of_tokens_complete_so_far(family: AutoregressiveFamily) -> None:
    hooks = Recording(preview_at={15, 39})
    image = family.generate([task()], hooks)[0]
    assert [row for row, _ in hooks.previews] == [0, 0]
    two_rows, five_rows = (pixels for _, pixels in hooks.previews)
    # 8 pixels per token row; bicubic upscaling reaches two token rows across the edge.
    assert (two_rows[32:] == WHITE).all() and (five_rows[56:] == WHITE).all()
    assert not (two_rows[:16] == WHITE).all()
    assert np.array_equal(five_rows[:24], image[:24])  # complete rows are already final


def test_edits_keep_what_they_do_not_repaint(family: AutoregressiveFamily) -> None:
    start = family.generate([task("0", seed=3)])[0]
    mask = np.zeros((64, 64, 1), dtype=np.uint8)
    mask[32:] = 255  # repaint the bottom half
    inpainted = family.generate([replace(task(), kind="edit", image=start, mask=mask, strength=1.0)])[0]
    assert np.array_equal(inpainted[:32], start[:32])
    assert not np.array_equal(inpainted[32:], start[32:])
    continued = family.generate([replace(task("0", seed=4), kind="variation", image=start, strength=0.5)])[0]
    # The first half of the tokens are read back from the image: the same ink, give or take a level.
    assert np.abs(continued[:24].astype(int) - start[:24]).mean() < 16
    assert not np.array_equal(continued, start)


def test_janus_generates_and_decodes_from_a_tiny_random_config(tmp_path: Path) -> None:
    from tests.janus import save_tiny_janus

    save_tiny_janus(tmp_path / "janus")
    variant = load_variant("digits-ar").model_copy(
        update={"name": "janus", "weights": str(tmp_path / "janus")}
    )
    janus, description = load_family(variant, tmp_path / "cache")
    assert "JanusModel" in description and "grid=4x4" in description
    tasks = [replace(task(seed=seed, index=seed, size=32), variant="janus") for seed in (1, 2)]
    hooks = Recording(preview_at={7})
    images = janus.generate(tasks, hooks)
    assert [image.shape for image in images] == [(32, 32, 3)] * 2
    assert len(hooks.steps) == 16 and len(hooks.previews) == 1
    assert np.array_equal(images[1], janus.generate(tasks[1:])[0])
