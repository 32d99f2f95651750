"""Scale to zero on real Ray Serve, deployed from a Serve config as `imagegen serve` deploys it.

It starts its own Ray instance, so it lives apart from the integration tests' shared one.

A cold variant starts at zero replicas; its first request waits for a replica and gets its image
(through the official client); once idle it goes back to zero, and the scheduler's slots with it.
A variant whose cold start outlasts its timeout answers 503 with retry-after.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import ray
import yaml
from openai import OpenAI
from ray import serve

from serve_app.config import CONFIG_DIR, DEFAULT_CONFIG_PATH
from serve_app.deploy import APP_NAME, deploy
from serve_app.scheduler import running_replicas
from tests.conftest import TEST_SIGNING_KEY, free_port
from tests.polling import DEADLINE_S, application_running, wait_until

COLD = {"cold": True, "min_replicas": 0, "max_replicas": 1, "upscale_delay_s": 0, "downscale_delay_s": 2}


def write_config(directory: Path, port: int) -> Path:
    data: dict[str, Any] = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
    variant = yaml.safe_load((CONFIG_DIR / "variants" / "tiny-sd.yaml").read_text())
    variant["resources"] = {"num_cpus": 0.5, "max_ongoing_requests": 64}
    variant["autoscaling"] = COLD
    impatient = {**variant, "name": "tiny-sd-impatient", "autoscaling": {**COLD, "cold_start_timeout_s": 0.1}}
    data.update(
        port=port,
        default_model="tiny-sd",
        variants=[variant, impatient],
        storage={"url": f"file://{directory / 'store'}", "signing_key": TEST_SIGNING_KEY},
    )
    path = directory / "autoscaled.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def model_replicas(variant: str) -> int | None:
    return running_replicas(serve.status(), APP_NAME, f"ModelReplica-{variant}")


def slots(variant: str) -> int:
    scheduler = serve.get_deployment_handle("Scheduler", app_name=APP_NAME)
    return int(scheduler.stats.remote().result()["variants"][variant]["capacity"])


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenAI]:
    port = free_port()
    config_path = write_config(tmp_path_factory.mktemp("autoscaled"), port)
    ray.init(
        address="local",
        num_cpus=4,
        include_dashboard=False,
        object_store_memory=256 * 1024**2,
        log_to_driver=False,
    )
    try:
        deploy(config_path)

        wait_until(lambda: application_running(APP_NAME), "the application to run")
        base_url = f"http://127.0.0.1:{port}/v1"
        yield OpenAI(base_url=base_url, api_key="sk-test", max_retries=0, timeout=DEADLINE_S)
    finally:
        serve.shutdown()
        ray.shutdown()


def test_a_cold_variant_answers_its_first_request_and_returns_to_zero(client: OpenAI) -> None:
    assert model_replicas("tiny-sd") == 0
    assert slots("tiny-sd") == 0

    result = client.images.generate(model="tiny-sd", prompt="a lighthouse", size="64x64", n=2)

    assert len(result.data) == 2 and all(image.b64_json for image in result.data)
    wait_until(lambda: model_replicas("tiny-sd") == 0, "the idle variant to scale back to zero")
    wait_until(lambda: slots("tiny-sd") == 0, "the scheduler's slots to follow it to zero")


def test_a_cold_start_longer_than_its_timeout_is_a_503_with_retry_after(client: OpenAI) -> None:
    with pytest.raises(openai.APIStatusError) as failure:
        client.images.generate(model="tiny-sd-impatient", prompt="a lighthouse", size="64x64")

    assert failure.value.status_code == 503
    assert failure.value.response.headers["retry-after"] == "10"
    assert failure.value.code == "model_starting"
