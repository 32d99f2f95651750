"""The backlog policy with hand-built Serve contexts and a fake clock: no cluster, no sleeping."""

from __future__ import annotations

from typing import Any

from ray.serve._private.common import DeploymentID, ReplicaID
from ray.serve.config import AutoscalingConfig, AutoscalingContext

from autoscaling.policy import (
    QUEUED_IMAGES,
    RUNNING_IMAGES,
    BacklogPolicy,
    backlog_metric,
    replicas_for_backlog,
)

APP = "imagegen"
DELAYS = {"upscale_delay_s": 2.0, "downscale_delay_s": 30.0}
SETTINGS: dict[str, Any] = {
    "scheduler": "Scheduler",
    "models": {
        "ModelReplica-warm": {"variant": "warm", "target_images_per_replica": 8, **DELAYS},
        "ModelReplica-cold": {"variant": "cold", "target_images_per_replica": 4, **DELAYS},
    },
    "stages": {
        "Preprocess": {"replicas_per_model_replica": 0.5, **DELAYS},
        "Ingress": {"target_ongoing_requests": 100, **DELAYS},
    },
}
BOUNDS = {
    "Scheduler": (1, 1),
    "ModelReplica-warm": (1, 4),
    "ModelReplica-cold": (0, 2),
    "Preprocess": (1, 3),
    "Ingress": (1, 2),
}


def context(
    name: str,
    replicas: int,
    now: float,
    state: dict[str, Any] | None = None,
    metrics: dict[str, float] | None = None,
    ongoing_requests: float = 0.0,
) -> AutoscalingContext:
    deployment_id = DeploymentID(name=name, app_name=APP)
    low, high = BOUNDS[name]
    replica = ReplicaID(unique_id="r0", deployment_id=deployment_id)
    return AutoscalingContext(
        deployment_id=deployment_id,
        deployment_name=name,
        app_name=APP,
        current_num_replicas=replicas,
        target_num_replicas=replicas,
        running_replicas=[replica] * replicas,
        total_num_requests=ongoing_requests,
        total_queued_requests=0.0,
        aggregated_metrics={key: {replica: value} for key, value in (metrics or {}).items()},
        raw_metrics={},
        capacity_adjusted_min_replicas=low,
        capacity_adjusted_max_replicas=high,
        policy_state=state or {},
        last_scale_up_time=None,
        last_scale_down_time=None,
        current_time=now,
        config=AutoscalingConfig(min_replicas=low, max_replicas=high),
    )


def backlog(**per_variant: tuple[int, int]) -> dict[str, float]:
    """Scheduler metrics: ``variant=(queued, running)``."""
    metrics = {}
    for variant, (queued, running) in per_variant.items():
        metrics[backlog_metric(QUEUED_IMAGES, variant)] = queued
        metrics[backlog_metric(RUNNING_IMAGES, variant)] = running
    return metrics


class App:
    """The application as the policy sees it, ticking on a fake clock."""

    def __init__(self, replicas: dict[str, int]) -> None:
        self.replicas = dict(replicas)
        self.states: dict[str, dict[str, Any]] = {}
        self.policy = BacklogPolicy(**SETTINGS)
        self.now = 1000.0

    def tick(self, seconds: float, scheduler: dict[str, float] | None, ingress_requests: float = 0) -> None:
        self.now += seconds
        contexts = {}
        for name, count in self.replicas.items():
            metrics = scheduler if name == "Scheduler" else None
            requests = ingress_requests if name == "Ingress" else 0.0
            ctx = context(name, count, self.now, self.states.get(name), metrics, requests)
            contexts[ctx.deployment_id] = ctx
        decisions, states = self.policy(contexts)
        assert all(isinstance(value, dict) for value in states.values())
        for deployment_id, replicas in decisions.items():
            self.replicas[deployment_id.name] = replicas
        self.states = {deployment_id.name: state for deployment_id, state in states.items()}


def started() -> App:
    return App(
        {"Scheduler": 1, "ModelReplica-warm": 1, "ModelReplica-cold": 0, "Preprocess": 1, "Ingress": 1}
    )


def test_replicas_for_backlog_rounds_up() -> None:
    assert replicas_for_backlog(0, 8) == 0
    assert replicas_for_backlog(1, 8) == 1
    assert replicas_for_backlog(8, 8) == 1
    assert replicas_for_backlog(9, 8) == 2


