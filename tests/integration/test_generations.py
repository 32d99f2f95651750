"""/v1/images/generations through real HTTP, real Ray Serve and the official openai client."""

from __future__ import annotations

import base64
import io
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from openai import OpenAI
from PIL import Image
from ray.serve.handle import DeploymentHandle

from deployments.storage import UrlSigner
from tests.conftest import TEST_SIGNING_KEY
from tests.integration.conftest import RunningService


def decode(b64_json: str | None) -> Image.Image:
    assert b64_json is not None
    return Image.open(io.BytesIO(base64.b64decode(b64_json)))


def test_openai_client_b64_json(openai_client: OpenAI) -> None:
    result = openai_client.images.generate(
        model="tiny-sd", prompt="a lighthouse at dusk", size="64x64", response_format="b64_json"
    )
    assert result.data is not None and len(result.data) == 1
    image = decode(result.data[0].b64_json)
    assert image.format == "PNG"
    assert image.size == (64, 64)
    assert result.size == "64x64"
    assert result.output_format == "png"


def test_openai_client_url_is_fetchable_at_requested_size(
    openai_client: OpenAI, service: RunningService
) -> None:
    result = openai_client.images.generate(prompt="a lighthouse", size="128x128", response_format="url")
    assert result.data is not None
    url = result.data[0].url
    assert url is not None and url.startswith(service.base_url)
    fetched = httpx.get(url, timeout=30)
    assert fetched.status_code == 200
    assert fetched.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(fetched.content)).size == (128, 128)
    stored = list(service.storage_dir.rglob("*.png"))
    assert any(url.split("?")[0].endswith(path.name) for path in stored)


def test_n_images_differ(openai_client: OpenAI) -> None:
    result = openai_client.images.generate(prompt="three cats", n=3, size="64x64")
    assert result.data is not None
    payloads = [item.b64_json for item in result.data]
    assert len(payloads) == 3
    assert len(set(payloads)) == 3


def test_same_seed_same_bytes(openai_client: OpenAI) -> None:
    def generate() -> str | None:
        result = openai_client.images.generate(
            prompt="a seeded tree", size="64x64", extra_body={"seed": 1234}
        )
        assert result.data is not None
        return result.data[0].b64_json

    first, second = generate(), generate()
    assert first == second
    other = openai_client.images.generate(prompt="a seeded tree", size="64x64", extra_body={"seed": 1235})
    assert other.data is not None and other.data[0].b64_json != first


def test_image_i_of_n_matches_seed_plus_i(openai_client: OpenAI) -> None:
    many = openai_client.images.generate(prompt="seeds", n=2, size="64x64", extra_body={"seed": 50})
    single = openai_client.images.generate(prompt="seeds", size="64x64", extra_body={"seed": 51})
    assert many.data is not None and single.data is not None
    assert [item.seed for item in many.data] == [50, 51]  # type: ignore[attr-defined]
    # A batch of 2 and a batch of 1 sum floats in a different order: equal up to rounding.
    in_batch = np.asarray(decode(many.data[1].b64_json), dtype=np.int16)
    alone = np.asarray(decode(single.data[0].b64_json), dtype=np.int16)
    assert np.abs(in_batch - alone).max() <= 2


@pytest.mark.parametrize(
    ("output_format", "pil_format"), [("png", "PNG"), ("jpeg", "JPEG"), ("webp", "WEBP")]
)
def test_output_formats_decode(openai_client: OpenAI, output_format: str, pil_format: str) -> None:
    result = openai_client.images.generate(
        prompt="formats",
        size="64x64",
        output_format=output_format,  # type: ignore[arg-type]
        output_compression=50,
    )
    assert result.data is not None
    image = decode(result.data[0].b64_json)
    assert image.format == pil_format
    assert image.size == (64, 64)
    assert not image.info.get("exif")


def test_concurrent_requests_share_batches(
    http: httpx.Client, model_replica: DeploymentHandle, service: RunningService
) -> None:
    def generate(index: int) -> list[int]:
        response = http.post("/v1/images/generations", json={"prompt": f"crowd {index}", "size": "64x64"})
        assert response.status_code == 200, response.text
        return [int(size) for size in response.headers["x-imagegen-batch-size"].split(",")]

    # A batch leaves only when full (the longest wait allowed is far beyond the arrivals), so
    # eight concurrent requests share exactly one forward pass, however slow the machine.
    model_replica.reconfigure.remote({"max_batch_size": 8, "batch_wait_timeout_s": 10.0}).result()
    try:
        with ThreadPoolExecutor(max_workers=8) as pool:
            batch_sizes = [size for sizes in pool.map(generate, range(8)) for size in sizes]
    finally:
        model_replica.reconfigure.remote(service.config.variants[0].batching.model_dump()).result()
    assert batch_sizes == [8] * 8


