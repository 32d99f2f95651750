"""Turning a parsed API request into an `ImageRequest` for one variant: pure, fast, testable.

Everything a client can get wrong about a variant is caught here, in the ingress, so bad input
never reaches a model.
"""

from __future__ import annotations

import dataclasses
import secrets
from dataclasses import dataclass
from typing import cast

from deployments.config import LimitsConfig, VariantConfig, parse_size
from deployments.contracts import EncodeOptions, ImageRequest, OutputFormat, TaskKind
from deployments.errors import InvalidRequestError
from serve_app.protocol import (
    ImageEditRequest,
    ImageGenerationRequest,
    ImageOutputFields,
    ImageVariationRequest,
    ResolvedQuality,
)

QUALITY_ALIASES: dict[str, ResolvedQuality] = {"auto": "medium", "standard": "medium", "hd": "high"}
ENCODED_FORMATS: tuple[OutputFormat, ...] = ("png", "jpeg", "webp")
UNSUPPORTED_FIELDS = {
    "complexity": "its computation is set by `quality` (denoising steps)",
    "frame_count": "it makes still images, not GIF animations",
    "frame_duration_ms": "it makes still images, not GIF animations",
    "svg": "it makes raster images, not SVG",
}
"""Fields of the OpenAI SDK's request types that no variant honours, and why (named in the 400)."""
MAX_SEED = 2**32 - 1
EDIT_STRENGTH = 0.8
"""How much an edit changes by default (diffusers' image-to-image default)."""
VARIATION_STRENGTH = 0.7
"""How far a variation strays from its image by default."""


@dataclass(frozen=True)
class PlanTarget:
    """Where a request will run and for whom: its variant and limits, ids, and moderation checks."""

    variant: VariantConfig
    limits: LimitsConfig
    request_id: str
    tenant: str
    moderation_checks: tuple[str, ...] = ()
    alias: str | None = None
    """The alias the request's ``model`` named, when it named one (``variant`` is its choice)."""


def resolve_quality(quality: str) -> ResolvedQuality:
    return QUALITY_ALIASES.get(quality) or cast(ResolvedQuality, quality)


def resolve_steps(quality: str, variant: VariantConfig) -> int:
    """The variant's denoising steps for ``quality``; a 400 naming ``quality`` where it offers none."""
    offered = variant.steps.offered()
    resolved = resolve_quality(quality)
    if resolved not in offered:
        raise InvalidRequestError(
            f"Model {variant.name!r} does not offer quality {quality!r}. Supported: "
            f"{', '.join(offered)} or 'auto'.",
            param="quality",
            code="unsupported_value",
        )
    return offered[resolved]


def check_supported_fields(request: ImageOutputFields, variant: VariantConfig) -> None:
    """A 400 naming the first field the SDK may send that ``variant`` cannot honour."""
    for name, reason in UNSUPPORTED_FIELDS.items():
        if getattr(request, name) is not None:
            raise InvalidRequestError(
                f"{name} is not supported by model {variant.name!r}: {reason}. Omit {name}.",
                param=name,
                code="unsupported_parameter",
            )
    if request.output_format not in ENCODED_FORMATS:
        raise InvalidRequestError(
            f"output_format {request.output_format!r} is not supported by model {variant.name!r}; "
            f"use {', '.join(ENCODED_FORMATS)}.",
            param="output_format",
            code="unsupported_value",
        )


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
    request: ImageGenerationRequest, target: PlanTarget
) -> tuple[ImageRequest, EncodeOptions]:
    """Validate ``request`` against the variant and fill every default; raises InvalidRequestError."""
    check_prompt(request.prompt, target.limits)
    return plan_images(request, target, "generate", prompt=request.prompt)


def plan_edit(
    request: ImageEditRequest,
    images: list[bytes],
    mask: bytes | None,
    target: PlanTarget,
    markup: bytes | None = None,
) -> tuple[ImageRequest, EncodeOptions]:
    """Validate an edit: 1 to ``max_input_images`` images, an optional mask, and the output fields."""
    variant, limits = target.variant, target.limits
    check_prompt(request.prompt, limits)
    if markup is not None:
        raise InvalidRequestError(
            f"markup is not supported by model {variant.name!r}; send a mask to mark the area to edit.",
            param="markup",
            code="unsupported_parameter",
        )
    if not images:
        raise InvalidRequestError(
            "An image to edit is required: send it as the file field 'image' (or 'image[]').",
            param="image",
            code="missing_image",
        )
    if len(images) > limits.max_input_images:
        raise InvalidRequestError(
            f"Too many images: {len(images)}, at most {limits.max_input_images}.",
            param="image",
            code="too_many_images",
        )
    image_request, options = plan_images(request, target, "edit", prompt=request.prompt)
    strength = check_strength(request.strength, EDIT_STRENGTH, image_request.steps)
    image_request = dataclasses.replace(image_request, strength=strength, images=tuple(images), mask=mask)
    return image_request, options