def test_a_backlog_scales_up_after_the_upscale_delay_and_not_before() -> None:
    app = started()
    app.tick(1, backlog(warm=(20, 8)))  # 28 images at 8 per replica: 4
    assert app.replicas["ModelReplica-warm"] == 1
    app.tick(1.5, backlog(warm=(20, 8)))  # 1.5 s into the 2 s delay
    assert app.replicas["ModelReplica-warm"] == 1
    app.tick(0.5, backlog(warm=(20, 8)))
    assert app.replicas["ModelReplica-warm"] == 4


def test_a_burst_that_ends_within_the_delay_changes_nothing() -> None:
    app = started()
    app.tick(1, backlog(warm=(20, 8)))
    app.tick(1, backlog(warm=(0, 4)))  # back within one replica: the pending scale-up is dropped
    app.tick(1.5, backlog(warm=(20, 8)))
    assert app.replicas["ModelReplica-warm"] == 1


def test_max_replicas_bounds_the_backlog() -> None:
    app = started()
    app.tick(1, backlog(warm=(500, 32)))
    app.tick(2, backlog(warm=(500, 32)))
    assert app.replicas["ModelReplica-warm"] == 4


def test_idle_scales_down_only_after_the_downscale_delay_and_never_below_min() -> None:
    app = App({"Scheduler": 1, "ModelReplica-warm": 4, "ModelReplica-cold": 0, "Preprocess": 2, "Ingress": 1})
    app.tick(1, backlog(warm=(0, 0)))
    app.tick(20, backlog(warm=(0, 0)))
    assert app.replicas["ModelReplica-warm"] == 4
    app.tick(5, backlog(warm=(8, 24)))  # work again: the lull is broken, its clock restarts
    app.tick(10, backlog(warm=(0, 0)))
    app.tick(25, backlog(warm=(0, 0)))
    assert app.replicas["ModelReplica-warm"] == 4
    app.tick(5, backlog(warm=(0, 0)))
    assert app.replicas["ModelReplica-warm"] == 1  # min_replicas, not zero: this variant is warm


def test_a_cold_variant_leaves_zero_at_once_and_returns_to_zero_after_idle() -> None:
    app = started()
    app.tick(1, backlog(warm=(0, 0), cold=(1, 0)))
    assert app.replicas["ModelReplica-cold"] == 1  # no delay: a request is waiting
    app.tick(1, backlog(warm=(0, 0), cold=(0, 1)))
    app.tick(1, backlog(warm=(0, 0), cold=(0, 0)))
    app.tick(29, backlog(warm=(0, 0), cold=(0, 0)))
    assert app.replicas["ModelReplica-cold"] == 1
    app.tick(1, backlog(warm=(0, 0), cold=(0, 0)))
    assert app.replicas["ModelReplica-cold"] == 0


def test_without_a_scheduler_report_model_replicas_hold() -> None:
    app = App({"Scheduler": 1, "ModelReplica-warm": 3, "ModelReplica-cold": 1, "Preprocess": 2, "Ingress": 1})
    for _ in range(5):
        app.tick(30, None)
    assert app.replicas["ModelReplica-warm"] == 3
    assert app.replicas["ModelReplica-cold"] == 1


def test_stages_follow_the_model_replicas_in_proportion() -> None:
    app = started()
    app.tick(1, backlog(warm=(24, 8), cold=(8, 0)))
    assert (app.replicas["ModelReplica-warm"], app.replicas["ModelReplica-cold"]) == (1, 2)
    assert app.replicas["Preprocess"] == 1  # stages keep their own upscale delay
    app.tick(2, backlog(warm=(24, 8), cold=(8, 0)))
    assert (app.replicas["ModelReplica-warm"], app.replicas["ModelReplica-cold"]) == (4, 2)
    assert app.replicas["Preprocess"] == 3  # half of 6 model replicas
    app.tick(1, backlog(warm=(0, 0), cold=(0, 0)))
    app.tick(30, backlog(warm=(0, 0), cold=(0, 0)))
    assert (app.replicas["ModelReplica-warm"], app.replicas["ModelReplica-cold"]) == (1, 0)
    assert app.replicas["Preprocess"] == 3  # its own downscale delay starts now
    app.tick(30, backlog(warm=(0, 0), cold=(0, 0)))
    assert app.replicas["Preprocess"] == 1  # half of one model replica, rounded up
    assert app.replicas["Scheduler"] == 1  # the scheduler is not the policy's to scale


def test_the_ingress_follows_its_own_ongoing_requests() -> None:
    app = started()
    app.tick(1, backlog(warm=(0, 0)), ingress_requests=150)
    app.tick(2, backlog(warm=(0, 0)), ingress_requests=150)
    assert app.replicas["Ingress"] == 2
    assert app.replicas["ModelReplica-warm"] == 1
