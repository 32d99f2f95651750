"""A text-conditioned latent diffusion model for the digits, saved as a Stable Diffusion pipeline.

Three parts, trained in two phases, then written with ``save_pretrained``:

1. An ``AutoencoderKL`` that maps a 64x64 image to an 8x8x4 latent (the digits' own grid) and back.
2. A ``UNet2DConditionModel`` that denoises those latents, cross-attending to
3. a two-layer ``CLIPTextModel`` over the word-level tokenizer's tokens (trained with the UNet).

A tenth of the prompts are dropped to "" so classifier-free guidance works. The denoiser predicts
v (velocity), not the noise: under the cosine schedule the noise prediction at the noisiest steps
turns into a huge clean-image estimate that few-step samplers amplify (the first digits model drew
pure noise with DPM-Solver++), while v's estimate stays bounded. The sampler saved with the pipeline
is DPM-Solver++ with the same betas and prediction type, from the noisiest step ("trailing"), which
draws a clean digit in a few steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from training.data import PROMPT_TOKENS, ink_to_pixels, load_digit_images, random_prompts, save_tokenizer

IMAGE_SIZE = 64
NOISE_SCHEDULE: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",
    "prediction_type": "v_prediction",
}
"""What the denoiser is trained under; the saved sampler is built from the same settings."""


@dataclass(frozen=True)
class DiffusionSchedule:
    autoencoder_steps: int = 120
    autoencoder_batch_size: int = 16
    denoiser_steps: int = 4000
    batch_size: int = 64
    learning_rate: float = 2e-3
    prompt_dropout: float = 0.1
    ema_decay: float = 0.998


def render(ink: np.ndarray) -> torch.Tensor:
    """Ink (N, 8, 8) in [0, 1] -> (N, 3, 64, 64) images in [-1, 1], smoothly upscaled, grey."""
    pixels = torch.from_numpy(ink_to_pixels(ink))[:, None]
    upscaled = F.interpolate(pixels, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bicubic", align_corners=False)
    return (upscaled.clamp(0, 1) * 2 - 1).repeat(1, 3, 1, 1)


def build_models(vocab_size: int) -> tuple[Any, Any, Any]:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    autoencoder = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=IMAGE_SIZE,
        mid_block_add_attention=False,
    )
    denoiser = UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=PROMPT_TOKENS,
            pad_token_id=0,
            bos_token_id=0,
            eos_token_id=0,
        )
    )
    return autoencoder, denoiser, text_encoder


def train_autoencoder(
    autoencoder: Any, images: torch.Tensor, schedule: DiffusionSchedule, seed: int
) -> float:
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(autoencoder.parameters(), lr=schedule.learning_rate)
    lr_schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, schedule.learning_rate, schedule.autoencoder_steps
    )
    autoencoder.train()
    loss = torch.zeros(())
    for _ in (bar := tqdm(range(schedule.autoencoder_steps), desc="autoencoder", unit="step")):
        batch = images[torch.randint(0, len(images), (schedule.autoencoder_batch_size,), generator=generator)]
        posterior = autoencoder.encode(batch).latent_dist
        latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        reconstruction = autoencoder.decode(latents).sample
        loss = F.mse_loss(reconstruction, batch) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        lr_schedule.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    autoencoder.eval()
    return float(loss.item())


def train_denoiser(
    denoiser: Any,
    text_encoder: Any,
    tokenizer: Any,
    latents: torch.Tensor,
    labels: np.ndarray,
    schedule: DiffusionSchedule,
    seed: int,
) -> float:
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel

    noise_schedule: Any = DDPMScheduler(**NOISE_SCHEDULE)
    generator = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    parameters = [*denoiser.parameters(), *text_encoder.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=schedule.learning_rate, weight_decay=0.01)
    lr_schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, schedule.learning_rate, schedule.denoiser_steps
    )
    ema = EMAModel(parameters, decay=schedule.ema_decay)
    denoiser.train()
    text_encoder.train()
    loss = torch.zeros(())
    for _ in (bar := tqdm(range(schedule.denoiser_steps), desc="denoiser", unit="step")):
        rows = torch.randint(0, len(latents), (schedule.batch_size,), generator=generator)
        prompts = random_prompts(labels[rows.numpy()], rng)
        prompts = ["" if rng.random() < schedule.prompt_dropout else prompt for prompt in prompts]
        ids = tokenizer(prompts, padding="max_length", truncation=True, return_tensors="pt").input_ids
        clean = latents[rows]
        noise = torch.randn(clean.shape, generator=generator)
        timesteps = torch.randint(0, 1000, (schedule.batch_size,), generator=generator)
        noisy = noise_schedule.add_noise(clean, noise, timesteps)
        predicted = denoiser(noisy, timesteps, encoder_hidden_states=text_encoder(ids)[0]).sample
        loss = F.mse_loss(predicted, noise_schedule.get_velocity(clean, noise, timesteps))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        lr_schedule.step()
        ema.step(parameters)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    ema.copy_to(parameters)
    denoiser.eval()
    text_encoder.eval()
    return float(loss.item())


def train_diffusion(target: Path, seed: int, schedule: DiffusionSchedule) -> dict[str, Any]:
    """Train on every digit and write a StableDiffusionPipeline to ``target``; returns what it measured."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline
    from transformers import PreTrainedTokenizerFast

    ink, labels = load_digit_images()
    images = render(ink)
    save_tokenizer(target / "tokenizer")
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(target / "tokenizer"))
    torch.manual_seed(seed)
    autoencoder, denoiser, text_encoder = build_models(len(tokenizer))
    autoencoder_loss = train_autoencoder(autoencoder, images, schedule, seed)
    with torch.no_grad():
        latents = torch.cat([autoencoder.encode(chunk).latent_dist.mean for chunk in images.split(256)])
    scaling_factor = float(1.0 / latents.std())
    autoencoder.register_to_config(scaling_factor=scaling_factor)
    denoiser_loss = train_denoiser(
        denoiser, text_encoder, tokenizer, latents * scaling_factor, labels, schedule, seed
    )
    sampler = DPMSolverMultistepScheduler(
        **NOISE_SCHEDULE, algorithm_type="dpmsolver++", timestep_spacing="trailing"
    )
    pipeline = StableDiffusionPipeline(
        vae=autoencoder,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=denoiser,
        scheduler=sampler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(str(target))  # type: ignore[attr-defined]
    return {
        "autoencoder_loss": autoencoder_loss,
        "denoiser_loss": denoiser_loss,
        "scaling_factor": scaling_factor,
    }
