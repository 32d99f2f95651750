"""Images and the generation log on a real S3 API (moto's server on loopback), including an outage."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from openai import OpenAI
from PIL import Image
from ray import serve

from deployments.config import GenerationLogConfig
from deployments.generation_log import SCHEMA
from deployments.model_replica import ReplicaStats
from deployments.storage import ObjectStore
from serve_app.app import build_app
from serve_app.config import AppConfig
from serve_app.log_report import read_generation_log
from tests.integration.conftest import ProxiedS3, RunningService
from tests.integration.tcp_proxy import TcpProxy

BUCKET = "imagegen-test"
PREFIX = "images"
APP_NAME = "imagegen-s3"
ROUTE = "/s3"
KEY_PATTERN = re.compile(rf"^{PREFIX}/local/\d{{4}}/\d{{2}}/\d{{2}}/[0-9a-f]{{32}}\.png$")
RECOVERY_DEADLINE_S = 30.0
# What the ingress answers while its circuit is open (a request whose upload failed gets less advice).
FAIL_FAST_MESSAGE = "or ask for response_format=b64_json"


@dataclass(frozen=True)
class S3Service:
    base_url: str
    config: AppConfig
    proxy: TcpProxy
    s3: object  # a boto3 client talking to moto directly, never through the proxy

    def object_keys(self, prefix: str = PREFIX) -> list[str]:
        listing = self.s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix)  # type: ignore[attr-defined]
        return [item["Key"] for item in listing.get("Contents", [])]


@pytest.fixture(scope="module")
def s3_service(service: RunningService, proxied_s3: ProxiedS3) -> Iterator[S3Service]:
    storage = proxied_s3.storage(
        BUCKET,
        PREFIX,
        breaker_reset_s=5.0,  # far longer than the refusals the outage test counts while it is open
        log=GenerationLogConfig(flush_rows=1, flush_interval_s=1.0),
    )
    config = service.config.model_copy(update={"storage": storage})
    serve.run(build_app(config), name=APP_NAME, route_prefix=ROUTE)
    try:
        yield S3Service(f"{service.base_url}{ROUTE}", config, proxied_s3.proxy, proxied_s3.client)
    finally:
        serve.delete(APP_NAME)


@pytest.fixture
def client(s3_service: S3Service) -> OpenAI:
    return OpenAI(base_url=f"{s3_service.base_url}/v1", api_key="sk-test", max_retries=0, timeout=60)


def generate_url(http: httpx.Client, base_url: str, **extra: object) -> httpx.Response:
    body = {"prompt": "an s3 bucket", "size": "64x64", "response_format": "url", **extra}
    return http.post(f"{base_url}/v1/images/generations", json=body)


def test_url_is_presigned_and_object_key_is_server_built(client: OpenAI, s3_service: S3Service) -> None:
    result = client.images.generate(prompt="a bucket of paint", size="128x128", response_format="url")
    assert result.data is not None and result.data[0].url
    url = httpx.URL(result.data[0].url)
    assert url.port == s3_service.proxy.port
    assert "X-Amz-Signature" in str(url) and url.params["X-Amz-Expires"] == "3600"
    fetched = httpx.get(url, timeout=30)
    assert fetched.status_code == 200
    assert Image.open(io.BytesIO(fetched.content)).size == (128, 128)
    key = url.path.removeprefix(f"/{BUCKET}/")
    assert KEY_PATTERN.match(key), key
    assert key in s3_service.object_keys()


def images_generated() -> int:
    stats: ReplicaStats = (
        serve.get_deployment_handle("ModelReplica-tiny-sd", app_name=APP_NAME).stats.remote().result()
    )
    return stats.generated


def ingress_breaker_state() -> str:
    ingress = serve.get_deployment_handle("Ingress", app_name=APP_NAME)
    return str(ingress.storage_breaker_state.remote().result())


def assert_storage_unavailable(response: httpx.Response) -> str:
    assert response.status_code == 503, response.text
    error = response.json()["error"]
    assert error["code"] == "storage_unavailable"
    assert int(response.headers["retry-after"]) >= 1
    return str(error["message"])


def test_store_outage_fails_fast_keeps_b64_and_recovers(http: httpx.Client, s3_service: S3Service) -> None:
    assert generate_url(http, s3_service.base_url).status_code == 200
    s3_service.proxy.cut()
    try:
        # The first requests do their model work, exhaust the upload's retries and open the circuit.
        deadline = time.monotonic() + RECOVERY_DEADLINE_S
        while FAIL_FAST_MESSAGE not in assert_storage_unavailable(generate_url(http, s3_service.base_url)):
            assert time.monotonic() < deadline, "the circuit never opened"
        assert ingress_breaker_state() == "open"
        # While it is open, requests for a url are refused before any model work.
        generated = images_generated()
        for _ in range(3):
            message = assert_storage_unavailable(generate_url(http, s3_service.base_url))
            assert FAIL_FAST_MESSAGE in message
        assert images_generated() == generated
        assert ingress_breaker_state() == "open"  # refused by the open circuit, not by spent retries
        b64 = http.post(
            f"{s3_service.base_url}/v1/images/generations",
            json={"prompt": "still here", "size": "64x64"},
            headers={"x-request-id": "logged-during-outage"},
        )
        assert b64.status_code == 200 and b64.json()["data"][0]["b64_json"]
        assert http.get(f"{s3_service.base_url}/readyz").status_code == 200
    finally:
        s3_service.proxy.restore()
    deadline = time.monotonic() + RECOVERY_DEADLINE_S
    while (response := generate_url(http, s3_service.base_url)).status_code == 503:
        assert time.monotonic() < deadline, "the store came back but requests still fail"
    assert response.status_code == 200, response.text
    assert ingress_breaker_state() == "closed"  # the probe that succeeded closed it
    for key in s3_service.object_keys(f"{PREFIX}/local/"):  # no partial objects: every image decodes whole
        body = s3_service.s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()  # type: ignore[attr-defined]
        assert KEY_PATTERN.match(key)
        Image.open(io.BytesIO(body)).load()
    # The row of the request made while the store was cut stayed buffered and is written now.
    logged = wait_for_log_rows(s3_service, ["logged-during-outage"], 1)
    assert logged.column("status").to_pylist() == ["succeeded"]


def wait_for_log_rows(s3_service: S3Service, request_ids: list[str], count: int) -> pa.Table:
    """Poll the dataset until ``count`` rows of ``request_ids`` are there (the log flushes by itself)."""
    store = ObjectStore(s3_service.config.storage)
    deadline = time.monotonic() + RECOVERY_DEADLINE_S
    while True:
        table = read_generation_log(store)
        ours = table.filter(pc.is_in(table.column("request_id"), value_set=pa.array(request_ids)))
        if ours.num_rows >= count:
            return ours
        assert time.monotonic() < deadline, f"only {ours.num_rows} of {count} rows were logged"
        time.sleep(0.2)


def test_generation_log_rows_match_and_report_agrees(http: httpx.Client, s3_service: S3Service) -> None:
    request_ids = [f"log-test-{index}" for index in range(3)]
    for request_id in request_ids:
        response = http.post(
            f"{s3_service.base_url}/v1/images/generations",
            json={"prompt": "logged", "size": "64x64", "n": 2},
            headers={"x-request-id": request_id},
        )
        assert response.status_code == 200
        assert response.headers["x-request-id"] == request_id
    ours = wait_for_log_rows(s3_service, request_ids, 6)
    store = ObjectStore(s3_service.config.storage)
    table = read_generation_log(store)
    assert ours.num_rows == 6
    assert table.schema.remove_metadata() == SCHEMA
    assert set(ours.column("status").to_pylist()) == {"succeeded"}
    assert all(size >= 1 for size in ours.column("batch_size").to_pylist())
    assert all(value > 0 for value in ours.column("model_s").to_pylist())
    log_keys = s3_service.object_keys(f"{PREFIX}/generation_log")
    assert log_keys and all(key.endswith(".parquet") and "/date=" in key for key in log_keys)

    env = {
        **os.environ,
        "IMAGEGEN_STORAGE__URL": s3_service.config.storage.url,
        "IMAGEGEN_STORAGE__ENDPOINT_URL": str(s3_service.config.storage.endpoint_url),
    }
    report = subprocess.run(
        [sys.executable, "-m", "serve_app.cli", "report", "--since", "1h"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    table = read_generation_log(store)
    failed = table.filter(pc.equal(table.column("status"), "failed")).num_rows
    assert f"tiny-sd: {table.num_rows} images, {failed} failed" in report
    assert "| model |" in report
