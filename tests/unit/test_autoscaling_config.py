"""Autoscaling blocks in the YAML: strict validation, and what they become in Serve's options."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError
from ray.serve.config import AutoscalingConfig, AutoscalingPolicy

from autoscaling.policy import BacklogPolicy
from deployments.config import ModelAutoscalingConfig, VariantConfig
from serve_app.app import _deployment_options, application_autoscaling_policy
from serve_app.config import AppConfig, StageAutoscalingConfig
from serve_app.scheduler import autoscaled_variants

VARIANT: dict[str, Any] = {
    "name": "v",
    "family": "diffusion",
    "weights": "builtin:tiny-sd",
    "sizes": ["64x64"],
}


@pytest.mark.parametrize(
    ("block", "message"),
    [
        ({"min_replicas": 3, "max_replicas": 2}, "min_replicas must not exceed"),
        ({"min_replicas": 0}, "cold"),
        ({"cold": True}, "cold"),  # cold needs min_replicas: 0
        ({"initial_replicas": 9, "max_replicas": 4}, "initial_replicas"),
        ({"target_images_per_replica": 0}, "greater than 0"),
        ({"max_replica": 4}, "Extra inputs"),
    ],
)
def test_bad_model_autoscaling_blocks_fail_at_load(block: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        VariantConfig(**VARIANT, autoscaling=block)


def test_autoscaling_and_a_fixed_replica_count_exclude_each_other() -> None:
    with pytest.raises(ValidationError, match="exclude each other"):
        VariantConfig(**VARIANT, resources={"num_replicas": 2}, autoscaling={})
    with pytest.raises(ValidationError, match="exclude each other"):
        AppConfig(
            variants=[VARIANT],
            stages={"preprocess": {"num_replicas": 2, "autoscaling": {"replicas_per_model_replica": 1}}},
        )


@pytest.mark.parametrize(
    "block", [{}, {"replicas_per_model_replica": 1, "target_ongoing_requests": 10}, {"min_replicas": 0}]
)
def test_a_stage_needs_exactly_one_signal_and_never_goes_to_zero(block: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        StageAutoscalingConfig(**block)


def test_blocks_become_serve_autoscaling_configs_and_one_application_policy() -> None:
    config = AppConfig(
        variants=[{**VARIANT, "autoscaling": {"cold": True, "min_replicas": 0, "max_replicas": 3}}],
        stages={"preprocess": {"autoscaling": {"replicas_per_model_replica": 0.5}}},
    )
    variant = config.variants[0]
    assert variant.autoscaling == ModelAutoscalingConfig(cold=True, min_replicas=0, max_replicas=3)
    options = _deployment_options(variant.resources, variant.autoscaling)
    assert "num_replicas" not in options
    serve_config = AutoscalingConfig(**options["autoscaling_config"])  # Serve accepts it
    assert (serve_config.min_replicas, serve_config.max_replicas) == (0, 3)
    assert serve_config.upscale_delay_s == serve_config.downscale_delay_s == 0  # the policy's job

    policy = application_autoscaling_policy(config)
    assert policy is not None
    AutoscalingPolicy(**policy)  # the import path resolves and the kwargs are JSON
    built = BacklogPolicy(**policy["policy_kwargs"])
    assert built.models["ModelReplica-v"].variant == "v"
    assert built.models["ModelReplica-v"].delays.downscale_delay_s == 60.0
    assert built.stages["Preprocess"].replicas_per_model_replica == 0.5
    assert set(built.stages) == {"Preprocess"}


def test_without_autoscaling_blocks_replicas_stay_fixed() -> None:
    config = AppConfig(variants=[VARIANT])
    assert application_autoscaling_policy(config) is None
    assert _deployment_options(config.variants[0].resources)["num_replicas"] == 1


def test_only_autoscaled_variants_have_their_slots_follow_serve() -> None:
    fixed = VariantConfig(**VARIANT)
    scaled = VariantConfig(**{**VARIANT, "name": "w"}, autoscaling={"max_replicas": 4})
    assert autoscaled_variants(AppConfig(variants=[fixed], default_model="v")) == []
    config = AppConfig(variants=[fixed, scaled], default_model="v")
    assert [variant.name for variant in autoscaled_variants(config)] == ["w"]
