"""Each stage's settings: a model variant, batching, resources, storage, the log, upload limits.

The stages read these and nothing of the face; `serve_app/config.py` composes them with the
face's own settings (tiers, auth, the scheduler) into `AppConfig`. Every model forbids unknown
keys, so a typo in a YAML file fails when it is read.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, SecretStr, field_validator, model_validator

SIZE_PATTERN = re.compile(r"^(\d{2,5})x(\d{2,5})$")


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def parse_size(size: str) -> tuple[int, int]:
    """``"640x480"`` -> ``(640, 480)`` (width, height); raises ValueError otherwise."""
    match = SIZE_PATTERN.match(size)
    if not match:
        raise ValueError(f"size must look like '512x512', got {size!r}")
    return int(match.group(1)), int(match.group(2))


class BatchingConfig(StrictModel):
    """Dynamic batching of image tasks inside one model replica; changeable live."""

    max_batch_size: int = Field(8, ge=1, le=256, description="Most image tasks in one forward pass.")
    batch_wait_timeout_s: float = Field(
        0.01, ge=0.0, le=10.0, description="How long a partial batch waits for more tasks."
    )
    company_wait_s: float = Field(
        0.03,
        ge=0.0,
        le=10.0,
        description="How long after a batch of several callers ends the next one waits for its even "
        "share of the work while they come back (closed-loop clients return a few at a time).",
    )


class ResourcesConfig(StrictModel):
    """Ray resources and replica counts of one deployment."""

    num_cpus: float = Field(0.25, ge=0.0, description="CPUs reserved per replica (fractions allowed).")
    num_gpus: float = Field(0.0, ge=0.0, description="GPUs reserved per replica (fractions allowed).")
    num_replicas: int = Field(1, ge=1, description="Replicas when autoscaling is off.")
    max_ongoing_requests: int = Field(64, ge=1, description="Concurrent calls one replica accepts.")
    max_queued_requests: int = Field(
        1000, ge=1, description="Calls a caller queues for this deployment beyond those; more get 503."
    )
    health_check_period_s: float = Field(10.0, gt=0, description="How often Serve checks a replica.")
    health_check_timeout_s: float = Field(
        30.0, gt=0, description="A check not answered within this fails; Serve replaces the replica."
    )
    graceful_shutdown_timeout_s: float = Field(
        60.0,
        ge=0,
        description="How long a replica a rollout (or downscaling) stops may finish its ongoing calls "
        "before it is killed.",
    )

    def ray_actor_options(self) -> dict[str, float]:
        return {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}


class ScalingDelays(StrictModel):
    """How long a change must be wanted before it happens; up is quick, down patient."""

    upscale_delay_s: float = Field(2.0, ge=0, le=600, description="Wanted this long before adding.")
    downscale_delay_s: float = Field(
        60.0, ge=0, le=3600, description="Wanted this long, without a break, before removing."
    )


class ModelAutoscalingConfig(ScalingDelays):
    """A variant's model replicas follow its image backlog: queued in the scheduler plus running."""

    min_replicas: int = Field(1, ge=0, le=1000, description="Fewest replicas; 0 only for a cold variant.")
    max_replicas: int = Field(4, ge=1, le=1000, description="Most replicas (and GPUs) this variant may hold.")
    initial_replicas: int | None = Field(None, ge=0, le=1000, description="Replicas at deploy time.")
    target_images_per_replica: float = Field(
        16.0, gt=0, le=10_000, description="Images in flight (queued + running) one replica should hold."
    )
    cold: bool = Field(
        False, description="Scale to zero when idle; the first request then waits for a replica to start."
    )
    cold_start_timeout_s: float = Field(
        300.0, gt=0, le=3600, description="How long a request waits for a variant at zero before a 503."
    )

    @model_validator(mode="after")
    def _bounds(self) -> ModelAutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must not exceed max_replicas")
        if self.initial_replicas is not None and not (
            self.min_replicas <= self.initial_replicas <= self.max_replicas
        ):
            raise ValueError("initial_replicas must lie within min_replicas..max_replicas")
        if self.cold != (self.min_replicas == 0):
            raise ValueError("a cold variant needs min_replicas: 0, and min_replicas: 0 needs cold: true")
        return self


