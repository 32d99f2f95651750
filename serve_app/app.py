"""Composition of the service: ``build_app(config)`` returns the Serve application.

``serve run serve_app.app:app`` builds it from the configuration named by ``IMAGEGEN_CONFIG``
(see serve_app/config.py); a Serve config from ``imagegen config build`` (serve_app/deploy.py)
builds it with `app_builder` from the configuration it carries in its ``args``.
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application, Deployment

from autoscaling.policy import BacklogPolicy
from deployments.config import ModelAutoscalingConfig, ResourcesConfig
from deployments.model_replica import ColocatedModel, ModelReplica
from deployments.postprocess import Postprocess, Postprocessor
from deployments.preprocess import Preprocess, Preprocessor
from deployments.stage_chain import LocalStage, StageChain
from serve_app.aliases import Routing
from serve_app.config import AppConfig, StageAutoscalingConfig, load_config
from serve_app.ingress import Ingress
from serve_app.scheduler import ColocatedScheduler, Scheduler

# Serve reads the scheduler's backlog report this often and averages it over this window: short,
# so a burst reaches the policy within about a second.
BACKLOG_METRICS = {"metrics_interval_s": 0.5, "look_back_period_s": 2.0}
STAGE_NAMES = {"ingress": "Ingress", "preprocess": "Preprocess", "postprocess": "Postprocess"}
# A rollout (a new configuration) starts each stateless deployment's new replicas before it stops
# the old ones, so no stage is ever without a running replica. The scheduler is the exception: it
# owns queue order and job state, so its old replica stops (drains) before its successor takes over.
SURGE_PERCENT = 100


def _serve_autoscaling(scaling: ModelAutoscalingConfig | StageAutoscalingConfig) -> dict[str, Any]:
    """Serve's bounds for a deployment the backlog policy scales; the policy applies the delays."""
    initial = scaling.initial_replicas if isinstance(scaling, ModelAutoscalingConfig) else None
    return {
        "min_replicas": scaling.min_replicas,
        "max_replicas": scaling.max_replicas,
        "initial_replicas": initial,
        "upscale_delay_s": 0.0,
        "downscale_delay_s": 0.0,
        **BACKLOG_METRICS,
    }


def _deployment_options(
    resources: ResourcesConfig, autoscaling: ModelAutoscalingConfig | StageAutoscalingConfig | None = None
) -> dict[str, Any]:
    replicas: dict[str, Any] = (
        {"num_replicas": resources.num_replicas}
        if autoscaling is None
        else {"autoscaling_config": _serve_autoscaling(autoscaling)}
    )
    return {
        **replicas,
        "max_ongoing_requests": resources.max_ongoing_requests,
        "max_queued_requests": resources.max_queued_requests,
        "health_check_period_s": resources.health_check_period_s,
        "health_check_timeout_s": resources.health_check_timeout_s,
        "graceful_shutdown_timeout_s": resources.graceful_shutdown_timeout_s,
        "max_surge_percent": SURGE_PERCENT,
        "ray_actor_options": resources.ray_actor_options(),
    }


def autoscales(config: AppConfig) -> bool:
    stages = config.stages
    stage_scaling = [getattr(stages, stage).autoscaling for stage in STAGE_NAMES]
    return any(variant.autoscaling for variant in config.variants) or any(stage_scaling)


def backlog_policy_kwargs(config: AppConfig) -> dict[str, Any]:
    """The `BacklogPolicy` settings of ``config`` (JSON, as Serve's ``policy_kwargs`` must be)."""
    models = {
        variant.deployment_name: {
            "variant": variant.name,
            **variant.autoscaling.model_dump(
                include={"target_images_per_replica", "upscale_delay_s", "downscale_delay_s"}
            ),
        }
        for variant in config.variants
        if variant.autoscaling
    }
    stages = {
        STAGE_NAMES[stage]: scaling.model_dump(exclude={"min_replicas", "max_replicas"})
        for stage in STAGE_NAMES
        if (scaling := getattr(config.stages, stage).autoscaling)
    }
    return {"scheduler": "Scheduler", "models": models, "stages": stages}


