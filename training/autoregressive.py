"""A decoder-only transformer that writes a digit as 64 ink tokens, one per pixel, after its prompt.

The digits' own 17 ink levels (0-16) are the codebook, so tokens decode to pixels exactly. A
sequence is the prompt's word tokens (padded to a fixed length, so a batch of k runs the same
numbers as k single runs), a begin-image token, then the 8x8 grid row by row. It is a
``LlamaForCausalLM`` whose vocabulary is the tokenizer's words followed by the ink tokens; the
loss counts image tokens only. A tenth of the prompts are dropped to padding, for guidance.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from training.data import INK_LEVELS, PROMPT_TOKENS, load_digit_images, random_prompts, save_tokenizer

GRID = 8


@dataclass(frozen=True)
class AutoregressiveSchedule:
    steps: int = 1000
    batch_size: int = 32
    learning_rate: float = 3e-3
    prompt_dropout: float = 0.1
    temperature: float = 1.0
    top_k: int = 8


def train_autoregressive(target: Path, seed: int, schedule: AutoregressiveSchedule) -> dict[str, Any]:
    """Train on every digit and write the model, tokenizer and codebook to ``target``."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    ink, labels = load_digit_images()
    save_tokenizer(target)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(target))
    offset = len(tokenizer)
    begin_image = offset + INK_LEVELS
    image_tokens = (
        torch.from_numpy(np.rint(ink * (INK_LEVELS - 1)).astype(np.int64).reshape(len(ink), -1)) + offset
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=begin_image + 1,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=PROMPT_TOKENS + 1 + GRID * GRID,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=begin_image,
            eos_token_id=begin_image,
            tie_word_embeddings=False,
        )
    )
    generator = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=schedule.learning_rate, weight_decay=0.01)
    lr_schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, schedule.learning_rate, schedule.steps)
    model.train()
    loss = torch.zeros(())
    for _ in (bar := tqdm(range(schedule.steps), desc="transformer", unit="step")):
        rows = torch.randint(0, len(ink), (schedule.batch_size,), generator=generator)
        prompts = random_prompts(labels[rows.numpy()], rng)
        prompts = ["" if rng.random() < schedule.prompt_dropout else prompt for prompt in prompts]
        prompt_ids = tokenizer(prompts, padding="max_length", truncation=True, return_tensors="pt").input_ids
        begin = torch.full((schedule.batch_size, 1), begin_image)
        sequence = torch.cat([prompt_ids, begin, image_tokens[rows]], dim=1)
        targets = sequence.clone()
        targets[:, : PROMPT_TOKENS + 1] = -100
        loss = model(input_ids=sequence, labels=targets).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        lr_schedule.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    model.eval()
    model.generation_config = GenerationConfig(
        do_sample=True,
        temperature=schedule.temperature,
        top_k=schedule.top_k,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(str(target))
    codebook = {
        "grid": [GRID, GRID],
        "prompt_tokens": PROMPT_TOKENS,
        "image_token_offset": offset,
        "begin_image_token": begin_image,
        "ink_levels": [level / (INK_LEVELS - 1) for level in range(INK_LEVELS)],
    }
    (target / "image_tokens.json").write_text(json.dumps(codebook, indent=2) + "\n")
    return {"loss": float(loss.item())}
