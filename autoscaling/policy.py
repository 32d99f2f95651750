"""Backlog-driven autoscaling: Ray Serve's application-level policy for the whole service.

Pure functions of what Serve hands the policy (one ``AutoscalingContext`` per deployment), so
every rule is tested with hand-built contexts and a fake clock (tests/unit/test_autoscaling.py).

Where the backlog comes from: the scheduler deployment's ``record_autoscaling_stats()`` reports,
per variant, the images queued in it and the images it has granted slots to (running). Serve
aggregates these custom metrics and gives them to this policy, the only place that sees every
deployment at once; a model replica cannot see the queue in front of it, least of all at zero.

The rules, per control-loop tick:
1. A variant's model replicas: its image backlog (queued + running) over its target images in
   flight per replica, rounded up. A variant without backlog wants its minimum (zero when cold).
2. A stage with ``replicas_per_model_replica`` follows the model replicas decided in 1 (all
   variants together): its work is per image, so it grows and shrinks with the model.
   A stage with ``target_ongoing_requests`` follows its own ongoing requests (the ingress, whose
   load is connections, most of them waiting on the scheduler).
3. Bounds: each deployment's own ``min_replicas``/``max_replicas`` (Serve applies them too).
4. Delays: a change upward happens once it has been wanted for ``upscale_delay_s``, downward
   once wanted for ``downscale_delay_s`` without a break, so a burst scales up within seconds and
   a lull does not thrash. Leaving zero is immediate: work is waiting for the first replica.
   The pending direction and since when live in the policy state, timed by ``ctx.current_time``.
   (Serve's own delay fields are left at zero so delays are not applied twice.)
5. Missing data holds: without a report from the scheduler, model replicas stay where they are.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ray.serve._private.common import DeploymentID
from ray.serve.config import AutoscalingContext

QUEUED_IMAGES = "queued_images"
RUNNING_IMAGES = "running_images"


def backlog_metric(kind: str, variant: str) -> str:
    """The custom metric name the scheduler reports for ``variant`` (kind: queued or running)."""
    return f"{kind}:{variant}"


@dataclass(frozen=True)
class Delays:
    upscale_delay_s: float
    downscale_delay_s: float


@dataclass(frozen=True)
class ModelScaling:
    """How one variant's ModelReplica deployment scales."""

    variant: str
    target_images_per_replica: float
    delays: Delays


@dataclass(frozen=True)
class StageScaling:
    """How one stage scales: with the model replicas, or by its own ongoing requests."""

    delays: Delays
    replicas_per_model_replica: float | None = None
    target_ongoing_requests: float | None = None


def replicas_for_backlog(backlog_images: float, target_images_per_replica: float) -> int:
    """Replicas that hold ``backlog_images`` at the target images in flight per replica."""
    return math.ceil(backlog_images / target_images_per_replica - 1e-9) if backlog_images > 0 else 0


def proportional_replicas(model_replicas: int, replicas_per_model_replica: float) -> int:
    return math.ceil(model_replicas * replicas_per_model_replica - 1e-9)


def within_bounds(replicas: int, ctx: AutoscalingContext) -> int:
    return max(ctx.capacity_adjusted_min_replicas, min(replicas, ctx.capacity_adjusted_max_replicas))


def apply_delays(
    desired: int, current: int, delays: Delays, state: Mapping[str, Any], now: float
) -> tuple[int, dict[str, Any]]:
    """``current`` until ``desired`` has pointed the same way for that direction's delay.

    ``state`` holds the pending direction (``wants``) and when it began (``since``).
    """
    if desired == current:
        return current, {}
    wants = "up" if desired > current else "down"
    if wants == "up" and current == 0:
        return desired, {}
    since = state["since"] if state.get("wants") == wants else now
    delay = delays.upscale_delay_s if wants == "up" else delays.downscale_delay_s
    if now - since >= delay:
        return desired, {}
    return current, {"wants": wants, "since": since}


