"""Service configuration: one YAML file, overridable from the environment.

`load_config()` reads the YAML named by ``IMAGEGEN_CONFIG`` (default: the embedded
``configs/default.yaml``). Any field can be overridden by an environment variable prefixed
``IMAGEGEN_`` with nested fields joined by ``__``, e.g. ``IMAGEGEN_STORAGE__URL=s3://bucket/x``.
Every model forbids unknown keys, so a typo in a YAML file fails when it is read.
"""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveInt,
    SecretStr,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from deployments.moderation import ModerationConfig
from serve_app.aliases import alias_errors

CONFIG_DIR = Path(__file__).parent / "configs"
DEFAULT_CONFIG_PATH = CONFIG_DIR / "default.yaml"
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


class StageAutoscalingConfig(ScalingDelays):
    """A CPU stage follows the model replicas (per image work) or its own ongoing requests."""

    min_replicas: int = Field(1, ge=1, le=1000, description="Fewest replicas (stages never go to zero).")
    max_replicas: int = Field(4, ge=1, le=1000, description="Most replicas.")
    replicas_per_model_replica: float | None = Field(
        None, gt=0, le=100, description="Replicas per model replica of all variants (e.g. 0.5: one per two)."
    )
    target_ongoing_requests: float | None = Field(
        None, gt=0, description="Or: ongoing requests one replica should hold (the ingress)."
    )

    @model_validator(mode="after")
    def _one_signal(self) -> StageAutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must not exceed max_replicas")
        if (self.replicas_per_model_replica is None) == (self.target_ongoing_requests is None):
            raise ValueError("set exactly one of replicas_per_model_replica and target_ongoing_requests")
        return self


