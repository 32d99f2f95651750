"""The autoregressive family: a decoder-only transformer writes an image as a grid of tokens.

The prompt is the prefix; image tokens follow, row by row, and are then decoded to pixels. All
images of a pass decode together, one token per forward step, with a KV cache (each step feeds
only the newest token). Sampling follows the checkpoint's ``generation_config.json``
(``temperature``, ``top_k``); with a guidance scale above 1, every image also gets an
unconditional row (its negative prompt, or the empty prompt) in the same batch, and
classifier-free guidance mixes the two rows' logits. Each image samples from its own generator
seeded with its seed, so an image does not depend on what else shares its pass.

Edits and variations keep part of the starting image's tokens and sample the rest: with a mask,
the tokens whose cells are to be repainted; without one, the last ``strength`` share of the
tokens (the model continues the image's first rows). Pixels outside a mask come back unchanged.

After every token the replica's hooks are asked whether anyone still waits (cancellation between
tokens) and which rows want a preview: a preview shows the rows of tokens complete so far.

Two kinds of checkpoint, told apart by their files:

- a token-grid model (``image_tokens.json`` beside a transformers causal LM and its tokenizer,
  like the embedded ``digits-ar`` from ``python -m training.digits``): its vocabulary ends with
  the image tokens, whose codebook holds one ink level each;
- Janus and Janus-Pro (``JanusForConditionalGeneration``, image-generation mode): the language
  model's hidden state goes through the generation head, tokens come back in through the
  generation embeddings, and the VQ decoder turns the grid into pixels.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from deployments.contracts import MASK_EDIT_THRESHOLD, ImageTask
from deployments.images import to_uint8
from deployments.models.cpu_threads import cpu_thread_count
from deployments.models.diffusion import choose_device, choose_dtype, keep_unmasked
from deployments.models.registry import DenoisingHooks, ImageFamily

Cache = Any


class ImageTokenModel:
    """What the decoding loop needs from a checkpoint: prompts in, logits over the codebook out."""

    model: Any
    tokenizer: Any

    rows: int
    columns: int
    temperature: float
    top_k: int | None

    def start(self, prompts: list[str]) -> tuple[torch.Tensor, Cache]:
        """Run the prompts (one row each); the logits for the first image token, and the cache."""
        raise NotImplementedError

    def advance(self, tokens: torch.Tensor, cache: Cache) -> tuple[torch.Tensor, Cache]:
        """Feed one image token per row (``(rows,)`` codebook indices); the next logits and the cache."""
        raise NotImplementedError

    def tokenize(self, images: np.ndarray) -> torch.Tensor:
        """uint8 images ``(batch, H, W, 3)`` -> their codebook indices ``(batch, rows * columns)``."""
        raise NotImplementedError

    def to_pixels(self, tokens: torch.Tensor, complete_rows: int, width: int, height: int) -> np.ndarray:
        """Codebook indices ``(batch, rows * columns)`` -> float pixels ``(batch, height, width, 3)`` in
        [0, 1]; only the first ``complete_rows`` rows of tokens are real (previews)."""
        raise NotImplementedError


class TokenGridModel(ImageTokenModel):
    """A transformers causal LM whose vocabulary ends with image tokens, one ink level each."""

    def __init__(self, source: str, device: str, dtype: torch.dtype) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        layout = json.loads((Path(source) / "image_tokens.json").read_text())
        self.rows, self.columns = layout["grid"]
        self.prompt_tokens = int(layout["prompt_tokens"])
        self.offset = int(layout["image_token_offset"])
        self.begin_image = int(layout["begin_image_token"])
        self.ink = torch.tensor(layout["ink_levels"], dtype=torch.float32)
        self.tokenizer = AutoTokenizer.from_pretrained(source)
        loader: Any = AutoModelForCausalLM  # transformers types from_pretrained's wrapper oddly
        self.model = loader.from_pretrained(source, dtype=dtype)
        self.model.to(device).eval()
        self.device = device
        generation = self.model.generation_config
        self.temperature = float(generation.temperature or 1.0)
        self.top_k = generation.top_k

    def _image_logits(self, outputs: Any) -> torch.Tensor:
        return outputs.logits[:, -1, self.offset : self.offset + len(self.ink)].float()

    def start(self, prompts: list[str]) -> tuple[torch.Tensor, Cache]:
        # Every prompt is padded to the same length, so a row computes the same numbers in any batch.
        ids = self.tokenizer(
            prompts, padding="max_length", max_length=self.prompt_tokens, truncation=True, return_tensors="pt"
        ).input_ids
        ids = torch.cat([ids, torch.full((len(prompts), 1), self.begin_image)], dim=1).to(self.device)
        outputs = self.model(input_ids=ids, use_cache=True)
        return self._image_logits(outputs), outputs.cache

    def advance(self, tokens: torch.Tensor, cache: Cache) -> tuple[torch.Tensor, Cache]:
        outputs = self.model(input_ids=(tokens + self.offset)[:, None], cache=cache, use_cache=True)
        return self._image_logits(outputs), outputs.cache

    def tokenize(self, images: np.ndarray) -> torch.Tensor:
        paper = torch.from_numpy(images).float().mean(dim=3, keepdim=True).permute(0, 3, 1, 2) / 255.0
        ink = 1.0 - F.adaptive_avg_pool2d(paper, (self.rows, self.columns)).flatten(1)
        return (ink[:, :, None] - self.ink).abs().argmin(dim=2)

    def to_pixels(self, tokens: torch.Tensor, complete_rows: int, width: int, height: int) -> np.ndarray:
        ink = self.ink[tokens.cpu()].reshape(-1, 1, self.rows, self.columns)
        ink[:, :, complete_rows:] = 0.0  # rows still to come are blank paper
        paper = F.interpolate(1.0 - ink, size=(height, width), mode="bicubic", align_corners=False)
        return paper.clamp(0, 1).repeat(1, 3, 1, 1).permute(0, 2, 3, 1).numpy()


class JanusModel(ImageTokenModel):
    """Janus / Janus-Pro in image-generation mode, through transformers."""

    def __init__(self, source: str, device: str, dtype: torch.dtype) -> None:
        from transformers import AutoTokenizer, JanusForConditionalGeneration

        loader: Any = JanusForConditionalGeneration  # transformers types from_pretrained's wrapper oddly
        self.model = loader.from_pretrained(source, dtype=dtype)
        self.model.to(device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(source)
        self.device = device
        generation = self.model.generation_config
        self.begin_image = int(generation.generation_kwargs["boi_token_id"])
        self.temperature = float(generation.temperature or 1.0)
        self.top_k = generation.top_k
        vq = self.model.model.vqmodel
        self.rows, self.columns = vq.quantize.quant_state_dims
        self.image_size = self.rows * 2 ** (len(vq.config.channel_multiplier) - 1)

    def start(self, prompts: list[str]) -> tuple[torch.Tensor, Cache]:
        # Janus' chat format; the unconditional prompt is the empty one, as in its own generate().
        texts = [f"<|User|>: {prompt}\n\n<|Assistant|>:" if prompt else "" for prompt in prompts]
        encoded = self.tokenizer(texts, padding="longest", padding_side="left", return_tensors="pt")
        begin = torch.full((len(prompts), 1), self.begin_image)
        ids = torch.cat([encoded.input_ids, begin], dim=1).to(self.device)
        mask = torch.cat([encoded.attention_mask, torch.ones_like(begin)], dim=1).to(self.device)
        embeddings = self.model.get_input_embeddings()(ids)
        outputs = self.model.model.language_model(
            inputs_embeds=embeddings, attention_mask=mask, use_cache=True
        )
        return self._logits(outputs), (outputs.cache, mask)

    def _logits(self, outputs: Any) -> torch.Tensor:
        return self.model.model.generation_head(outputs.last_hidden_state[:, -1, :]).float()

    def advance(self, tokens: torch.Tensor, cache: Cache) -> tuple[torch.Tensor, Cache]:
        past, mask = cache
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        embeddings = self.model.prepare_embeddings_for_image_generation(tokens[:, None].to(self.device))
        outputs = self.model.model.language_model(
            inputs_embeds=embeddings, attention_mask=mask, cache=past, use_cache=True
        )
        return self._logits(outputs), (outputs.cache, mask)

    def tokenize(self, images: np.ndarray) -> torch.Tensor:
        pixels = torch.from_numpy(images).float().permute(0, 3, 1, 2) / 127.5 - 1.0
        pixels = F.interpolate(pixels, size=(self.image_size,) * 2, mode="bicubic", align_corners=False)
        vq = self.model.model.vqmodel
        encoded = vq.encode(pixels.to(self.device, next(vq.parameters()).dtype))
        return encoded.image_tokens.reshape(len(images), -1).cpu()

    def to_pixels(self, tokens: torch.Tensor, complete_rows: int, width: int, height: int) -> np.ndarray:
        decoded = self.model.decode_image_tokens(tokens.to(self.device)).float()  # (B, H, W, 3) in [-1, 1]
        pixels = ((decoded + 1) / 2).clamp(0, 1).permute(0, 3, 1, 2)
        visible = pixels.shape[2] * complete_rows // self.rows
        pixels[:, :, visible:] = 1.0  # rows still to come are white
        resized = F.interpolate(pixels, size=(height, width), mode="bicubic", align_corners=False)
        return resized.clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()


def sample(
    logits: torch.Tensor, temperature: float, top_k: int | None, generators: list[torch.Generator]
) -> torch.Tensor:
    """One codebook index per row, each row drawn with its own generator."""
    scaled = logits / max(temperature, 1e-5)
    if top_k is not None and 0 < top_k < scaled.shape[-1]:
        threshold = torch.topk(scaled, top_k, dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < threshold, float("-inf"))
    probabilities = torch.softmax(scaled, dim=-1).cpu()
    drawn = [
        torch.multinomial(row, 1, generator=generator)
        for row, generator in zip(probabilities, generators, strict=True)
    ]
    return torch.cat(drawn).to(logits.device)


class AutoregressiveFamily(ImageFamily):
    """Image-token transformers: a token-grid checkpoint (``image_tokens.json``) or Janus(-Pro)."""

    model: ImageTokenModel

    def load(self) -> str:
        device = choose_device(self.variant.device)
        dtype = choose_dtype(self.variant.dtype, device)
        source = self.weights_source()
        if device == "cpu" and self.variant.cpu_threads is not None:
            torch.set_num_threads(cpu_thread_count(self.variant.cpu_threads))
        token_grid = (Path(source) / "image_tokens.json").is_file()
        self.model = (TokenGridModel if token_grid else JanusModel)(source, device, dtype)
        return (
            f"variant {self.variant.name}: {type(self.model).__name__} on {device}, "
            f"dtype={str(dtype).removeprefix('torch.')}, grid={self.model.rows}x{self.model.columns}, "
            f"temperature={self.model.temperature}, top_k={self.model.top_k}"
            + (f", threads={torch.get_num_threads()}" if device == "cpu" else "")
        )

    def lane(self) -> AutoregressiveFamily:
        """The same model with a tokenizer of its own (a fast tokenizer is not safe across threads)."""
        model = copy.copy(self.model)
        model.tokenizer = copy.deepcopy(self.model.tokenizer)
        view = copy.copy(self)
        view.model = model
        return view

    def kept_tokens(self, tasks: Sequence[ImageTask]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """For edits: the starting images' tokens, and where they are kept (True) rather than sampled."""
        first, model = tasks[0], self.model
        if first.kind == "generate":
            return None
        images = [task.image for task in tasks if task.image is not None]
        if first.strength is None or len(images) != len(tasks):
            raise ValueError("edits and variations need an image and a strength")
        tokens = model.tokenize(np.stack(images))
        total = model.rows * model.columns
        if first.mask is None:
            keep = torch.arange(total) < round(total * (1.0 - first.strength))
            return tokens, keep.expand(len(tasks), total)
        masks = [task.mask for task in tasks if task.mask is not None]
        if len(masks) != len(tasks):
            raise ValueError("an inpainting pass needs a mask for every task")
        masks_nchw = torch.from_numpy(np.stack(masks)).float().permute(0, 3, 1, 2)
        repaint = (
            F.adaptive_max_pool2d(masks_nchw, (model.rows, model.columns)).flatten(1) >= MASK_EDIT_THRESHOLD
        )
        return tokens, ~repaint

    @torch.inference_mode()
    def generate(self, tasks: Sequence[ImageTask], hooks: DenoisingHooks | None = None) -> list[np.ndarray]:
        hooks = hooks or DenoisingHooks()
        kept = self.kept_tokens(tasks)
        model, first = self.model, tasks[0]
        count, guidance = len(tasks), first.guidance_scale
        guided = guidance > 1.0
        prompts = [task.prompt for task in tasks]
        if guided:
            prompts += [task.negative_prompt or "" for task in tasks]
        generators = [torch.Generator().manual_seed(task.seed) for task in tasks]
        total = model.rows * model.columns
        tokens = torch.zeros((count, total), dtype=torch.long)
        logits, cache = model.start(prompts)
        for step in range(total):
            if guided:
                logits = logits[count:] + guidance * (logits[:count] - logits[count:])
            chosen = sample(logits, model.temperature, model.top_k, generators)
            if kept is not None:
                chosen = torch.where(kept[1][:, step], kept[0][:, step], chosen.cpu()).to(chosen.device)
            tokens[:, step] = chosen.cpu()
            for row in hooks.after_step(step, total):
                preview = model.to_pixels(
                    tokens[row : row + 1], (step + 1) // model.columns, first.width, first.height
                )
                hooks.preview(row, to_uint8(preview[0]))
            if step + 1 < total:
                logits, cache = model.advance(torch.cat([chosen, chosen]) if guided else chosen, cache)
        images = model.to_pixels(tokens, model.rows, first.width, first.height)
        return [keep_unmasked(task, to_uint8(image)) for task, image in zip(tasks, images, strict=True)]