def application_autoscaling_policy(config: AppConfig) -> dict[str, Any] | None:
    """The Serve config's ``autoscaling_policy`` entry for ``config`` (None: nothing autoscales)."""
    if not autoscales(config):
        return None
    policy = f"{BacklogPolicy.__module__}:{BacklogPolicy.__name__}"
    return {"policy_function": policy, "policy_kwargs": backlog_policy_kwargs(config)}


def _deployment(decorated: object) -> Deployment:
    """A ``@serve.deployment`` class as the Deployment it is at run time (mypy sees the class)."""
    assert isinstance(decorated, Deployment)
    return decorated


def build_app(config: AppConfig) -> Application:
    """Bind ingress, scheduler, one ModelReplica per variant, and preprocess and postprocess
    (deployed apart, or colocated in their callers; the scheduler and the models, in the ingress)."""
    config = config.with_secrets()
    stages = config.stages
    models: dict[str, Application | ColocatedModel] = {
        variant.name: ColocatedModel(variant, config.cache_dir)
        if stages.ingress.colocate_models
        else _deployment(ModelReplica)
        .options(
            name=variant.deployment_name,
            user_config=variant.batching.model_dump(),
            **_deployment_options(variant.resources, variant.autoscaling),
        )
        .bind(variant, config.cache_dir)
        for variant in config.variants
    }
    # A colocated stage runs in its callers' processes (a LocalStage), else as its own deployment.
    preprocess_args = (config.limits, config.storage, config.moderation)
    preprocess: Application | LocalStage = (
        LocalStage(Preprocessor, preprocess_args)
        if stages.preprocess.colocate
        else _deployment(Preprocess)
        .options(**_deployment_options(stages.preprocess, stages.preprocess.autoscaling))
        .bind(*preprocess_args)
    )
    postprocess_args = (config.storage, config.moderation)
    postprocess: Application | LocalStage = (
        LocalStage(Postprocessor, postprocess_args)
        if stages.postprocess.colocate
        else _deployment(Postprocess)
        .options(**_deployment_options(stages.postprocess, stages.postprocess.autoscaling))
        .bind(*postprocess_args)
    )
    # One scheduler replica: it is the single owner of queue order and job state. With autoscaling
    # on, it is "autoscaled" between 1 and 1 so that Serve collects its backlog report.
    scheduler_options = {**_deployment_options(config.scheduler.resources), "num_replicas": 1}
    scheduler_options["max_surge_percent"] = 0
    if autoscales(config):
        scheduler_options.pop("num_replicas")
        scheduler_options["autoscaling_config"] = {"min_replicas": 1, "max_replicas": 1, **BACKLOG_METRICS}
    # The one stage chain, shared by the ingress (synchronous and streamed requests) and the
    # scheduler (jobs). Bound applications now; Serve hands the deployments handles in their
    # place at run time.
    chain = StageChain(preprocess, postprocess, models)  # type: ignore[arg-type]
    scheduler: Application | ColocatedScheduler = (
        ColocatedScheduler(config)
        if config.scheduler.colocate
        else _deployment(Scheduler).options(**scheduler_options).bind(config, chain)
    )
    ingress_options = _deployment_options(stages.ingress, stages.ingress.autoscaling)
    if stages.ingress.colocate_models:  # the ingress's process holds the models: their resources too
        ingress_options["ray_actor_options"] = {
            resource: amount
            + sum(variant.resources.ray_actor_options()[resource] for variant in config.variants)
            for resource, amount in ingress_options["ray_actor_options"].items()
        }
    ingress = _deployment(Ingress).options(
        user_config=Routing(config.aliases).user_config(), **ingress_options
    )
    return ingress.bind(config, chain, scheduler)


def app_builder(args: dict[str, Any]) -> Application:
    """The service a Serve config from `imagegen config build` describes: its ``args`` carry the
    configuration itself, so that any change to it is one Serve sees (and rolls out)."""
    return build_app(AppConfig(**args["config"]))


def __getattr__(name: str) -> Application:
    # Built lazily so importing this module reads no configuration.
    if name == "app":
        return build_app(load_config())
    raise AttributeError(name)
