"""Composition of the service: ``build_app(config)`` returns the Serve application.

``serve run serve_app.app:app`` and a Serve config's ``import_path: serve_app.app:app`` build it
from the configuration named by ``IMAGEGEN_CONFIG`` (see serve_app/config.py).
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application, Deployment

from deployments.model_replica import ModelReplica
from deployments.postprocess import Postprocess
from deployments.preprocess import Preprocess
from serve_app.config import AppConfig, ResourcesConfig, load_config
from serve_app.ingress import Ingress
from serve_app.pipeline import StageHandles
from serve_app.scheduler import Scheduler


def _deployment_options(resources: ResourcesConfig) -> dict[str, Any]:
    return {
        "num_replicas": resources.num_replicas,
        "max_ongoing_requests": resources.max_ongoing_requests,
        "max_queued_requests": resources.max_queued_requests,
        "health_check_period_s": resources.health_check_period_s,
        "health_check_timeout_s": resources.health_check_timeout_s,
        "ray_actor_options": resources.ray_actor_options(),
    }


def _deployment(decorated: object) -> Deployment:
    """A ``@serve.deployment`` class as the Deployment it is at run time (mypy sees the class)."""
    assert isinstance(decorated, Deployment)
    return decorated


def build_app(config: AppConfig) -> Application:
    """Bind ingress, scheduler, preprocess, one ModelReplica per variant, and postprocess."""
    config = config.with_secrets()
    stages = config.stages
    models = {
        variant.name: _deployment(ModelReplica)
        .options(
            name=f"ModelReplica-{variant.name}",
            user_config=variant.batching.model_dump(),
            **_deployment_options(variant.resources),
        )
        .bind(variant, config.cache_dir)
        for variant in config.variants
    }
    preprocess = (
        _deployment(Preprocess)
        .options(**_deployment_options(stages.preprocess))
        .bind(config.limits, config.storage, config.moderation)
    )
    postprocess = (  # streams from the models for stream=true requests
        _deployment(Postprocess)
        .options(**_deployment_options(stages.postprocess))
        .bind(config.storage, models, config.moderation)
    )
    # One scheduler replica: it is the single owner of queue order and job state.
    scheduler_options = {**_deployment_options(config.scheduler.resources), "num_replicas": 1}
    scheduler = (
        _deployment(Scheduler).options(**scheduler_options).bind(config, preprocess, postprocess, models)
    )
    # Bound applications now; Serve hands the deployments handles in their place at run time.
    stage_handles = StageHandles(preprocess, postprocess, models)  # type: ignore[arg-type]
    ingress = _deployment(Ingress).options(**_deployment_options(stages.ingress))
    return ingress.bind(config, stage_handles, scheduler)


def __getattr__(name: str) -> Application:
    # Built lazily so importing this module reads no configuration.
    if name == "app":
        return build_app(load_config())
    raise AttributeError(name)
