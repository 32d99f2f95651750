"""Service metrics through ``ray.serve.metrics`` (exported by Ray's Prometheus endpoint).

Created inside each replica (Ray metrics need a running worker), one object per process.
"""

from __future__ import annotations

from functools import cache

from ray.serve import metrics

LATENCY_BOUNDARIES_S = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]
BATCH_SIZE_BOUNDARIES = [1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0, 64.0]


class StageMetrics:
    """Latency per stage, images generated, batch sizes, tasks in flight and cancelled, by variant."""

    def __init__(self) -> None:
        self.stage_latency = metrics.Histogram(
            "imagegen_stage_latency_seconds",
            description="Time spent in one stage, per call.",
            boundaries=LATENCY_BOUNDARIES_S,
            tag_keys=("stage", "variant"),  # type: ignore[arg-type]  # Ray annotates tuple[str]
        )
        self.images_generated = metrics.Counter(
            "imagegen_images_generated_total",
            description="Images produced by model replicas.",
            tag_keys=("variant",),
        )
        self.batch_size = metrics.Histogram(
            "imagegen_batch_size",
            description="Image tasks per forward pass.",
            boundaries=BATCH_SIZE_BOUNDARIES,
            tag_keys=("variant",),
        )
        self.tasks_in_flight = metrics.Gauge(
            "imagegen_tasks_in_flight",
            description="Image tasks a model replica holds (queued or computing), per replica.",
            tag_keys=("variant",),
        )
        self.tasks_cancelled = metrics.Counter(
            "imagegen_tasks_cancelled_total",
            description="Image tasks whose caller went away before the image was done.",
            tag_keys=("variant",),
        )
        self.moderation_blocked = metrics.Counter(
            "imagegen_moderation_blocked_total",
            description="Requests a moderation check blocked, by stage (input, output) and check.",
            tag_keys=("stage", "check"),  # type: ignore[arg-type]  # Ray annotates tuple[str]
        )

        self.log_rows_dropped = metrics.Counter(
            "imagegen_log_rows_dropped_total",
            description="Generation-log rows dropped because the store stayed down too long.",
        )

    def count_dropped_log_rows(self, count: int) -> None:
        self.log_rows_dropped.inc(count)

    def count_moderation_block(self, stage: str, check: str) -> None:
        self.moderation_blocked.inc(tags={"stage": stage, "check": check})

    def observe_stage(self, stage: str, variant: str, seconds: float) -> None:
        self.stage_latency.observe(seconds, tags={"stage": stage, "variant": variant})

    def set_in_flight(self, variant: str, count: int) -> None:
        self.tasks_in_flight.set(count, tags={"variant": variant})

    def count_cancelled(self, variant: str) -> None:
        self.tasks_cancelled.inc(tags={"variant": variant})

    def observe_batch(self, variant: str, size: int) -> None:
        self.batch_size.observe(size, tags={"variant": variant})
        self.images_generated.inc(size, tags={"variant": variant})


@cache
def stage_metrics() -> StageMetrics:
    return StageMetrics()
