"""The OpenAI Images API as pydantic models, plus our documented extensions.

Requests forbid unknown fields (OpenAI answers them with 400 too); every extension says so in
its description, which is what the OpenAPI page at ``/docs`` shows.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from deployments.contracts import ModerationLevel

Quality = Literal["auto", "low", "medium", "high", "xhigh", "max", "standard", "hd"]
ResolvedQuality = Literal["low", "medium", "high", "xhigh", "max"]
"""A quality as responses report it: ``auto``/``standard`` resolve to medium, ``hd`` to high."""
RequestedFormat = Literal["png", "jpeg", "webp", "gif", "svg"]
"""Every ``output_format`` the SDK sends; planning refuses the ones no variant encodes (gif, svg)."""
NOT_SUPPORTED = "Accepted by the SDK, refused here with a 400 naming this field: no variant supports it."
JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
"""A job's state; the last three are final."""


class OpenAIModel(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        """The SDKs type every optional field as nullable: a JSON null means "the default"."""
        if isinstance(data, dict):
            fields = cls.model_fields
            return {key: value for key, value in data.items() if value is not None or key not in fields}
        return data


class ImageFields(OpenAIModel):
    """The fields every image request takes, variations included: which model, how many images,
    what size, how they come back, for whom, and the seed."""

    model: str | None = Field(None, description="A variant id from /v1/models; the default when omitted.")
    n: int = Field(1, ge=1, le=10, description="How many images (1-10).")
    size: str = Field("auto", description="'WxH' from the variant's sizes, or 'auto' for its default.")
    response_format: Literal["url", "b64_json"] = Field(
        "b64_json", description="Base64 in the body, or a signed URL that expires."
    )
    user: str | None = Field(None, max_length=256, description="Deprecated end-user id: `safety_identifier`.")
    seed: int | None = Field(
        None, ge=0, le=2**32 - 1, description="Extension: image i uses seed+i; same seed, same bytes."
    )


class ImageOutputFields(ImageFields):
    """The fields generations and edits share beyond those: quality, format, streaming, extensions."""

    quality: Quality = Field(
        "auto",
        description="Maps to the variant's denoising steps: low, medium, high, and xhigh/max where the "
        "variant offers them; 'auto'/'standard' mean medium, 'hd' means high.",
    )
    output_format: RequestedFormat = Field("png", description="png, jpeg or webp (gif and svg are refused).")
    output_compression: int | None = Field(None, ge=0, le=100, description="0-100, for jpeg/webp (and png).")
    background: Literal["auto", "opaque", "transparent"] = Field(
        "auto", description="'transparent' only on variants that make alpha, with png or webp."
    )
    moderation: ModerationLevel = Field(
        "auto",
        description="'low' relaxes the moderation checks the operator lets it relax; the others apply "
        "in full. (An extension on edits.)",
    )
    safety_identifier: str | None = Field(
        None,
        max_length=256,
        description="A stable id of your end user (hash it); takes precedence over `user`. Logged, echoed "
        "in the response, and a rate-limit key where the tier sets one.",
    )
    stream: bool = Field(
        False, description="Stream server-sent events: partial images, then the image (n must be 1)."
    )
    partial_images: int | None = Field(
        None,
        ge=0,
        le=3,
        description="Partial images to stream (0-3), taken from intermediate denoising steps.",
    )
    complexity: Literal["low", "medium", "high"] | None = Field(None, description=NOT_SUPPORTED)
    frame_count: int | None = Field(None, description=NOT_SUPPORTED + " (GIF output)")
    frame_duration_ms: int | None = Field(None, description=NOT_SUPPORTED + " (GIF output)")
    svg: dict[str, Any] | None = Field(None, description=NOT_SUPPORTED + " (SVG output)")
    negative_prompt: str | None = Field(None, description="Extension: what to steer away from.")
    num_inference_steps: int | None = Field(
        None, ge=1, description="Extension: denoising steps; overrides `quality`."
    )
    guidance_scale: float | None = Field(
        None, ge=0.0, le=50.0, description="Extension: classifier-free guidance scale."
    )
    webhook_url: str | None = Field(
        None,
        max_length=2048,
        description="Extension, async jobs only: called with a signed POST when the job ends.",
    )

    @property
    def end_user(self) -> str | None:
        """The effective safety identifier: a non-empty ``safety_identifier``, else ``user``."""
        return self.safety_identifier or self.user or None


class ModerationDetails(BaseModel):
    """Where a ``moderation_blocked`` request was stopped and why, as OpenAI reports it."""

    moderation_stage: Literal["input", "output"]
    categories: list[str]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None
    moderation_details: ModerationDetails | None = Field(
        None, exclude_if=lambda details: details is None, description="Only on moderation_blocked."
    )


class ErrorResponse(BaseModel):
    error: ErrorInfo


class ImageGenerationRequest(ImageOutputFields):
    """Body of ``POST /v1/images/generations``."""

    prompt: str = Field(min_length=1, description="What to draw.")
    style: Literal["vivid", "natural"] | None = Field(None, description="Accepted for compatibility; unused.")


class ImageEditRequest(ImageOutputFields):
    """Text fields of ``POST /v1/images/edits`` (multipart); files: ``image`` or ``image[]``, ``mask``."""

    prompt: str = Field(min_length=1, description="What the edited image should show.")
    input_fidelity: Literal["high", "low"] | None = Field(
        None, description="Accepted for compatibility; `strength` sets how much of the image is kept."
    )
    strength: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description="Extension: how much to change, 0-1 (default 0.8); runs steps x strength steps.",
    )


