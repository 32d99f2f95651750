"""The digits, the prompts that ask for them, and the word-level tokenizer both embedded models read.

``sklearn.datasets.load_digits`` ships 1,797 real 8x8 handwritten digits (ink 0-16) inside the
scikit-learn wheel, so nothing is downloaded. Images are drawn as dark ink on white paper.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
PROMPT_TEMPLATES = (
    "{digit}",
    "{word}",
    "a handwritten {digit}",
    "a handwritten {word}",
    "the digit {word}",
    "the digit {digit}",
    "the number {word}",
    "a {digit}",
    "draw a {digit}",
    "handwritten digit {word}",
    "a picture of the number {digit}",
    "write the digit {word} by hand",
)
EXTRA_WORDS = (
    "an",
    "image",
    "photo",
    "of",
    "please",
    "me",
    "drawing",
    "written",
    "hand",
    "numeral",
    "figure",
)
PAD, UNKNOWN = "[PAD]", "[UNK]"
PROMPT_TOKENS = 8
"""Prompts are padded or cut to this many word tokens."""
INK_LEVELS = 17
"""load_digits' pixels take the values 0-16."""


def load_digit_images() -> tuple[np.ndarray, np.ndarray]:
    """(images float32 (N, 8, 8) with ink in [0, 1], labels int64 (N,))."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return (digits.images / 16.0).astype(np.float32), digits.target.astype(np.int64)


def prompt_for(digit: int, template: int) -> str:
    return PROMPT_TEMPLATES[template].format(digit=digit, word=DIGIT_WORDS[digit])


def random_prompts(labels: np.ndarray, rng: np.random.Generator) -> list[str]:
    templates = rng.integers(0, len(PROMPT_TEMPLATES), size=len(labels))
    return [prompt_for(int(label), int(template)) for label, template in zip(labels, templates, strict=True)]


def ink_to_pixels(ink: np.ndarray) -> np.ndarray:
    """Ink in [0, 1] (..., H, W) -> grey pixels in [0, 1], dark ink on white paper."""
    return 1.0 - ink


def pixels_to_ink(pixels: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) image of any size -> ink 0-16 on the 8x8 grid of load_digits (for classifiers)."""
    from PIL import Image

    grey = Image.fromarray(np.ascontiguousarray(pixels)).convert("L").resize((8, 8), Image.Resampling.BOX)
    return (255.0 - np.asarray(grey, dtype=np.float64)) * 16.0 / 255.0


def save_tokenizer(directory: Path) -> None:
    """A word-level tokenizer: digits one token each, lower case, unknown words as [UNK]."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    words = [PAD, UNKNOWN, *map(str, range(10)), *DIGIT_WORDS]
    for template in PROMPT_TEMPLATES:
        words += [word for word in template.split() if not word.startswith("{") and word not in words]
    words += [word for word in EXTRA_WORDS if word not in words]
    model = WordLevel(vocab={word: index for index, word in enumerate(words)}, unk_token=UNKNOWN)
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)]
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=PAD,
        unk_token=UNKNOWN,
        model_max_length=PROMPT_TOKENS,
        padding_side="right",
    )
    wrapped.save_pretrained(str(directory))