def plan_variation(
    request: ImageVariationRequest, images: list[bytes], target: PlanTarget
) -> tuple[ImageRequest, EncodeOptions]:
    """Validate a variation: exactly one image, PNG out, the variant's medium steps."""
    if len(images) != 1:
        raise InvalidRequestError(
            f"A variation takes exactly one file field 'image', got {len(images)}.",
            param="image",
            code="missing_image" if not images else "too_many_images",
        )
    output_fields = ImageOutputFields.model_validate(request.model_dump(exclude={"strength"}))
    image_request, options = plan_images(output_fields, target, "variation", prompt="")
    strength = check_strength(request.strength, VARIATION_STRENGTH, image_request.steps)
    return dataclasses.replace(image_request, strength=strength, images=tuple(images)), options


def check_prompt(prompt: str, limits: LimitsConfig) -> None:
    if len(prompt) > limits.max_prompt_chars:
        raise InvalidRequestError(
            f"Prompt is too long: {len(prompt)} characters, at most {limits.max_prompt_chars}.",
            param="prompt",
            code="string_above_max_length",
        )
    if not prompt.strip():
        raise InvalidRequestError("Prompt must not be empty.", param="prompt", code="empty_prompt")


def check_strength(strength: float | None, default: float, steps: int) -> float:
    """The strength to use; at least one denoising step must be left (steps x strength >= 1)."""
    chosen = default if strength is None else strength
    if int(steps * chosen) < 1:
        raise InvalidRequestError(
            f"strength {chosen} leaves no denoising step out of {steps}: raise strength to at least "
            f"{1 / steps:.2f} or send more num_inference_steps.",
            param="strength",
        )
    return chosen


def check_streaming(request: ImageOutputFields) -> None:
    if not request.stream:
        return
    if request.n != 1:
        raise InvalidRequestError(
            "stream=true makes one image per request; send n=1 (or several requests).", param="n"
        )
    if request.response_format != "b64_json":
        raise InvalidRequestError(
            "Streamed images come as b64_json; send response_format='b64_json' with stream=true.",
            param="response_format",
        )


def plan_images(
    request: ImageOutputFields, target: PlanTarget, kind: TaskKind, *, prompt: str
) -> tuple[ImageRequest, EncodeOptions]:
    """The checks and defaults generations, edits and variations share."""
    variant, limits = target.variant, target.limits
    if request.n > limits.max_images_per_request:
        raise InvalidRequestError(
            f"n must be at most {limits.max_images_per_request}.", param="n", code="invalid_value"
        )
    check_supported_fields(request, variant)
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
    check_streaming(request)
    if request.negative_prompt is not None and len(request.negative_prompt) > limits.max_prompt_chars:
        raise InvalidRequestError(
            f"negative_prompt is too long: {len(request.negative_prompt)} characters, "
            f"at most {limits.max_prompt_chars}.",
            param="negative_prompt",
            code="string_above_max_length",
        )
    if request.num_inference_steps is not None and request.num_inference_steps > variant.max_steps:
        raise InvalidRequestError(
            f"num_inference_steps must be at most {variant.max_steps} for model {variant.name!r}.",
            param="num_inference_steps",
        )
    width, height = resolve_size(request.size, variant)
    quality_steps = resolve_steps(request.quality, variant)  # checked even when num_inference_steps wins
    steps = request.num_inference_steps or quality_steps
    seed = request.seed if request.seed is not None else secrets.randbelow(MAX_SEED - 10)
    if seed + request.n - 1 > MAX_SEED:
        raise InvalidRequestError(f"seed + n - 1 must be at most {MAX_SEED}.", param="seed")
    image_request = ImageRequest(
        request_id=target.request_id,
        tenant=target.tenant,
        variant=variant.name,
        kind=kind,
        prompt=prompt,
        negative_prompt=request.negative_prompt,
        n=request.n,
        width=width,
        height=height,
        steps=steps,
        guidance_scale=(
            request.guidance_scale if request.guidance_scale is not None else variant.guidance_scale
        ),
        seed=seed,
        partial_images=(request.partial_images or 0) if request.stream else 0,
        safety_identifier=request.end_user,
        moderation=request.moderation,
        moderation_checks=target.moderation_checks,
        alias=target.alias,
    )
    options = EncodeOptions(
        output_format=cast(OutputFormat, request.output_format),  # gif and svg are refused above
        compression=request.output_compression,
        response_format=request.response_format,
        background=request.background,
    )
    return image_request, options
