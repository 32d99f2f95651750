"""The embedded digits-ar model through real Ray Serve, real HTTP and the official openai client: the
autoregressive family keeps the diffusion family's contract (sizes, seeds, batches, streaming,
cancellation, edits), and draws the digit it is asked for."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import numpy as np
import pytest
from openai import OpenAI
from PIL import Image
from ray import serve
from ray.serve.handle import DeploymentHandle

from benchmarks.quality import digit_reader, read_digits
from deployments.model_replica import ReplicaStats
from serve_app.app import build_app
from tests.conftest import load_variant
from tests.integration.conftest import RunningService
from tests.integration.test_edits_and_streaming import png_file, wait_for_stats
from tests.integration.test_generations import assert_openai_error

APP_NAME = "imagegen-digits"
ROUTE = "/digits"


@pytest.fixture(scope="module")
def digits_url(service: RunningService) -> Iterator[str]:
    config = service.config.model_copy(
        update={"variants": [load_variant("digits-ar")], "default_model": "digits-ar"}
    )
    serve.run(build_app(config), name=APP_NAME, route_prefix=ROUTE)
    try:
        yield f"{service.base_url}{ROUTE}"
    finally:
        serve.delete(APP_NAME)


@pytest.fixture
def client(digits_url: str) -> OpenAI:
    return OpenAI(base_url=f"{digits_url}/v1", api_key="sk-test", max_retries=0, timeout=120)


@pytest.fixture
def ar_replica(digits_url: str) -> DeploymentHandle:
    return serve.get_deployment_handle("ModelReplica-digits-ar", app_name=APP_NAME)


def pixels(b64_json: str | None) -> np.ndarray:
    assert b64_json is not None
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64_json))).convert("RGB"))


def white_rows_at_the_bottom(image: np.ndarray) -> int:
    """Pixel rows still blank paper at the bottom of a preview: the rows of tokens not yet written."""
    white = (image == 255).all(axis=(1, 2))[::-1]
    return len(white) if white.all() else int(np.argmin(white))


def generate(client: OpenAI, **fields: Any) -> list[np.ndarray]:
    extra = {key: fields.pop(key) for key in ("seed", "guidance_scale") if key in fields}
    result = client.images.generate(**{"model": "digits-ar", "prompt": "7", **fields}, extra_body=extra)
    assert result.data is not None
    return [pixels(image.b64_json) for image in result.data]


def test_sizes_and_n(client: OpenAI) -> None:
    images = generate(client, size="128x128", n=2, seed=3)
    assert [image.shape for image in images] == [(128, 128, 3)] * 2
    assert not np.array_equal(images[0], images[1])


def test_same_seed_same_bytes_and_image_i_of_n_is_seed_plus_i(client: OpenAI) -> None:
    two = generate(client, prompt="the digit four", n=2, seed=40, size="64x64")
    assert np.array_equal(two[0], generate(client, prompt="the digit four", seed=40, size="64x64")[0])
    assert np.array_equal(two[1], generate(client, prompt="the digit four", seed=41, size="64x64")[0])


def test_concurrent_requests_share_one_decode(digits_url: str) -> None:
    def batch_sizes(index: int) -> list[int]:
        body = {"model": "digits-ar", "prompt": str(index % 10), "size": "64x64"}
        response = httpx.post(f"{digits_url}/v1/images/generations", json=body, timeout=120)
        assert response.status_code == 200, response.text
        return [int(size) for size in response.headers["x-imagegen-batch-size"].split(",")]

    with ThreadPoolExecutor(max_workers=8) as pool:
        sizes = [size for sizes in pool.map(batch_sizes, range(8)) for size in sizes]
    assert len(sizes) == 8 and max(sizes) > 1


def test_stream_sends_rows_as_they_complete_then_the_image(client: OpenAI) -> None:
    events = list(
        client.images.generate(model="digits-ar", prompt="3", size="64x64", stream=True, partial_images=2)
    )
    assert [event.type for event in events] == [
        "image_generation.partial_image",
        "image_generation.partial_image",
        "image_generation.completed",
    ]
    first, second = (pixels(event.b64_json) for event in events[:2])  # type: ignore[union-attr]
    assert 0 < white_rows_at_the_bottom(second) < white_rows_at_the_bottom(first) < 64


def test_a_disconnect_mid_stream_frees_the_slot(client: OpenAI, ar_replica: DeploymentHandle) -> None:
    before: ReplicaStats = ar_replica.stats.remote().result()
    stream = client.images.generate(
        model="digits-ar", prompt="9", size="64x64", stream=True, partial_images=3
    )
    assert next(iter(stream)).type == "image_generation.partial_image"
    stream.close()
    after = wait_for_stats(ar_replica, lambda stats: stats.in_flight == 0 and stats.running == 0)
    assert (after.in_flight, after.running) == (0, 0)
    # Cancelled between tokens, or finished first on a fast machine: either way nothing is left running.
    assert after.cancelled + after.stopped_passes >= before.cancelled + before.stopped_passes
    assert len(generate(client, prompt="next in line")) == 1


def test_edits_run_on_the_autoregressive_family(client: OpenAI) -> None:
    start = Image.fromarray(generate(client, prompt="0", seed=5, size="64x64")[0])
    buffer = io.BytesIO()
    start.save(buffer, format="PNG")
    result = client.images.edit(
        model="digits-ar", image=png_file(buffer.getvalue()), prompt="8", size="64x64"
    )
    assert result.data is not None and pixels(result.data[0].b64_json).shape == (64, 64, 3)


def test_unknown_size_is_400_with_param(digits_url: str) -> None:
    body = {"model": "digits-ar", "prompt": "7", "size": "96x96"}
    assert_openai_error(httpx.post(f"{digits_url}/v1/images/generations", json=body, timeout=60), 400, "size")


def test_a_handwritten_3_is_read_as_a_3(client: OpenAI) -> None:
    images = generate(client, prompt="a handwritten 3", n=4, seed=100, size="64x64")
    read = read_digits(digit_reader(), images)
    assert np.sum(read == 3) >= 3, read
