"""Shared helpers: free ports and a test configuration: the embedded default's settings serving tiny-sd."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from pydantic import SecretStr

from deployments.config import VariantConfig
from serve_app.config import CONFIG_DIR, AppConfig, load_config

TEST_SIGNING_KEY = "test-signing-key"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def load_variant(name: str) -> VariantConfig:
    """A variant shipped in serve_app/configs/variants."""
    return VariantConfig(**yaml.safe_load((CONFIG_DIR / "variants" / f"{name}.yaml").read_text()))


def make_test_config(storage_dir: Path, **overrides: object) -> AppConfig:
    """The embedded default with storage in ``storage_dir`` and a known signing key, serving only the
    random ``tiny-sd``: a Stable-Diffusion-shaped pipeline that edits, inpaints and takes two sizes."""
    base = load_config()
    storage = base.storage.model_copy(
        update={"url": f"file://{storage_dir}", "signing_key": SecretStr(TEST_SIGNING_KEY)}
    )
    # Calibrating threads would add seconds to every replica's start; the tests about it turn it on.
    tiny = load_variant("tiny-sd").model_copy(update={"thread_calibration_s": 0})
    update = {"storage": storage, "variants": [tiny], "default_model": "tiny-sd"}
    return base.model_copy(update={**update, **overrides})


@pytest.fixture
def config(tmp_path: Path) -> AppConfig:
    return make_test_config(tmp_path / "store")


@pytest.fixture
def torch_threads_restored() -> Iterator[None]:
    """For a test that sets torch's threads: they are set back as they were when it ends."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)
