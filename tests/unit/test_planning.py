"""Request validation and planning: everything a client can get wrong, caught before any model."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from deployments.contracts import group_by_bucket
from deployments.preprocess import expand_request, normalize_prompt
from serve_app.config import AppConfig
from serve_app.errors import InvalidRequestError
from serve_app.planning import plan_generation
from serve_app.protocol import ImageGenerationRequest


def plan(config: AppConfig, **fields: object):  # type: ignore[no-untyped-def]
    request = ImageGenerationRequest.model_validate({"prompt": "a cat", **fields})
    variant = config.variant(request.model)
    assert variant is not None
    return plan_generation(request, variant, config.limits, request_id="req-1", tenant="acme")


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
        ({"stream": True}, "stream"),
    ],
)
def test_invalid_for_variant(config: AppConfig, fields: dict[str, object], param: str) -> None:
    with pytest.raises(InvalidRequestError) as raised:
        plan(config, **fields)
    assert raised.value.param == param
    assert raised.value.status_code == 400


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
