"""One real local Ray Serve deployment of the embedded default, shared by the integration tests."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
import ray
from openai import OpenAI
from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.config import LimitsConfig, StorageConfig
from serve_app.app import build_app
from serve_app.config import AppConfig
from serve_app.replica_environment import PROXY_ENVIRONMENT
from tests.conftest import free_port, make_test_config
from tests.integration.tcp_proxy import TcpProxy

AWS_TEST_ENVIRONMENT = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}

# Small upload limits, so the oversize uploads the tests send stay small.
TEST_LIMITS = LimitsConfig(max_upload_bytes=256 * 1024, max_total_upload_bytes=1024 * 1024)


@dataclass(frozen=True)
class RunningService:
    base_url: str
    config: AppConfig
    storage_dir: Path


@pytest.fixture(scope="package")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningService]:
    storage_dir = tmp_path_factory.mktemp("store")
    config = make_test_config(storage_dir, limits=TEST_LIMITS)
    port = free_port()
    # Replicas inherit the environment Ray starts with: moto's test credentials go in first.
    patch = pytest.MonkeyPatch()
    for name, value in AWS_TEST_ENVIRONMENT.items():
        patch.setenv(name, value)
    for name, value in PROXY_ENVIRONMENT.items():  # Serve runs as under `imagegen serve`
        patch.setenv(name, value)
    # Logical CPUs: room for a second app (the S3 tests) beside the default one on two cores.
    ray.init(
        address="local",
        num_cpus=4,
        include_dashboard=False,
        object_store_memory=256 * 1024**2,
        log_to_driver=False,  # replica logs stay in /tmp/ray/session_latest/logs
    )
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(config), name="imagegen", route_prefix="/")
        yield RunningService(f"http://127.0.0.1:{port}", config, storage_dir)
    finally:
        serve.shutdown()
        ray.shutdown()
        patch.undo()


@pytest.fixture
def http(service: RunningService) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=service.base_url, timeout=60) as client:
        yield client


@pytest.fixture
def openai_client(service: RunningService) -> OpenAI:
    return OpenAI(base_url=f"{service.base_url}/v1", api_key="sk-test", max_retries=0, timeout=60)


@pytest.fixture
def model_replica(service: RunningService) -> DeploymentHandle:
    """The embedded default's ModelReplica, to read its scheduling state (``stats``)."""
    return serve.get_deployment_handle("ModelReplica-tiny-sd", app_name="imagegen")


@dataclass(frozen=True)
class ProxiedS3:
    """moto's S3 server on loopback, reached through a TcpProxy the tests cut and restore.

    ``client`` is a boto3 client that talks to moto directly, never through the proxy, so a test
    can look at the bucket while the service's way to it is cut.
    """

    proxy: TcpProxy
    client: Any

    def storage(self, bucket: str, prefix: str, **settings: Any) -> StorageConfig:
        """A new bucket, and storage in it through the proxy, with fast retries and breaker."""
        self.client.create_bucket(Bucket=bucket)
        fast: dict[str, Any] = {"attempts": 2, "backoff_s": 0.05, "timeout_s": 1.0, "breaker_failures": 2}
        return StorageConfig(
            url=f"s3://{bucket}/{prefix}",
            endpoint_url=f"http://127.0.0.1:{self.proxy.port}",
            **{**fast, **settings},
        )


def wait_for_port(port: int, deadline_s: float = 30.0) -> None:
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            assert time.monotonic() < deadline, f"nothing listening on {port}"
            time.sleep(0.1)  # polling until a freshly started server accepts connections


@pytest.fixture(scope="module")
def proxied_s3(service: RunningService) -> Iterator[ProxiedS3]:
    # The shared `service` fixture exported AWS test credentials before Ray started, so replicas see them.
    port = free_port()
    moto = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    proxy = TcpProxy(port)
    try:
        wait_for_port(port)
        proxy.restore()
        client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1")
        yield ProxiedS3(proxy, client)
    finally:
        proxy.cut()
        moto.terminate()
        moto.wait(timeout=30)
