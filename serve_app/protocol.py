"""The OpenAI Images API as pydantic models, plus our documented extensions.

Requests forbid unknown fields (OpenAI answers them with 400 too); every extension says so in
its description, which is what the OpenAPI page at ``/docs`` shows.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Quality = Literal["auto", "low", "medium", "high", "standard", "hd"]


class OpenAIModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ImageOutputFields(OpenAIModel):
    """The fields generations and edits share: which model, how many images, and how they come back."""

    model: str | None = Field(None, description="A variant id from /v1/models; the default when omitted.")
    n: int = Field(1, ge=1, le=10, description="How many images (1-10).")
    size: str = Field("auto", description="'WxH' from the variant's sizes, or 'auto' for its default.")
    quality: Quality = Field(
        "auto", description="Maps to denoising steps; 'standard'/'hd' alias medium/high."
    )
    response_format: Literal["url", "b64_json"] = Field(
        "b64_json", description="Base64 in the body, or a signed URL that expires."
    )
    output_format: Literal["png", "jpeg", "webp"] = "png"
    output_compression: int | None = Field(None, ge=0, le=100, description="0-100, for jpeg/webp (and png).")
    background: Literal["auto", "opaque", "transparent"] = "auto"
    user: str | None = Field(None, max_length=256, description="End-user id, for abuse monitoring.")
    stream: bool = Field(
        False, description="Stream server-sent events: partial images, then the image (n must be 1)."
    )
    partial_images: int | None = Field(
        None,
        ge=0,
        le=3,
        description="Partial images to stream (0-3), taken from intermediate denoising steps.",
    )
    seed: int | None = Field(
        None, ge=0, le=2**32 - 1, description="Extension: image i uses seed+i; same seed, same bytes."
    )
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


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class ImageGenerationRequest(ImageOutputFields):
    """Body of ``POST /v1/images/generations``."""

    prompt: str = Field(min_length=1, description="What to draw.")
    moderation: Literal["auto", "low"] = "auto"
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


class ImageVariationRequest(OpenAIModel):
    """Text fields of ``POST /v1/images/variations`` (multipart); the file is ``image``."""

    model: str | None = Field(None, description="A variant id from /v1/models; the default when omitted.")
    n: int = Field(1, ge=1, le=10, description="How many images (1-10).")
    size: str = Field("auto", description="'WxH' from the variant's sizes, or 'auto' for its default.")
    response_format: Literal["url", "b64_json"] = Field(
        "b64_json", description="Base64 in the body, or a signed URL that expires."
    )
    user: str | None = Field(None, max_length=256, description="End-user id, for abuse monitoring.")
    seed: int | None = Field(
        None, ge=0, le=2**32 - 1, description="Extension: image i uses seed+i; same seed, same bytes."
    )
    strength: float | None = Field(
        None, gt=0.0, le=1.0, description="Extension: how far a variation strays, 0-1 (default 0.7)."
    )


class ImageData(BaseModel):
    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str | None = None
    seed: int | None = Field(None, description="Extension: the seed this image was made with.")


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    output_format: Literal["png", "jpeg", "webp"] | None = None
    size: str | None = None
    quality: Literal["low", "medium", "high"] | None = None
    background: Literal["opaque", "transparent"] | None = None


class JobResponse(BaseModel):
    """An async job (extension): ``Prefer: respond-async`` answers 202 with one of these."""

    id: str
    object: Literal["image.job"] = "image.job"
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
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


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ImageStreamUsageDetails(BaseModel):
    image_tokens: int
    text_tokens: int


class ImageStreamUsage(BaseModel):
    """OpenAI's token usage, estimated: an image token is an 8x8-pixel latent cell, a text token ~4 bytes."""

    input_tokens: int
    input_tokens_details: ImageStreamUsageDetails
    output_tokens: int
    total_tokens: int


class ImageStreamEventFields(BaseModel):
    b64_json: str
    background: Literal["transparent", "opaque", "auto"]
    created_at: int
    output_format: Literal["png", "jpeg", "webp"]
    quality: Literal["low", "medium", "high", "auto"]
    size: str


class ImagePartialImageEvent(ImageStreamEventFields):
    """``image_generation.partial_image`` / ``image_edit.partial_image``: a preview while denoising."""

    type: Literal["image_generation.partial_image", "image_edit.partial_image"]
    partial_image_index: int


class ImageCompletedEvent(ImageStreamEventFields):
    """``image_generation.completed`` / ``image_edit.completed``: the image, last event of a stream."""

    type: Literal["image_generation.completed", "image_edit.completed"]
    usage: ImageStreamUsage
