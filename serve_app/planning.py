"""Turning a parsed API request into an `ImageRequest` for one variant: pure, fast, testable.

Everything a client can get wrong about a variant is caught here, in the ingress, so bad input
never reaches a model.
"""

from __future__ import annotations

import secrets

from deployments.contracts import EncodeOptions, ImageRequest
from serve_app.config import LimitsConfig, VariantConfig, parse_size
from serve_app.errors import InvalidRequestError
from serve_app.protocol import ImageGenerationRequest

QUALITY_ALIASES = {"auto": "medium", "standard": "medium", "hd": "high"}
MAX_SEED = 2**32 - 1


def resolve_quality(quality: str) -> str:
    return QUALITY_ALIASES.get(quality, quality)


def resolve_size(size: str, variant: VariantConfig) -> tuple[int, int]:
    if size == "auto":
        return parse_size(variant.default_size)
    if size not in variant.sizes:
        raise InvalidRequestError(
            f"Invalid size {size!r} for model {variant.name!r}. Supported sizes: {', '.join(variant.sizes)}"
            " or 'auto'.",
            param="size",
            code="invalid_size",
        )
    return parse_size(size)


def plan_generation(
    request: ImageGenerationRequest,
    variant: VariantConfig,
    limits: LimitsConfig,
    *,
    request_id: str,
    tenant: str,
) -> tuple[ImageRequest, EncodeOptions]:
    """Validate ``request`` against ``variant`` and fill every default; raises InvalidRequestError."""
    if len(request.prompt) > limits.max_prompt_chars:
        raise InvalidRequestError(
            f"Prompt is too long: {len(request.prompt)} characters, at most {limits.max_prompt_chars}.",
            param="prompt",
            code="string_above_max_length",
        )
    if not request.prompt.strip():
        raise InvalidRequestError("Prompt must not be empty.", param="prompt", code="empty_prompt")
    if request.n > limits.max_images_per_request:
        raise InvalidRequestError(
            f"n must be at most {limits.max_images_per_request}.", param="n", code="invalid_value"
        )
    if request.background == "transparent" and not variant.supports_transparency:
        raise InvalidRequestError(
            f"Model {variant.name!r} does not support transparent backgrounds; use 'opaque' or 'auto'.",
            param="background",
            code="unsupported_value",
        )
    if request.background == "transparent" and request.output_format == "jpeg":
        raise InvalidRequestError(
            "A transparent background needs output_format 'png' or 'webp'.", param="output_format"
        )
    if request.stream:
        raise InvalidRequestError(
            "Streaming is not supported by this server yet; send stream=false.", param="stream"
        )
    if request.num_inference_steps is not None and request.num_inference_steps > variant.max_steps:
        raise InvalidRequestError(
            f"num_inference_steps must be at most {variant.max_steps} for model {variant.name!r}.",
            param="num_inference_steps",
        )
    width, height = resolve_size(request.size, variant)
    quality = resolve_quality(request.quality)
    steps = request.num_inference_steps or getattr(variant.steps, quality)
    seed = request.seed if request.seed is not None else secrets.randbelow(MAX_SEED - 10)
    if seed + request.n - 1 > MAX_SEED:
        raise InvalidRequestError(f"seed + n - 1 must be at most {MAX_SEED}.", param="seed")
    image_request = ImageRequest(
        request_id=request_id,
        tenant=tenant,
        variant=variant.name,
        kind="generate",
        prompt=request.prompt,
        negative_prompt=request.negative_prompt,
        n=request.n,
        width=width,
        height=height,
        steps=steps,
        guidance_scale=(
            request.guidance_scale if request.guidance_scale is not None else variant.guidance_scale
        ),
        seed=seed,
    )
    options = EncodeOptions(
        output_format=request.output_format,
        compression=request.output_compression,
        response_format=request.response_format,
    )
    return image_request, options
