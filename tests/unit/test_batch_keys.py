"""Offline batch: object keys name everything that decides an image, so a rerun knows what is done."""

from __future__ import annotations

import numpy as np
import pytest

from deployments.errors import InvalidRequestError
from serve_app.batch import batch_settings, seed_from_prompt, with_keys
from tests.conftest import load_variant


def test_keys_change_with_whatever_changes_the_pixels() -> None:
    digits = batch_settings(load_variant("digits"), None, "low")
    key = digits.object_key("a 7", 3)
    assert key == digits.object_key("a 7", 3) and key.startswith("batch/digits/") and key.endswith(".png")
    others = {
        digits.object_key("a 8", 3),
        digits.object_key("a 7", 4),
        batch_settings(load_variant("digits"), None, "high").object_key("a 7", 3),
        batch_settings(load_variant("digits-ar"), None, "low").object_key("a 7", 3),
    }
    assert key not in others and len(others) == 4


def test_done_prompts_are_dropped_and_missing_seeds_come_from_the_text() -> None:
    settings = batch_settings(load_variant("digits"), None, "low")
    done = frozenset({settings.object_key("b", seed_from_prompt("b"))})
    batch = with_keys({"prompt": np.asarray(["a", "b", "c"], dtype=object)}, settings, done)
    assert list(batch["prompt"]) == ["a", "c"]
    assert list(batch["seed"]) == [seed_from_prompt("a"), seed_from_prompt("c")]
    assert list(batch["object_key"]) == [settings.object_key(p, seed_from_prompt(p)) for p in "ac"]
    seeded = with_keys({"prompt": np.asarray(["a"], dtype=object), "seed": np.asarray([9])}, settings, done)
    assert list(seeded["seed"]) == [9]


def test_settings_refuse_what_the_variant_does_not_offer() -> None:
    with pytest.raises(ValueError, match="128x128"):
        batch_settings(load_variant("digits"), "128x128", "low")
    with pytest.raises(InvalidRequestError, match="xhigh"):
        batch_settings(load_variant("digits"), None, "xhigh")
