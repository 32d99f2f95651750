"""Service configuration: one YAML file, overridable from the environment.

`AppConfig` composes the stages' own settings (deployments/config.py) with the face's: tiers,
the scheduler, auth, and how each CPU stage is deployed.

`load_config()` reads the YAML named by ``IMAGEGEN_CONFIG`` (default: the embedded
``configs/default.yaml``). Any field can be overridden by an environment variable prefixed
``IMAGEGEN_`` with nested fields joined by ``__``, e.g. ``IMAGEGEN_STORAGE__URL=s3://bucket/x``.
Every model forbids unknown keys, so a typo in a YAML file fails when it is read.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from deployments.config import (
    LimitsConfig,
    ResourcesConfig,
    ScalingDelays,
    StorageConfig,
    StrictModel,
    VariantConfig,
)
from deployments.moderation import ModerationConfig
from serve_app.aliases import alias_errors

CONFIG_DIR = Path(__file__).parent / "configs"
DEFAULT_CONFIG_PATH = CONFIG_DIR / "default.yaml"


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


class ChainStageConfig(StageResourcesConfig):
    """Preprocess or postprocess: its own deployment, or run inside its callers (colocated)."""

    colocate: bool = Field(
        True,
        description="Run the stage in the process that calls it (the ingress; the scheduler for jobs) "
        "instead of as its own deployment: no hop through Serve each way and no serialization "
        "between it and its caller, at the cost of scaling with the caller. Set false to scale "
        "the stage apart (its own replicas, resources and autoscaling); a stage given `autoscaling` "
        "is deployed apart unless this says otherwise.",
    )

    @model_validator(mode="before")
    @classmethod
    def _autoscaled_means_deployed(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("autoscaling") is not None and "colocate" not in data:
            return {**data, "colocate": False}
        return data

    @model_validator(mode="after")
    def _deployed_to_scale(self) -> ChainStageConfig:
        if self.colocate and self.autoscaling is not None:
            raise ValueError("a colocated stage scales with its caller: set colocate: false to autoscale it")
        return self


class IngressConfig(StageResourcesConfig):
    """The ingress: behind Serve's proxy, or listening on ``port`` itself (``direct``)."""

    direct: bool = Field(
        False,
        description="`imagegen serve` only: the one ingress replica serves HTTP on `port` itself, "
        "without Serve's proxy in front (a process and a hop fewer per request). `imagegen config "
        "apply` cannot replace an ingress that holds the port: restart the service to change its "
        "config. See docs/architecture.md.",
    )

    colocate_models: bool = Field(
        False,
        description="Run every variant's model replica inside the ingress's own process, not as a "
        "deployment of its own: a single-process service (no hop to the model, a process fewer), "
        "its resources the ingress's plus the variants'. Needs `scheduler.colocate` (and with it "
        "`direct`), preprocess and postprocess colocated, and one replica per variant. See "
        "docs/architecture.md.",
    )

    @model_validator(mode="after")
    def _one_listener(self) -> IngressConfig:
        if self.direct and (self.autoscaling is not None or self.num_replicas != 1):
            raise ValueError("a direct ingress is the one replica listening on `port`: no autoscaling")
        return self


class StageConfig(StrictModel):
    """Resources of the CPU stages around the model."""

    ingress: IngressConfig = IngressConfig(num_cpus=0.1)
    preprocess: ChainStageConfig = ChainStageConfig(num_cpus=0.1)
    postprocess: ChainStageConfig = ChainStageConfig(num_cpus=0.2)


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
    colocate: bool = Field(
        False,
        description="Run the scheduler in the ingress's own process, not as a deployment of its own: "
        "admission then costs no hop (and the service a process fewer). Needs `stages.ingress.direct` "
        "(one ingress, never two at once) and no autoscaling. See docs/architecture.md.",
    )
    # In a rollout the new scheduler takes over once the old one has stopped: a short drain keeps
    # that gap short (a caller still waiting on the old one for slots then asks the new one).
    resources: ResourcesConfig = ResourcesConfig(
        num_cpus=0.1, max_ongoing_requests=100_000, graceful_shutdown_timeout_s=10.0
    )

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

    host: str = Field("127.0.0.1", description="Address the HTTP proxy (or a direct ingress) binds.")
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

    @model_validator(mode="after")
    def _colocated_scheduler_alone(self) -> AppConfig:
        if not self.scheduler.colocate:
            return self
        if not self.stages.ingress.direct:
            raise ValueError(
                "scheduler.colocate needs stages.ingress.direct: the scheduler owns queue order and "
                "jobs, so it may live only in an ingress that is never run twice at once"
            )
        scaled = [variant.name for variant in self.variants if variant.autoscaling]
        scaled += [name for name in ("preprocess", "postprocess") if getattr(self.stages, name).autoscaling]
        if scaled:
            raise ValueError(
                f"scheduler.colocate: autoscaling ({', '.join(scaled)}) reads its backlog from the "
                "Scheduler deployment; deploy the scheduler apart to autoscale"
            )
        return self

    @model_validator(mode="after")
    def _colocated_models_in_one_process(self) -> AppConfig:
        if not self.stages.ingress.colocate_models:
            return self
        apart = [name for name in ("preprocess", "postprocess") if not getattr(self.stages, name).colocate]
        if not self.scheduler.colocate or apart:
            needs = ["scheduler.colocate"] * (not self.scheduler.colocate)
            needs += [f"stages.{name}.colocate" for name in apart]
            raise ValueError(
                f"stages.ingress.colocate_models needs {' and '.join(needs)}: every caller of a model "
                "replica must share its process"
            )
        if several := [variant.name for variant in self.variants if variant.resources.num_replicas != 1]:
            raise ValueError(
                f"stages.ingress.colocate_models: variants {several} ask for several replicas; the one "
                "ingress holds one replica of each"
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


def config_path(path: str | os.PathLike[str] | None = None) -> Path:
    """``path``, else the file ``IMAGEGEN_CONFIG`` names, else the embedded default."""
    return Path(path or os.environ.get("IMAGEGEN_CONFIG") or DEFAULT_CONFIG_PATH)


def read_config_data(path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """The YAML config as one mapping: variant entries, and ``aliases``, may be paths to YAML
    files relative to it, and are read in."""
    source = config_path(path)
    data = _read_yaml(source)
    data["variants"] = [
        _read_yaml(source.parent / entry) if isinstance(entry, str) else entry
        for entry in data.get("variants", [])
    ]
    if isinstance(data.get("aliases"), str):
        data["aliases"] = _read_yaml(source.parent / data["aliases"])
    return data


def load_config(path: str | os.PathLike[str] | None = None) -> AppConfig:
    """Read and check the YAML config (see `read_config_data`); the environment overrides it."""
    return AppConfig(**read_config_data(path))