class QualitySteps(StrictModel):
    """Denoising steps for each OpenAI ``quality`` value (``auto`` and ``standard`` mean ``medium``,
    ``hd`` means ``high``). ``xhigh`` and ``max`` are offered only by variants that set them."""

    low: int = Field(2, ge=1, le=200)
    medium: int = Field(4, ge=1, le=200)
    high: int = Field(8, ge=1, le=200)
    xhigh: int | None = Field(None, ge=1, le=200, description="Unset: the variant refuses quality 'xhigh'.")
    max: int | None = Field(None, ge=1, le=200, description="Unset: the variant refuses quality 'max'.")

    @model_validator(mode="after")
    def _steps_ascend(self) -> QualitySteps:
        if self.max is not None and self.xhigh is None:
            raise ValueError("steps: set xhigh too when setting max")
        offered = [s for s in (self.low, self.medium, self.high, self.xhigh, self.max) if s is not None]
        if offered != sorted(offered):
            raise ValueError(f"steps must not decrease from low to max, got {self.model_dump()}")
        return self

    def offered(self) -> dict[str, int]:
        """The qualities this variant offers and their steps."""
        return {quality: steps for quality, steps in self.model_dump().items() if steps is not None}


class VariantConfig(StrictModel):
    """One model variant: which family, which weights, what it may be asked for, how it runs."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", description="The API's `model` id.")
    family: str = Field(description="Model family registered in deployments/models (e.g. 'diffusion').")
    weights: str = Field(
        description="Local path or hub id for from_pretrained, or 'builtin:<name>' for an embedded model."
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    compile: bool = Field(False, description="torch.compile the denoiser (GPU only).")
    cpu_threads: PositiveInt | Literal["all", "auto"] | None = Field(
        None,
        description="Torch threads for a forward pass on a CPU: a number, 'all' for every core the replica "
        "may run on, 'auto' to choose per batch size by timing the passes as they run, or unset for "
        "Ray's choice (the replica's whole num_cpus, so 1 for num_cpus: 1).",
    )
    thread_calibration_s: float = Field(
        15.0,
        ge=0,
        description="With cpu_threads 'auto', the most seconds a replica spends at start-up, before it "
        "takes requests, timing passes of the default request at batch 1 and at max_batch_size on each "
        "thread count (its first pass always runs, and warms the kernels); 0 leaves it all to requests.",
    )
    concurrent_passes: PositiveInt = Field(
        1,
        description="Forward passes one replica may run at once, on one copy of the weights (data "
        "parallel within the replica). Under load they run side by side, each on an equal share of "
        "the pass's cpu_threads; a pass with nothing else running or waiting takes them all. "
        "On a small CPU, one per core beats one pass spread over every core.",
    )
    sizes: list[str] = Field(min_length=1, description="Allowed sizes as 'WxH'; the first is the default.")
    steps: QualitySteps = QualitySteps()
    max_steps: int = Field(50, ge=1, le=500, description="Upper bound for `num_inference_steps`.")
    guidance_scale: float = Field(5.0, ge=0.0, le=50.0, description="Default classifier-free guidance.")
    supports_transparency: bool = False
    batching: BatchingConfig = BatchingConfig()
    resources: ResourcesConfig = ResourcesConfig(num_cpus=1.0, max_ongoing_requests=64)
    max_pass_s: float = Field(
        600.0,
        gt=0,
        description="A forward pass running longer than this fails the replica's health check: "
        "Serve replaces it and the work on it is retried.",
    )
    autoscaling: ModelAutoscalingConfig | None = Field(
        None, description="Replicas from the image backlog; without it, `resources.num_replicas` fixed."
    )

    @field_validator("sizes")
    @classmethod
    def _sizes_parse(cls, sizes: list[str]) -> list[str]:
        for size in sizes:
            width, height = parse_size(size)
            if width % 8 or height % 8:
                raise ValueError(f"size {size!r}: width and height must be multiples of 8")
        return sizes

    @model_validator(mode="after")
    def _steps_within_max(self) -> VariantConfig:
        if max(self.steps.offered().values()) > self.max_steps:
            raise ValueError("steps per quality must not exceed max_steps")
        return self

    @model_validator(mode="after")
    def _replicas_or_autoscaling(self) -> VariantConfig:
        if self.autoscaling is not None and "num_replicas" in self.resources.model_fields_set:
            raise ValueError("resources.num_replicas and autoscaling exclude each other")
        return self

    @property
    def default_size(self) -> str:
        return self.sizes[0]

    @property
    def deployment_name(self) -> str:
        """The variant's ModelReplica deployment in Serve."""
        return f"ModelReplica-{self.name}"


