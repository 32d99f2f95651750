"""A tiny Janus checkpoint with random weights, built from config like transformers' own tests."""

from __future__ import annotations

from pathlib import Path

import torch

from training.data import save_tokenizer


def save_tiny_janus(target: Path) -> None:
    """Janus with a 2-layer language model, a 4x4 token grid and an 8x8-pixel VQ decoder."""
    from transformers import GenerationConfig, JanusConfig, JanusForConditionalGeneration, LlamaConfig
    from transformers.models.janus.configuration_janus import JanusVisionConfig, JanusVQVAEConfig

    hidden = 32
    config = JanusConfig(
        text_config=LlamaConfig(
            vocab_size=64, hidden_size=hidden, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128, pad_token_id=0,
        ),
        vision_config=JanusVisionConfig(
            hidden_size=hidden, num_hidden_layers=1, num_attention_heads=4, image_size=16, patch_size=4,
            projection_dim=hidden, num_image_tokens=16, mlp_ratio=2.0,
        ),
        vq_config=JanusVQVAEConfig(
            embed_dim=8, num_embeddings=32, latent_channels=32, base_channels=32, channel_multiplier=[1, 2],
            num_res_blocks=1, projection_dim=hidden, image_token_embed_dim=hidden,
        ),
        image_token_id=60,
    )  # fmt: skip
    torch.manual_seed(0)
    model = JanusForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        do_sample=True, temperature=1.0, top_k=8, pad_token_id=0, generation_kwargs={"boi_token_id": 61}
    )
    model.save_pretrained(str(target))
    save_tokenizer(target)
