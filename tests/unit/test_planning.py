"""Request validation and planning: everything a client can get wrong, caught before any model."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from deployments.contracts import group_by_bucket
from deployments.errors import InvalidRequestError
from deployments.preprocess import expand_request, normalize_prompt
from serve_app.config import AppConfig
from serve_app.errors import http_status
from serve_app.planning import (
    EDIT_STRENGTH,
    VARIATION_STRENGTH,
    PlanTarget,
    plan_edit,
    plan_generation,
    plan_variation,
)
from serve_app.protocol import ImageEditRequest, ImageGenerationRequest, ImageVariationRequest


def plan(config: AppConfig, **fields: object):  # type: ignore[no-untyped-def]
    request = ImageGenerationRequest.model_validate({"prompt": "a cat", **fields})
    variant = config.variant(request.model)
    assert variant is not None
    return plan_generation(request, PlanTarget(variant, config.limits, request_id="req-1", tenant="acme"))


def test_defaults_come_from_the_variant(config: AppConfig) -> None:
    image_request, options = plan(config)
    variant = config.variants[0]
    assert (image_request.width, image_request.height) == (64, 64)
    assert image_request.steps == variant.steps.medium
    assert image_request.guidance_scale == variant.guidance_scale
    assert image_request.tenant == "acme"
    assert options.response_format == "b64_json" and options.output_format == "png"


@pytest.mark.parametrize(("quality", "level"), [("low", "low"), ("hd", "high"), ("auto", "medium")])
def test_quality_maps_to_steps(config: AppConfig, quality: str, level: str) -> None:
    image_request, _ = plan(config, quality=quality)
    assert image_request.steps == getattr(config.variants[0].steps, level)


def test_explicit_extensions_win(config: AppConfig) -> None:
    image_request, _ = plan(
        config, num_inference_steps=3, guidance_scale=1.5, seed=9, size="128x128", negative_prompt="fog"
    )
    assert (image_request.steps, image_request.guidance_scale, image_request.seed) == (3, 1.5, 9)
    assert (image_request.width, image_request.negative_prompt) == (128, "fog")


def test_random_seed_when_none_given(config: AppConfig) -> None:
    seeds = {plan(config)[0].seed for _ in range(5)}
    assert len(seeds) > 1


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"size": "256x256"}, "size"),
        ({"size": "big"}, "size"),
        ({"background": "transparent"}, "background"),
        ({"num_inference_steps": 51}, "num_inference_steps"),
        ({"prompt": " \n "}, "prompt"),
        ({"prompt": "x" * 32001}, "prompt"),
        ({"seed": 2**32 - 1, "n": 2}, "seed"),
        ({"stream": True, "n": 2}, "n"),
        ({"stream": True, "response_format": "url"}, "response_format"),
    ],
)
def test_invalid_for_variant(config: AppConfig, fields: dict[str, object], param: str) -> None:
    with pytest.raises(InvalidRequestError) as raised:
        plan(config, **fields)
    assert raised.value.param == param
    assert http_status(raised.value) == 400


@pytest.mark.parametrize(
    "fields",
    [{"n": 0}, {"n": 11}, {"quality": "ultra"}, {"output_compression": -1}, {"seed": -5}, {"extra": 1}],
)
def test_protocol_rejects(fields: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        ImageGenerationRequest.model_validate({"prompt": "x", **fields})


def test_expand_gives_consecutive_seeds_and_one_bucket(config: AppConfig) -> None:
    image_request, _ = plan(config, n=4, seed=100, prompt="  a\x00 cat  ")
    tasks = expand_request(image_request)
    assert [task.seed for task in tasks] == [100, 101, 102, 103]
    assert [task.index for task in tasks] == [0, 1, 2, 3]
    assert all(task.prompt == "a cat" for task in tasks)
    assert len(group_by_bucket(tasks)) == 1


def test_normalize_prompt() -> None:
    assert normalize_prompt("  e\u0301clair\x07\n ") == "\u00e9clair"
    assert normalize_prompt("tab\tand\nnewline") == "tab\tand\nnewline"


def test_buckets_split_on_every_shape_field(config: AppConfig) -> None:
    base, _ = plan(config, seed=1)
    variants = [
        base,
        plan(config, seed=1, size="128x128")[0],
        plan(config, seed=1, num_inference_steps=2)[0],
        plan(config, seed=1, guidance_scale=1.0)[0],
    ]
    tasks = [task for request in variants for task in expand_request(request)]
    groups = group_by_bucket(tasks + expand_request(base))
    assert list(groups.values()) == [[0, 4], [1], [2], [3]]


def test_partial_images_count_only_when_streaming(config: AppConfig) -> None:
    assert plan(config, stream=True, partial_images=2)[0].partial_images == 2
    assert plan(config, partial_images=2)[0].partial_images == 0


def plan_an_edit(config: AppConfig, images: list[bytes], mask: bytes | None = None, **fields: object):  # type: ignore[no-untyped-def]
    request = ImageEditRequest.model_validate({"prompt": "make it blue", **fields})
    target = PlanTarget(config.variants[0], config.limits, request_id="req-1", tenant="acme")
    return plan_edit(request, images, mask, target)


def test_edit_carries_uploads_and_default_strength(config: AppConfig) -> None:
    image_request, _ = plan_an_edit(config, [b"one", b"two"], b"mask", stream=True, partial_images=1)
    assert image_request.kind == "edit"
    assert (image_request.images, image_request.mask) == ((b"one", b"two"), b"mask")
    assert image_request.strength == EDIT_STRENGTH and image_request.partial_images == 1


@pytest.mark.parametrize(
    ("images", "fields", "param"),
    [
        ([], {}, "image"),
        ([b"x"] * 17, {}, "image"),
        ([b"x"], {"strength": 0.1, "quality": "low"}, "strength"),  # 2 steps x 0.1 leaves none
        ([b"x"], {"prompt": " "}, "prompt"),
        ([b"x"], {"size": "256x256"}, "size"),
    ],
)
def test_invalid_edits(config: AppConfig, images: list[bytes], fields: dict[str, object], param: str) -> None:
    with pytest.raises(InvalidRequestError) as raised:
        plan_an_edit(config, images, **fields)
    assert raised.value.param == param


def test_variation_has_no_prompt_and_needs_one_image(config: AppConfig) -> None:
    request = ImageVariationRequest(n=2, seed=5)
    target = PlanTarget(config.variants[0], config.limits, request_id="r", tenant="t")
    image_request, options = plan_variation(request, [b"x"], target)
    assert (image_request.kind, image_request.prompt) == ("variation", "")
    assert (image_request.n, image_request.seed) == (2, 5)
    assert image_request.strength == VARIATION_STRENGTH and options.output_format == "png"
    for images in ([], [b"x", b"y"]):
        with pytest.raises(InvalidRequestError) as raised:
            plan_variation(request, images, target)
        assert raised.value.param == "image"