class GenerationLogConfig(StrictModel):
    """The generation log: one Parquet row per image, written to the object store."""

    enabled: bool = True
    flush_rows: int = Field(256, ge=1, description="Write a file once this many rows are buffered.")
    flush_interval_s: float = Field(10.0, gt=0, description="...or once the oldest row is this old.")
    max_buffered_rows: int = Field(
        10_000, ge=1, description="Rows kept while the store is down; the oldest beyond are dropped."
    )
    include_prompt: bool = Field(False, description="Store raw prompts (otherwise length and SHA-256).")


class StorageConfig(StrictModel):
    """Where images and the generation log are written, and how clients fetch images."""

    url: str = Field("file://./data", description="fsspec URL of the store root: file://... or s3://...")
    endpoint_url: str | None = Field(None, description="S3-compatible endpoint (MinIO, moto, R2, ...).")
    signing_key: SecretStr | None = Field(
        None, description="HMAC key for file:// URLs; random per start when unset (URLs then die on restart)."
    )
    url_ttl_s: int = Field(
        3600, ge=1, le=7 * 24 * 3600, description="Lifetime of a returned URL (<= 7 days)."
    )
    public_base_url: str | None = Field(
        None, description="Base URL clients use to reach the service; defaults to the request's own."
    )
    attempts: int = Field(3, ge=1, le=10, description="Tries per store call for transient errors.")
    backoff_s: float = Field(0.05, ge=0, le=5, description="First retry delay; doubles per attempt.")
    timeout_s: float = Field(2.0, gt=0, le=60, description="Connect and read timeout of one S3 call.")
    breaker_failures: int = Field(3, ge=1, description="Failed calls in a row that open the circuit.")
    breaker_reset_s: float = Field(5.0, gt=0, description="How long the circuit stays open before a probe.")
    log: GenerationLogConfig = GenerationLogConfig()

    @field_validator("url")
    @classmethod
    def _local_paths_absolute(cls, url: str) -> str:
        # Ray workers may run elsewhere than the driver's directory: pin relative paths now.
        if url.startswith("file://"):
            return "file://" + str(Path(url.removeprefix("file://")).expanduser().resolve())
        if not url.startswith("s3://"):
            raise ValueError(f"storage url must start with file:// or s3://, got {url!r}")
        return url.rstrip("/")


class LimitsConfig(StrictModel):
    max_prompt_chars: int = Field(32000, ge=1)
    max_images_per_request: int = Field(10, ge=1, le=10)
    max_request_bytes: int = Field(
        1 << 20, ge=1024, description="Largest JSON body, and largest text field of a multipart form."
    )
    max_input_images: int = Field(16, ge=1, le=16, description="Most images one edit request may upload.")
    max_upload_bytes: int = Field(16 << 20, ge=1024, description="Largest uploaded file (one form part).")
    max_total_upload_bytes: int = Field(
        64 << 20, ge=1024, description="Largest multipart body, counted while it is read."
    )
    max_image_pixels: int = Field(
        4096 * 4096, ge=64 * 64, description="Most pixels an uploaded image may declare (bomb guard)."
    )
    body_read_timeout_s: float = Field(
        30.0, gt=0, description="A request body not received whole within this is refused (408)."
    )

    @model_validator(mode="after")
    def _total_holds_one_file(self) -> LimitsConfig:
        if self.max_total_upload_bytes < self.max_upload_bytes:
            raise ValueError("max_total_upload_bytes must be at least max_upload_bytes")
        return self
