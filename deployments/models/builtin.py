"""Embedded models, no network needed: tiny pipelines built from config, and weights trained here.

A builtin model (``builtin:<name>``) is written once in diffusers format under the cache directory
and then loaded with ``from_pretrained`` like any downloaded checkpoint, so the embedded models
exercise the same loading path as production weights. A trained embedded model
(``embedded:<name>``) is a directory committed beside this file (see ``python -m training.digits``),
found through this package wherever it is installed.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

BUILTIN_PREFIX = "builtin:"
EMBEDDED_PREFIX = "embedded:"
EMBEDDED_DIR = Path(__file__).parent / "embedded"
FORMAT_VERSION = 1  # bump when a builder changes, so old caches are rebuilt


def _byte_level_vocab() -> dict[str, int]:
    """CLIP's byte-level alphabet, each symbol also as a word end, plus the special tokens."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    symbols = [chr(b) for b in printable]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            symbols.append(chr(256 + extra))
            extra += 1
    tokens = symbols + [symbol + "</w>" for symbol in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    return {token: index for index, token in enumerate(tokens)}


def _save_tiny_clip_tokenizer(directory: Path) -> int:
    from transformers import CLIPTokenizer

    vocab = _byte_level_vocab()
    # No merges: the tokenizer spells words out byte by byte, which a tiny model needs no more than.
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    tokenizer.save_pretrained(str(directory))
    return len(vocab)


def build_tiny_sd(target: Path) -> None:
    """A Stable-Diffusion-shaped pipeline of about 8 MB with fixed random weights."""
    import torch
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab_size = _save_tiny_clip_tokenizer(target / "tokenizer")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
    )
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
    )
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=vocab_size - 2,
            eos_token_id=vocab_size - 1,
            pad_token_id=vocab_size - 1,
            hidden_size=32,
            intermediate_size=37,
            layer_norm_eps=1e-05,
            num_attention_heads=4,
            num_hidden_layers=5,
            vocab_size=vocab_size,
            max_position_embeddings=77,
        )
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
    )
    pipeline = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=CLIPTokenizer.from_pretrained(str(target / "tokenizer")),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(str(target))  # type: ignore[attr-defined]


BUILDERS: dict[str, Callable[[Path], None]] = {"tiny-sd": build_tiny_sd}


def embedded_weights(name: str) -> str:
    """The directory of a trained embedded model, shipped inside this package."""
    known = sorted(path.name for path in EMBEDDED_DIR.glob("[!.]*") if path.is_dir())
    if name not in known:
        raise ValueError(f"unknown embedded model {name!r}; known: {known}")
    return str(EMBEDDED_DIR / name)


def resolve_weights(weights: str, cache_dir: Path) -> str:
    """The ``from_pretrained`` source for ``weights``, building a builtin model on first use.

    Builds go to a temporary directory that is renamed into place, so concurrent replicas
    never load a half-written model.
    """
    if weights.startswith(EMBEDDED_PREFIX):
        return embedded_weights(weights.removeprefix(EMBEDDED_PREFIX))
    if not weights.startswith(BUILTIN_PREFIX):
        return weights
    name = weights.removeprefix(BUILTIN_PREFIX)
    if name not in BUILDERS:
        raise ValueError(f"unknown builtin model {name!r}; known: {sorted(BUILDERS)}")
    target = cache_dir / f"{name}-v{FORMAT_VERSION}"
    if not (target / "model_index.json").exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=cache_dir))
        try:
            BUILDERS[name](staging)
            try:
                staging.rename(target)
            except OSError:
                if not (target / "model_index.json").exists():
                    raise  # another process won the race only if the target is complete
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return str(target)