class ImageVariationRequest(ImageFields):
    """Text fields of ``POST /v1/images/variations`` (multipart); the file is ``image``."""

    strength: float | None = Field(
        None, gt=0.0, le=1.0, description="Extension: how far a variation strays, 0-1 (default 0.7)."
    )


class ImageData(BaseModel):
    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str | None = None
    seed: int | None = Field(None, description="Extension: the seed this image was made with.")


class ImageUsageDetails(BaseModel):
    image_tokens: int
    text_tokens: int


class ImageUsage(BaseModel):
    """OpenAI's token usage, estimated: an image token is an 8x8-pixel latent cell, a text token ~4 bytes."""

    input_tokens: int
    input_tokens_details: ImageUsageDetails
    output_tokens: int
    output_tokens_details: ImageUsageDetails
    total_tokens: int = Field(description="input_tokens + output_tokens.")


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    output_format: Literal["png", "jpeg", "webp"] | None = None
    size: str | None = None
    quality: ResolvedQuality | None = None
    background: Literal["opaque", "transparent"] | None = None
    usage: ImageUsage | None = None
    safety_identifier: str | None = Field(None, description="The effective end-user id, when one was sent.")
    variant: str | None = Field(None, description="The variant that made the images (extension).")
    alias: str | None = Field(
        None, description="The alias the request named, when its `model` was one (extension)."
    )


class JobResponse(BaseModel):
    """An async job (extension): ``Prefer: respond-async`` answers 202 with one of these."""

    id: str
    object: Literal["image.job"] = "image.job"
    status: JobStatus
    created_at: int
    completed_at: float | None = Field(None, description="When it ended (UNIX seconds), once ended.")
    queue_position: int | None = Field(None, description="Jobs ahead of this one in its model's queue.")
    eta_seconds: float | None = Field(None, description="Predicted wait before it starts.")
    result: ImagesResponse | None = Field(None, description="The OpenAI response, once succeeded.")
    error: ErrorInfo | None = Field(None, description="Why it failed, once failed.")


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "imagegen-serve"
    family: str | None = Field(None, description="A variant's model family (extension).")
    variants: dict[str, float] | None = Field(
        None, description="An alias's variants and their weights; requests split by them (extension)."
    )


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ImageStreamEventFields(BaseModel):
    b64_json: str
    background: Literal["transparent", "opaque", "auto"]
    created_at: int
    output_format: Literal["png", "jpeg", "webp"]
    quality: ResolvedQuality
    size: str


class ImagePartialImageEvent(ImageStreamEventFields):
    """``image_generation.partial_image`` / ``image_edit.partial_image``: a preview while denoising."""

    type: Literal["image_generation.partial_image", "image_edit.partial_image"]
    partial_image_index: int


class ImageCompletedEvent(ImageStreamEventFields):
    """``image_generation.completed`` / ``image_edit.completed``: the image, last event of a stream."""

    type: Literal["image_generation.completed", "image_edit.completed"]
    usage: ImageUsage
    safety_identifier: str | None = Field(None, exclude_if=lambda value: value is None)