def scheduler_backlog(scheduler: AutoscalingContext | None, variant: str) -> float | None:
    """Queued plus running images of ``variant`` as the scheduler reported them (None: no report)."""
    if scheduler is None:
        return None
    metrics = scheduler.aggregated_metrics or {}
    queued = metrics.get(backlog_metric(QUEUED_IMAGES, variant))
    running = metrics.get(backlog_metric(RUNNING_IMAGES, variant))
    if not queued or not running:
        return None
    return sum(queued.values()) + sum(running.values())


class BacklogPolicy:
    """The application-level policy; Serve builds it once from ``policy_kwargs`` (JSON).

    ``scheduler`` names the scheduler deployment; ``models`` and ``stages`` map deployment names
    to the fields of `ModelScaling` and `StageScaling` (delays flattened in).
    """

    def __init__(
        self, scheduler: str, models: dict[str, dict[str, Any]], stages: dict[str, dict[str, Any]]
    ) -> None:
        self.scheduler = scheduler
        self.models = {name: _model_scaling(fields) for name, fields in models.items()}
        self.stages = {name: _stage_scaling(fields) for name, fields in stages.items()}

    def __call__(
        self, contexts: dict[DeploymentID, AutoscalingContext]
    ) -> tuple[dict[DeploymentID, int], dict[DeploymentID, dict[str, Any]]]:
        return scale_application(contexts, self.scheduler, self.models, self.stages)


def _delays(fields: dict[str, Any]) -> Delays:
    return Delays(fields["upscale_delay_s"], fields["downscale_delay_s"])


def _model_scaling(fields: dict[str, Any]) -> ModelScaling:
    return ModelScaling(fields["variant"], fields["target_images_per_replica"], _delays(fields))


def _stage_scaling(fields: dict[str, Any]) -> StageScaling:
    return StageScaling(
        _delays(fields), fields.get("replicas_per_model_replica"), fields.get("target_ongoing_requests")
    )


def scale_application(
    contexts: dict[DeploymentID, AutoscalingContext],
    scheduler_name: str,
    models: Mapping[str, ModelScaling],
    stages: Mapping[str, StageScaling],
) -> tuple[dict[DeploymentID, int], dict[DeploymentID, dict[str, Any]]]:
    """Replicas for every deployment this policy knows, and each one's policy state."""
    by_name = {deployment_id.name: (deployment_id, ctx) for deployment_id, ctx in contexts.items()}
    scheduler = by_name.get(scheduler_name, (None, None))[1]
    decisions: dict[DeploymentID, int] = {}
    states: dict[DeploymentID, dict[str, Any]] = {}

    def decide(deployment_id: DeploymentID, ctx: AutoscalingContext, wanted: int, delays: Delays) -> int:
        current = ctx.target_num_replicas
        replicas, state = apply_delays(
            within_bounds(wanted, ctx), current, delays, ctx.policy_state, _now(ctx)
        )
        decisions[deployment_id], states[deployment_id] = replicas, state
        return replicas

    model_replicas = 0
    for name, scaling in models.items():
        if name not in by_name:
            continue
        deployment_id, ctx = by_name[name]
        backlog = scheduler_backlog(scheduler, scaling.variant)
        wanted = (
            ctx.target_num_replicas
            if backlog is None
            else replicas_for_backlog(backlog, scaling.target_images_per_replica)
        )
        model_replicas += decide(deployment_id, ctx, wanted, scaling.delays)

    for name, stage in stages.items():
        if name not in by_name:
            continue
        deployment_id, ctx = by_name[name]
        if stage.replicas_per_model_replica is not None:
            wanted = proportional_replicas(model_replicas, stage.replicas_per_model_replica)
        else:
            assert stage.target_ongoing_requests is not None  # the config requires one of the two
            wanted = replicas_for_backlog(ctx.total_num_requests, stage.target_ongoing_requests)
        decide(deployment_id, ctx, wanted, stage.delays)
    return decisions, states


def _now(ctx: AutoscalingContext) -> float:
    assert ctx.current_time is not None  # Serve always sets it
    return ctx.current_time
