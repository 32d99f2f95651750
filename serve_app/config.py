"""Service configuration: one YAML file, overridable from the environment.

`load_config()` reads the YAML named by ``IMAGEGEN_CONFIG`` (default: the embedded
``configs/default.yaml``). Any field can be overridden by an environment variable prefixed
``IMAGEGEN_`` with nested fields joined by ``__``, e.g. ``IMAGEGEN_STORAGE__URL=s3://bucket/x``.
Every model forbids unknown keys, so a typo in a YAML file fails when it is read.
"""

from __future__ import annotations

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

    def ray_actor_options(self) -> dict[str, float]:
        return {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}


class QualitySteps(StrictModel):
    """Denoising steps for each OpenAI ``quality`` value (``auto`` means ``medium``)."""

    low: int = Field(2, ge=1, le=200)
    medium: int = Field(4, ge=1, le=200)
    high: int = Field(8, ge=1, le=200)


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
        if max(self.steps.low, self.steps.medium, self.steps.high) > self.max_steps:
            raise ValueError("steps per quality must not exceed max_steps")
        return self

    @property
    def default_size(self) -> str:
        return self.sizes[0]


class StorageConfig(StrictModel):
    """Where images are written and how clients fetch them."""

    url: str = Field("file://./data", description="fsspec URL of the store root: file://... or s3://...")
    signing_key: SecretStr | None = Field(
        None, description="HMAC key for file:// URLs; random per start when unset (URLs then die on restart)."
    )
    url_ttl_s: int = Field(3600, ge=1, le=7 * 24 * 3600, description="Lifetime of a returned URL.")
    public_base_url: str | None = Field(
        None, description="Base URL clients use to reach the service; defaults to the request's own."
    )

    @field_validator("url")
    @classmethod
    def _local_paths_absolute(cls, url: str) -> str:
        # Ray workers may run elsewhere than the driver's directory: pin relative paths now.
        if url.startswith("file://"):
            return "file://" + str(Path(url.removeprefix("file://")).expanduser().resolve())
        if "://" not in url:
            raise ValueError(f"storage url needs a scheme (file:// or s3://), got {url!r}")
        return url


class StageConfig(StrictModel):
    """Resources of the CPU stages around the model."""

    ingress: ResourcesConfig = ResourcesConfig(num_cpus=0.1)
    preprocess: ResourcesConfig = ResourcesConfig(num_cpus=0.1)
    postprocess: ResourcesConfig = ResourcesConfig(num_cpus=0.2)


class LimitsConfig(StrictModel):
    max_prompt_chars: int = Field(32000, ge=1)
    max_images_per_request: int = Field(10, ge=1, le=10)
    max_request_bytes: int = Field(1 << 20, ge=1024, description="Largest JSON body accepted.")


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
    storage: StorageConfig = StorageConfig()
    stages: StageConfig = StageConfig()
    limits: LimitsConfig = LimitsConfig()

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
        return self

    def variant(self, name: str | None) -> VariantConfig | None:
        wanted = name or self.default_model or self.variants[0].name
        return next((variant for variant in self.variants if variant.name == wanted), None)

    def with_signing_key(self) -> AppConfig:
        """A copy whose storage has a signing key, generating one when none is configured."""
        if self.storage.signing_key is not None:
            return self
        storage = self.storage.model_copy(update={"signing_key": SecretStr(secrets.token_hex(32))})
        return self.model_copy(update={"storage": storage})


def _read_yaml(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    return data


def load_config(path: str | os.PathLike[str] | None = None) -> AppConfig:
    """Read the YAML config (variant entries may be paths to variant YAML files, relative to it)."""
    config_path = Path(path or os.environ.get("IMAGEGEN_CONFIG") or DEFAULT_CONFIG_PATH)
    data = _read_yaml(config_path)
    data["variants"] = [
        _read_yaml(config_path.parent / entry) if isinstance(entry, str) else entry
        for entry in data.get("variants", [])
    ]
    return AppConfig(**data)