class StageResourcesConfig(ResourcesConfig):
    """A CPU stage's resources, and its autoscaling (fixed ``num_replicas`` without it)."""

    autoscaling: StageAutoscalingConfig | None = None

    @model_validator(mode="after")
    def _replicas_or_autoscaling(self) -> StageResourcesConfig:
        if self.autoscaling is not None and "num_replicas" in self.model_fields_set:
            raise ValueError("num_replicas and autoscaling exclude each other")
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
    cpu_threads: PositiveInt | Literal["all"] | None = Field(
        None,
        description="Torch threads for a forward pass on a CPU: a number, 'all' for every core the replica "
        "may run on, or unset for Ray's choice (the replica's whole num_cpus, so 1 for num_cpus: 1).",
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


class StageConfig(StrictModel):
    """Resources of the CPU stages around the model."""

    ingress: StageResourcesConfig = StageResourcesConfig(num_cpus=0.1)
    preprocess: StageResourcesConfig = StageResourcesConfig(num_cpus=0.1)
    postprocess: StageResourcesConfig = StageResourcesConfig(num_cpus=0.2)


class TierConfig(StrictModel):
    """How one tier is admitted, ordered and limited."""

    requests_per_minute: int = Field(600, ge=1, description="Requests a tenant may make per minute.")
    cost_per_minute: float = Field(
        2_000.0, gt=0, description="Image cost per minute; one 512x512 image at 30 steps costs 1."
    )
    end_user_requests_per_minute: int | None = Field(
        None,
        ge=1,
        description="Requests one end user of a tenant (its `safety_identifier`, else `user`) may make per "
        "minute, beside the tenant's own limits; unset: end users share the tenant's limits.",
    )
    queue_delay_s: float = Field(
        0.0, ge=0, description="Head start other tiers get: work is ordered by arrival + this delay (ageing)."
    )
    deferred_delay_s: float = Field(
        0.0, ge=0, description="Extra delay while the backlog is over `defer_at_backlog` (deferral at peak)."
    )
    max_wait_s: float = Field(300.0, gt=0, description="Deadline: work predicted to wait longer is shed.")
    contended_share: float = Field(
        1.0,
        ge=0,
        le=1,
        description="Most of a variant's slots this tier may hold while another tier uses the variant "
        "(has work queued or running, or arrived within `contention_window_s`): the rest is a latency "
        "reserve, so the other tier's work joins short forward passes instead of queueing behind full "
        "ones. Below one slot, the tier runs one image at a time in the other tiers' gaps only (or once "
        "its work has aged).",
    )
    sheddable: bool = Field(
        False, description="Shed at `shed_at_backlog` or on a missed deadline, not only at the hard limit."
    )


class SchedulerConfig(StrictModel):
    """Backlog thresholds, job durability and webhooks."""

    defer_at_backlog: int = Field(16, ge=0, description="Queued images above which deferrable work waits.")
    shed_at_backlog: int = Field(64, ge=0, description="Queued images above which sheddable tiers get 429.")
    max_backlog: int = Field(
        512, ge=1, description="Hard limit: queued images above which every tier gets 429."
    )
    slots_per_replica: int | None = Field(
        None, ge=1, description="Images in flight per model replica; default twice its max_batch_size."
    )
    contention_window_s: float = Field(
        10.0,
        ge=0,
        description="How long after another tier's last arrival a `contended_share` still applies.",
    )
    job_attempts: int = Field(4, ge=1, le=20, description="Tries per job when a replica dies under it.")
    lease_s: float = Field(900.0, gt=0, description="A slot not released within this is reclaimed.")
    job_memory_s: float = Field(
        600.0,
        ge=0,
        description="Finished jobs stay in the scheduler's memory this long; later reads go to the store.",
    )
    job_store_retry_s: float = Field(
        300.0,
        ge=0,
        description="How long a running job retries a failing object store (with backoff) before it fails.",
    )
    webhook_retry_for_s: float = Field(
        24 * 3600.0,
        gt=0,
        description="How long an undelivered webhook is retried (it survives restarts) before it is dropped.",
    )
    webhook_first_backoff_s: float = Field(1.0, gt=0, description="First delay between webhook attempts.")
    webhook_max_backoff_s: float = Field(
        600.0, gt=0, description="The delay between webhook attempts doubles up to this."
    )
    webhook_timeout_s: float = Field(5.0, gt=0, description="Connect and read timeout of one webhook POST.")
    job_retention_s: float = Field(
        7 * 24 * 3600.0,
        gt=0,
        description="A finished job's record and images are deleted from the store this long after it ends.",
    )
    idempotency_retention_s: float = Field(
        24 * 3600.0, gt=0, description="An Idempotency-Key is remembered this long (as Stripe does)."
    )
    retention_sweep_interval_s: float = Field(
        600.0, gt=0, description="How often expired job and idempotency records are pruned from the store."
    )
    webhook_allow_private: bool = Field(False, description="Allow webhooks to loopback/private addresses.")
    resources: ResourcesConfig = ResourcesConfig(num_cpus=0.1, max_ongoing_requests=100_000)

    @model_validator(mode="after")
    def _thresholds_ordered(self) -> SchedulerConfig:
        if not self.defer_at_backlog <= self.shed_at_backlog <= self.max_backlog:
            raise ValueError("need defer_at_backlog <= shed_at_backlog <= max_backlog")
        return self


class AuthConfig(StrictModel):
    keys_file: Path | None = Field(
        None, description="YAML with `keys: [{key, tenant, tier}]`; without it the service runs open (local)."
    )
    webhook_secret: SecretStr | None = Field(
        None, description="HMAC key for webhook signatures; requests with a webhook_url get 400 when unset."
    )
    allow_open_network: bool = Field(
        False,
        description="Serve without `keys_file` on a non-loopback `host`: anyone who reaches it may use it.",
    )


def default_tiers() -> dict[str, TierConfig]:
    return {
        "paid": TierConfig(),
        "free": TierConfig(
            requests_per_minute=60,
            cost_per_minute=200.0,
            queue_delay_s=10.0,
            deferred_delay_s=60.0,
            max_wait_s=120.0,
            contended_share=0.0,
            sheddable=True,
        ),
    }


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


class CallTimeoutsConfig(StrictModel):
    """Bounds on the calls the ingress and the scheduler make through Serve handles (504 after)."""

    scheduler_s: float = Field(
        30.0, gt=0, description="The ingress's short calls to the scheduler: submit, get, cancel a job."
    )
    slot_wait_s: float = Field(
        900.0, gt=0, description="A synchronous request waiting for its slots (admission, the queue)."
    )
    job_wait_s: float = Field(
        1800.0, gt=0, description="A synchronous request with an Idempotency-Key waiting for its job."
    )
    pipeline_s: float = Field(
        900.0,
        gt=0,
        description="One run of preprocess -> model -> postprocess (and a stream's first event); "
        "set above a variant's max_pass_s and its health check's bound.",
    )


class AppConfig(BaseSettings):
    """The whole service. Built by `load_config()`; passed to every deployment."""

    model_config = SettingsConfigDict(
        env_prefix="IMAGEGEN_", env_nested_delimiter="__", extra="forbid", frozen=True
    )

    host: str = Field("127.0.0.1", description="Address the HTTP proxy binds.")
    port: int = Field(8000, ge=1, le=65535)
    cache_dir: Path = Field(Path.home() / ".cache" / "imagegen", description="Where built models live.")
    default_model: str | None = Field(None, description="Variant used when a request names none.")
    variants: list[VariantConfig] = Field(min_length=1)
    aliases: dict[str, dict[str, float]] = Field(
        default_factory=dict,
        description="Model names that split traffic between variants by weight, sticky per caller: "
        "{alias: {variant: weight}} (see serve_app/aliases.py).",
    )
    storage: StorageConfig = StorageConfig()
    stages: StageConfig = StageConfig()
    limits: LimitsConfig = LimitsConfig()
    auth: AuthConfig = AuthConfig()
    tiers: dict[str, TierConfig] = Field(default_factory=default_tiers)
    scheduler: SchedulerConfig = SchedulerConfig()
    timeouts: CallTimeoutsConfig = CallTimeoutsConfig()
    moderation: ModerationConfig = Field(
        ModerationConfig(), description="Moderation checks per tier and variant; none by default."
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The environment overrides the YAML file (passed as init kwargs).
        return env_settings, init_settings

    @field_validator("cache_dir")
    @classmethod
    def _cache_dir_absolute(cls, path: Path) -> Path:
        return path.expanduser().resolve()

    @model_validator(mode="after")
    def _variants_unique(self) -> AppConfig:
        names = [variant.name for variant in self.variants]
        if len(set(names)) != len(names):
            raise ValueError(f"variant names must be unique, got {names}")
        if self.default_model is not None and self.default_model not in names:
            raise ValueError(f"default_model {self.default_model!r} is not one of {names}")
        if "paid" not in self.tiers:
            raise ValueError("tiers must include 'paid' (the tier of the open local mode)")
        return self

    @model_validator(mode="after")
    def _aliases_valid(self) -> AppConfig:
        if errors := alias_errors(self.aliases, [variant.name for variant in self.variants]):
            raise ValueError("; ".join(errors))
        return self

    @model_validator(mode="after")
    def _moderation_names_known(self) -> AppConfig:
        moderation = self.moderation
        if undefined := moderation.undefined_checks():
            raise ValueError(f"moderation: checks {undefined} are used but not defined under checks")
        if unknown := sorted(set(moderation.tiers) - set(self.tiers)):
            raise ValueError(f"moderation.tiers: unknown tiers {unknown}; tiers are {sorted(self.tiers)}")
        variants = {variant.name for variant in self.variants}
        if unknown := sorted(set(moderation.variants) - variants):
            raise ValueError(f"moderation.variants: unknown variants {unknown}; known: {sorted(variants)}")
        return self

    @model_validator(mode="after")
    def _open_mode_stays_local(self) -> AppConfig:
        if self.auth.keys_file is None and not self.auth.allow_open_network and not is_loopback(self.host):
            raise ValueError(
                f"host {self.host!r} is not a loopback address and there is no auth.keys_file: anyone who "
                "reaches it could use the service. Configure API keys, bind 127.0.0.1, or set "
                "auth.allow_open_network: true"
            )
        return self

    def variant(self, name: str | None) -> VariantConfig | None:
        wanted = name or self.default_model or self.variants[0].name
        return next((variant for variant in self.variants if variant.name == wanted), None)

    def with_secrets(self) -> AppConfig:
        """A copy with a URL signing key, random when none is configured.

        The webhook secret is never made up: a receiver could not verify a random one."""
        storage = self.storage
        if storage.signing_key is None:
            storage = storage.model_copy(update={"signing_key": SecretStr(secrets.token_hex(32))})
        return self.model_copy(update={"storage": storage})


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback IP addresses; any other name may reach the network."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _read_yaml(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    return data


def load_config(path: str | os.PathLike[str] | None = None) -> AppConfig:
    """Read the YAML config (variant entries, and ``aliases``, may be paths to YAML files relative to it)."""
    config_path = Path(path or os.environ.get("IMAGEGEN_CONFIG") or DEFAULT_CONFIG_PATH)
    data = _read_yaml(config_path)
    data["variants"] = [
        _read_yaml(config_path.parent / entry) if isinstance(entry, str) else entry
        for entry in data.get("variants", [])
    ]
    if isinstance(data.get("aliases"), str):
        data["aliases"] = _read_yaml(config_path.parent / data["aliases"])
    return AppConfig(**data)