def test_response_reports_stage_timings(http: httpx.Client) -> None:
    response = http.post("/v1/images/generations", json={"prompt": "timed", "size": "64x64"})
    assert response.status_code == 200
    stages = {part.split(";")[0].strip() for part in response.headers["server-timing"].split(",")}
    assert {"preprocess", "queue", "model", "postprocess"} <= stages
    assert response.headers["x-request-id"]


def assert_openai_error(response: httpx.Response, status: int, param: str | None = None) -> dict[str, object]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    if param is not None:
        assert error["param"] == param
    return error


def test_unknown_model_is_404_with_param(http: httpx.Client, openai_client: OpenAI) -> None:
    response = http.post("/v1/images/generations", json={"prompt": "x", "model": "no-such-model"})
    error = assert_openai_error(response, 404, param="model")
    assert error["code"] == "model_not_found"
    from openai import NotFoundError

    with pytest.raises(NotFoundError):
        openai_client.images.generate(prompt="x", model="no-such-model")


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "x", "size": "999x999"}, "size"),
        ({"prompt": "x", "n": 0}, "n"),
        ({"prompt": "x", "n": 11}, "n"),
        ({"prompt": "x", "quality": "ultra"}, "quality"),
        ({"prompt": "x", "response_format": "gif"}, "response_format"),
        ({"prompt": "x", "output_format": "bmp"}, "output_format"),
        ({"prompt": "x", "output_compression": 101}, "output_compression"),
        ({"prompt": "x", "background": "transparent"}, "background"),
        ({"prompt": "x", "num_inference_steps": 10_000}, "num_inference_steps"),
        ({"prompt": "x", "seed": -1}, "seed"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": "   "}, "prompt"),
        ({"prompt": 42}, "prompt"),
        ({"size": "64x64"}, "prompt"),
        ({"prompt": "x", "unknown_field": 1}, "unknown_field"),
    ],
)
def test_invalid_fields_are_400_with_param(http: httpx.Client, body: dict[str, object], param: str) -> None:
    assert_openai_error(http.post("/v1/images/generations", json=body), 400, param=param)


def test_malformed_json_is_400(http: httpx.Client) -> None:
    response = http.post(
        "/v1/images/generations", content=b'{"prompt": "x",', headers={"content-type": "application/json"}
    )
    assert assert_openai_error(response, 400)["code"] == "invalid_json"
    response = http.post("/v1/images/generations", json=["not", "an", "object"])
    assert_openai_error(response, 400)


def test_wrong_content_type_is_415(http: httpx.Client) -> None:
    response = http.post(
        "/v1/images/generations", content=b"prompt=x", headers={"content-type": "text/plain"}
    )
    assert_openai_error(response, 415)


def test_tampered_and_expired_urls_are_403(http: httpx.Client, openai_client: OpenAI) -> None:
    result = openai_client.images.generate(prompt="secret", size="64x64", response_format="url")
    assert result.data is not None and result.data[0].url
    url = httpx.URL(result.data[0].url)
    assert http.get(url).status_code == 200
    key = url.path.removeprefix("/v1/images/files/")
    tampered = url.copy_set_param("signature", "0" * 64)
    assert_openai_error(http.get(tampered), 403)
    longer = url.copy_set_param("expires", str(int(url.params["expires"]) + 10))
    assert_openai_error(http.get(longer), 403)
    expired_at = int(time.time()) - 1
    signer = UrlSigner(TEST_SIGNING_KEY)
    expired = url.copy_merge_params(
        {"expires": str(expired_at), "signature": signer.signature(key, expired_at)}
    )
    assert_openai_error(http.get(expired), 403)
    assert_openai_error(http.get("/v1/images/files/..%2F..%2Fetc%2Fpasswd?expires=1&signature=x"), 403)


def test_models_health_and_readiness(http: httpx.Client, openai_client: OpenAI) -> None:
    assert [model.id for model in openai_client.models.list()] == ["tiny-sd"]
    assert http.get("/healthz").status_code == 200
    ready = http.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["ready"] is True
    assert set(ready.json()["stages"]) == {"scheduler", "preprocess", "postprocess", "model:tiny-sd"}


def test_unknown_route_is_openai_shaped_404(http: httpx.Client) -> None:
    assert_openai_error(http.get("/v1/nothing-here"), 404)


def test_openapi_documents_extensions(http: httpx.Client) -> None:
    schema = http.get("/openapi.json").json()
    fields = schema["components"]["schemas"]["ImageGenerationRequest"]["properties"]
    for extension in ("seed", "negative_prompt", "num_inference_steps", "guidance_scale"):
        assert "Extension" in fields[extension]["description"]
