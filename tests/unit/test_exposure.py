"""Open local mode (no API keys) stays on loopback unless the operator says otherwise."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from serve_app.config import AppConfig, load_config


def config_with(host: str, **auth: object) -> AppConfig:
    """The embedded default, validated again with another host and auth settings."""
    data = load_config().model_dump()
    data["host"] = host
    data["auth"].update(auth)
    return AppConfig(**data)


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost", "127.0.0.2"])
def test_open_mode_on_loopback_is_allowed(host: str) -> None:
    assert config_with(host).host == host


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.0.0.5", "imagegen.example.com"])
def test_open_mode_refuses_other_addresses(host: str) -> None:
    with pytest.raises(ValidationError, match="not a loopback address"):
        config_with(host)


def test_open_mode_on_the_network_when_explicitly_allowed_or_keyed() -> None:
    assert config_with("0.0.0.0", allow_open_network=True).auth.allow_open_network
    assert config_with("0.0.0.0", keys_file="/etc/imagegen/keys.yaml").host == "0.0.0.0"
