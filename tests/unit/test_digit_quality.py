"""The committed digit models draw what they are asked: an independent classifier reads their digits.

Fixed prompts and seeds, the committed weights, nothing trained here. The floor (70% on 30 images)
sits well under what `imagegen eval` measures, so only a real regression fails it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from benchmarks.quality import digit_reader, draws_digits, evaluate, prompt_set, read_digits
from deployments.models.registry import load_family
from tests.conftest import load_variant
from training.data import ink_to_pixels, load_digit_images

FLOOR = 0.7


@pytest.fixture(scope="module")
def reader() -> Any:
    return digit_reader()


def test_the_reader_reads_real_digits_drawn_as_the_models_draw_them(reader: Any) -> None:
    ink, labels = load_digit_images()
    paper = (ink_to_pixels(ink[::9]) * 255).round().astype(np.uint8)
    images = [
        np.repeat(np.kron(page, np.ones((8, 8), dtype=np.uint8))[:, :, None], 3, axis=2) for page in paper
    ]
    assert np.mean(read_digits(reader, images) == labels[::9]) > 0.97


@pytest.mark.parametrize("name", ["digits", "digits-ar"])
def test_committed_model_draws_the_prompted_digit(reader: Any, tmp_path: Path, name: str) -> None:
    family, _ = load_family(load_variant(name), tmp_path)
    assert draws_digits(family)
    row = evaluate(family, prompt_set(per_digit=3, seed=1), family.variant.steps.medium, reader, scored=True)
    assert row.images == 30 and row.confusion is not None and row.confusion.sum() == 30
    assert row.correct_share is not None and row.correct_share >= FLOOR, row.confusion


def test_a_model_not_trained_on_digits_is_not_scored(tmp_path: Path) -> None:
    family, _ = load_family(load_variant("tiny-sd"), tmp_path)
    assert not draws_digits(family)
