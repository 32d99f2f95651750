"""The GPU path's choices (dtype, attention backend, channels-last, compile) without a GPU.

The real tiny pipeline is loaded; only what lies below the family's boundary is faked: torch
says a CUDA device is visible, moving the pipeline to it is recorded instead of done, and
xformers is present or not.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import DiffusionPipeline

from deployments.config import VariantConfig
from deployments.models import diffusion
from deployments.models.diffusion import DiffusionFamily
from tests.conftest import make_test_config

XFORMERS_SPEC = importlib.util.spec_from_loader("xformers", loader=None)


class FakeGpu:
    """What the family asked of the (absent) GPU."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, xformers: bool) -> None:
        self.devices: list[str] = []
        self.xformers_enabled = False
        self.compiled: list[dict[str, Any]] = []
        real_find_spec = importlib.util.find_spec
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

        def move(pipeline: Any, device: str, *args: object, **kwargs: object) -> Any:
            self.devices.append(device)
            return pipeline

        def enable_xformers(pipeline: Any, *args: object) -> None:
            self.xformers_enabled = True

        def compile_module(module: torch.nn.Module, **options: Any) -> None:
            self.compiled.append(options)

        monkeypatch.setattr(DiffusionPipeline, "to", move)
        monkeypatch.setattr(DiffusionPipeline, "enable_xformers_memory_efficient_attention", enable_xformers)
        monkeypatch.setattr(torch.nn.Module, "compile", compile_module)
        monkeypatch.setattr(
            diffusion.importlib.util,
            "find_spec",
            lambda name, *args: (
                (XFORMERS_SPEC if xformers else None) if name == "xformers" else real_find_spec(name, *args)
            ),
        )


def tiny_sd(tmp_path: Path, **changes: object) -> tuple[VariantConfig, Path]:
    config = make_test_config(tmp_path / "store")
    return config.variants[0].model_copy(update=changes), config.cache_dir


def load(variant: VariantConfig, cache_dir: Path) -> tuple[DiffusionFamily, str]:
    family = DiffusionFamily(variant, cache_dir)
    return family, family.load()


@pytest.mark.parametrize("xformers", [True, False])
def test_on_a_gpu_half_precision_channels_last_and_the_best_attention(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, xformers: bool
) -> None:
    variant, cache_dir = tiny_sd(tmp_path)
    gpu = FakeGpu(monkeypatch, xformers=xformers)
    family, description = load(variant, cache_dir)
    unet = family.pipeline.unet
    assert gpu.devices == ["cuda"]
    assert unet.dtype == torch.float16 and family.pipeline.vae.dtype == torch.float16
    assert unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert not unet.conv_in.weight.is_contiguous()  # really reordered, not contiguous either way
    assert gpu.xformers_enabled is xformers
    assert gpu.compiled == []  # compile is opt-in
    attention = "xformers" if xformers else "sdpa"
    assert f"on cuda, dtype=float16, attention={attention}, compile=False" in description


def test_compile_on_a_gpu_only_when_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    variant, cache_dir = tiny_sd(tmp_path, compile=True)
    gpu = FakeGpu(monkeypatch, xformers=False)
    _, description = load(variant, cache_dir)
    assert gpu.compiled == [{"mode": "max-autotune-no-cudagraphs"}]
    assert "compile=True" in description


def test_on_a_cpu_full_precision_and_no_gpu_tricks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    variant, cache_dir = tiny_sd(tmp_path, compile=True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    family, description = load(variant, cache_dir)
    unet = family.pipeline.unet
    assert unet.device.type == "cpu" and unet.dtype == torch.float32
    assert unet.conv_in.weight.is_contiguous()
    assert "on cpu, dtype=float32, attention=sdpa, compile=False" in description


def test_an_explicit_dtype_wins_and_cuda_without_a_gpu_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    variant, cache_dir = tiny_sd(tmp_path, dtype="bfloat16")
    FakeGpu(monkeypatch, xformers=False)
    family, description = load(variant, cache_dir)
    assert family.pipeline.unet.dtype == torch.bfloat16 and "dtype=bfloat16" in description
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="no CUDA device"):
        load(variant.model_copy(update={"device": "cuda"}), cache_dir)
