"""Shared helpers: free ports and a test configuration of the embedded default."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from pydantic import SecretStr

from serve_app.config import AppConfig, load_config

TEST_SIGNING_KEY = "test-signing-key"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def make_test_config(storage_dir: Path, **overrides: object) -> AppConfig:
    """The embedded default with storage in ``storage_dir`` and a known signing key."""
    base = load_config()
    storage = base.storage.model_copy(
        update={"url": f"file://{storage_dir}", "signing_key": SecretStr(TEST_SIGNING_KEY)}
    )
    return base.model_copy(update={"storage": storage, **overrides})


@pytest.fixture
def config(tmp_path: Path) -> AppConfig:
    return make_test_config(tmp_path / "store")
