"""cluster.yaml passes Ray's own cluster schema and keeps the control plane off public addresses."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER_YAML = Path(__file__).resolve().parents[2] / "cluster.yaml"


def cluster() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(CLUSTER_YAML.read_text())
    return data


def test_cluster_yaml_passes_rays_schema() -> None:
    validate_config(prepare_config(cluster()))


def test_a_misspelt_key_fails_rays_schema() -> None:
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config({**cluster(), "max_worker": 3}))


def test_cpu_head_and_at_least_two_gpu_worker_types() -> None:
    config = cluster()
    node_types = config["available_node_types"]
    assert node_types[config["head_node_type"]]["resources"]["GPU"] == 0  # no model replica on the head
    gpu_types = [spec for spec in node_types.values() if spec["resources"].get("GPU", 0) > 0]
    assert len(gpu_types) >= 2
    assert all(spec["max_workers"] >= spec["min_workers"] >= 0 for spec in gpu_types)


def test_dashboard_and_gcs_never_listen_on_a_public_address() -> None:
    config = cluster()
    commands = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in commands
    assert "0.0.0.0" not in CLUSTER_YAML.read_text()
    assert config["provider"]["use_internal_ips"] is True
