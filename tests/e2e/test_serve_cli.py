"""Serve's own CLI as the README gives it, on a Ray head of our own (every port free, not 8000).

`serve run serve_app.app:app`, then `serve deploy serve_app/configs/serve_config.yaml` with a
`user_config` change that reaches the running replica, and the README's metrics scraped from
Ray's Prometheus endpoint after that traffic. `ray start --block` owns the cluster: ending it
stops exactly this cluster's processes.
"""

from __future__ import annotations

import base64
import io
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import yaml
from PIL import Image

from tests.conftest import free_port
from tests.polling import wait_until

BIN = Path(sys.executable).parent
ROOT = Path(__file__).parents[2]
SERVE_CONFIG = ROOT / "serve_app" / "configs" / "serve_config.yaml"
# The random tiny-sd rather than the shipped digits-ar: its denoising passes are slow enough for a
# stream to be abandoned mid-pass (so the cancellation counter is exported).
APP_CONFIG = ROOT / "benchmarks" / "configs" / "tiny-sd.yaml"
MODEL_DEPLOYMENT = "ModelReplica-tiny-sd"
DEADLINE_S = 240.0
T = TypeVar("T")


@dataclass(frozen=True)
class RayHead:
    gcs_address: str
    dashboard_url: str
    base_url: str
    metrics_url: str
    http_port: int
    env: dict[str, str]
    log: Path

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


def answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=10).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayHead]:
    directory = tmp_path_factory.mktemp("serve-cli")
    gcs, dashboard, agent, metrics, client, http = (free_port() for _ in range(6))
    env = {
        **os.environ,
        # Replicas read the app's settings from the cluster's environment, as `make serve` does.
        "IMAGEGEN_CONFIG": str(APP_CONFIG),
        "IMAGEGEN_STORAGE__URL": f"file://{directory / 'store'}",
        "RAY_USAGE_STATS_ENABLED": "0",
        # Every port of this cluster is on loopback; token auth would only stand between the test's
        # own REST calls and its dashboard.
        "RAY_AUTH_MODE": "disabled",
        # Workers export their metrics every second instead of every ten, so a scrape sees them soon.
        "RAY_metrics_report_interval_ms": "1000",
    }
    log = directory / "ray.log"
    command = [
        str(BIN / "ray"),
        "start",
        "--head",
        "--block",
        "--node-ip-address=127.0.0.1",
        f"--port={gcs}",
        "--num-cpus=4",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard}",
        f"--dashboard-agent-listen-port={agent}",
        f"--metrics-export-port={metrics}",
        f"--ray-client-server-port={client}",
        "--disable-usage-stats",
    ]
    with log.open("w") as output:
        head_process = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT)
    head = RayHead(
        gcs_address=f"127.0.0.1:{gcs}",
        dashboard_url=f"http://127.0.0.1:{dashboard}",
        base_url=f"http://127.0.0.1:{http}",
        metrics_url=f"http://127.0.0.1:{metrics}/metrics",
        http_port=http,
        env=env,
        log=log,
    )
    try:
        wait_until(
            lambda: head_process.poll() is None and answers(f"{head.dashboard_url}/api/version"),
            "the Ray head's dashboard",
        )
        serve_start = [
            str(BIN / "serve"),
            "start",
            "-a",
            head.gcs_address,
            "--http-host=127.0.0.1",
            f"--http-port={http}",
        ]
        subprocess.run(serve_start, env=env, check=True, timeout=DEADLINE_S, capture_output=True)
        yield head
    finally:
        head_process.send_signal(signal.SIGTERM)
        try:
            head_process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head_process.kill()
            head_process.wait()


def generate(base_url: str, prompt: str) -> httpx.Response:
    return httpx.post(
        f"{base_url}/v1/images/generations", json={"prompt": prompt, "size": "64x64"}, timeout=DEADLINE_S
    )


def assert_png(response: httpx.Response) -> None:
    assert response.status_code == 200, response.text
    image = Image.open(io.BytesIO(base64.b64decode(response.json()["data"][0]["b64_json"])))
    assert image.format == "PNG" and image.size == (64, 64)


def test_serve_run_serves_the_app(ray_head: RayHead, tmp_path: Path) -> None:
    with (tmp_path / "serve-run.log").open("w") as output:
        process = subprocess.Popen(
            [str(BIN / "serve"), "run", "-a", ray_head.gcs_address, "serve_app.app:app"],
            env=ray_head.env,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_until(
            lambda: process.poll() is None and answers(f"{ray_head.base_url}/readyz"), "serve run's app"
        )
        assert_png(generate(ray_head.base_url, "served by serve run"))
    finally:
        process.send_signal(signal.SIGINT)  # Ctrl-C: serve run shuts its app down
        process.wait(timeout=DEADLINE_S)
    assert not answers(f"{ray_head.base_url}/healthz"), "serve run's app outlived its Ctrl-C"


def deploy(
    ray_head: RayHead,
    tmp_path: Path,
    user_config: dict[str, Any] | None = None,
    env_vars: dict[str, str] | None = None,
) -> None:
    """`serve deploy` of the shipped Serve config: our HTTP port and model, and ``user_config`` and
    the application's ``IMAGEGEN_*`` settings (its runtime environment) if given."""
    config = yaml.safe_load(SERVE_CONFIG.read_text())
    config["http_options"]["port"] = ray_head.http_port
    model: dict[str, Any] = {"name": MODEL_DEPLOYMENT}  # the config's own entries name the digit models
    if user_config is not None:
        model["user_config"] = user_config
    config["applications"][0]["deployments"] = [model]
    if env_vars is not None:
        config["applications"][0]["runtime_env"] = {"env_vars": env_vars}
    path = tmp_path / "serve_config.yaml"
    path.write_text(yaml.safe_dump(config))
    subprocess.run(
        [str(BIN / "serve"), "deploy", str(path), "-a", ray_head.dashboard_url],
        env=ray_head.env,
        check=True,
        timeout=DEADLINE_S,
        capture_output=True,
    )


def model_replica_ids(ray_head: RayHead) -> list[str]:
    applications = httpx.get(f"{ray_head.dashboard_url}/api/serve/applications/", timeout=30).json()
    deployment = applications["applications"]["imagegen"]["deployments"][MODEL_DEPLOYMENT]
    return sorted(replica["replica_id"] for replica in deployment["replicas"])


def batch_sizes_of_concurrent_requests(base_url: str, count: int) -> list[int]:
    with ThreadPoolExecutor(max_workers=count) as pool:
        responses = list(pool.map(lambda index: generate(base_url, f"crowd {index}"), range(count)))
    for response in responses:
        assert response.status_code == 200, response.text
    return [int(response.headers["x-imagegen-batch-size"]) for response in responses]


@pytest.fixture(scope="module")
def deployed(ray_head: RayHead, tmp_path_factory: pytest.TempPathFactory) -> RayHead:
    """The shipped Serve config deployed (after `serve run`'s app is gone)."""
    deploy(ray_head, tmp_path_factory.mktemp("deploy"))
    wait_until(lambda: answers(f"{ray_head.base_url}/readyz"), "the deployed app")
    return ray_head


def test_serve_deploy_and_user_config_changes_batching_live(deployed: RayHead, tmp_path: Path) -> None:
    ray_head = deployed
    assert_png(generate(ray_head.base_url, "served by serve deploy"))
    replicas = model_replica_ids(ray_head)

    # A batch leaves only when full: four concurrent requests share one forward pass.
    deploy(ray_head, tmp_path, {"max_batch_size": 4, "batch_wait_timeout_s": 10.0})
    wait_until(lambda: batch_sizes_of_concurrent_requests(ray_head.base_url, 4) == [4] * 4, "batches of four")
    deploy(ray_head, tmp_path, {"max_batch_size": 1, "batch_wait_timeout_s": 0.0})
    wait_until(lambda: batch_sizes_of_concurrent_requests(ray_head.base_url, 4) == [1] * 4, "batches of one")
    assert model_replica_ids(ray_head) == replicas  # changed live: the same replica, not a new one


README_METRICS = (
    "imagegen_images_generated_total",
    "imagegen_stage_latency_seconds",
    "imagegen_batch_size",
    "imagegen_tasks_in_flight",
    "imagegen_tasks_cancelled_total",
    "imagegen_queue_depth_images",
    "imagegen_queue_wait_seconds",
)


def scraped_metrics(ray_head: RayHead) -> dict[str, list[str]]:
    """Every ``imagegen_*`` sample line of Ray's Prometheus endpoint, by metric family."""
    families: dict[str, list[str]] = {}
    for line in httpx.get(ray_head.metrics_url, timeout=30).text.splitlines():
        if match := re.match(r"^(?:ray_)?(imagegen_\w+?)(?:_bucket|_count|_sum)?\{", line):
            families.setdefault(match.group(1), []).append(line)
    return families


def test_readme_metrics_are_exported_after_traffic(deployed: RayHead) -> None:
    ray_head = deployed
    body = {
        "prompt": "abandoned",
        "size": "64x64",
        "stream": True,
        "partial_images": 3,
        "num_inference_steps": 50,
    }
    with httpx.stream(
        "POST", f"{ray_head.base_url}/v1/images/generations", json=body, timeout=DEADLINE_S
    ) as stream:
        assert stream.status_code == 200
        next(stream.iter_lines())  # the first event has come: the work is running; now hang up
    assert_png(generate(ray_head.base_url, "counted"))

    def all_exported() -> dict[str, list[str]] | None:
        families = scraped_metrics(ray_head)
        return families if all(name in families for name in README_METRICS) else None

    families = wait_until(all_exported, f"{README_METRICS} on {ray_head.metrics_url}")
    stages = {
        match
        for line in families["imagegen_stage_latency_seconds"]
        for match in re.findall(r'stage="(\w+)"', line)
    }
    assert {"preprocess", "model", "postprocess"} <= stages
    assert any('variant="tiny-sd"' in line for line in families["imagegen_images_generated_total"])
    assert any('tier="paid"' in line for line in families["imagegen_queue_depth_images"])


PAID_KEY = "sk-metrics-paid"
FREE_KEY = "sk-metrics-free"
MAX_BACKLOG = 8
OVERLOAD_METRICS = ("imagegen_deferred_total", "imagegen_shed_total", "imagegen_log_rows_dropped_total")


def metric_total(families: dict[str, list[str]], name: str) -> float:
    """The sum of a metric's samples over every process that exports it (0 before any)."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in families.get(name, []))


def generate_as(ray_head: RayHead, key: str, n: int) -> httpx.Response:
    return httpx.post(
        f"{ray_head.base_url}/v1/images/generations",
        json={"prompt": "counted", "size": "64x64", "n": n},
        headers={"authorization": f"Bearer {key}"},
        timeout=DEADLINE_S,
    )


def application_running(ray_head: RayHead) -> bool:
    applications = httpx.get(f"{ray_head.dashboard_url}/api/serve/applications/", timeout=30).json()
    application = applications["applications"]["imagegen"]
    assert application["status"] != "DEPLOY_FAILED", application["message"]
    return bool(application["status"] == "RUNNING")


def test_deferred_shed_and_dropped_log_rows_are_counted_on_the_metrics_endpoint(
    deployed: RayHead, tmp_path: Path
) -> None:
    ray_head = deployed
    keys = tmp_path / "keys.yaml"
    tenants = [
        {"key": PAID_KEY, "tenant": "payer", "tier": "paid"},
        {"key": FREE_KEY, "tenant": "guest", "tier": "free"},
    ]
    keys.write_text(yaml.safe_dump({"keys": tenants}))
    settings = {
        "IMAGEGEN_AUTH__KEYS_FILE": str(keys),
        "IMAGEGEN_SCHEDULER__DEFER_AT_BACKLOG": "0",  # free work is deferred at any backlog
        "IMAGEGEN_SCHEDULER__SHED_AT_BACKLOG": str(MAX_BACKLOG),
        "IMAGEGEN_SCHEDULER__MAX_BACKLOG": str(MAX_BACKLOG),  # a request for more images is shed
        "IMAGEGEN_STORAGE__LOG__MAX_BUFFERED_ROWS": "1",  # a request's second log row overflows
    }
    deploy(ray_head, tmp_path, env_vars=settings)
    # Live once an unknown key is refused (the open app took any) and the rollout is over.
    wait_until(
        lambda: (
            application_running(ray_head) and generate_as(ray_head, "sk-unknown-key", 1).status_code == 401
        ),
        "the app with API keys",
    )
    exported = scraped_metrics(ray_head)
    before = {name: metric_total(exported, name) for name in OVERLOAD_METRICS}

    assert_png(generate_as(ray_head, FREE_KEY, 1))  # deferred, then served
    shed = generate_as(ray_head, PAID_KEY, MAX_BACKLOG + 1)
    assert shed.status_code == 429 and int(shed.headers["retry-after"]) >= 1, shed.text
    assert generate_as(ray_head, PAID_KEY, 2).status_code == 200  # two rows for a buffer of one

    def all_grew() -> dict[str, list[str]] | None:
        families = scraped_metrics(ray_head)
        grew = all(metric_total(families, name) > before[name] for name in OVERLOAD_METRICS)
        return families if grew else None

    families = wait_until(all_grew, f"{OVERLOAD_METRICS} to grow on {ray_head.metrics_url}")
    assert any('tier="free"' in line for line in families["imagegen_deferred_total"])
    assert any('tier="paid"' in line for line in families["imagegen_shed_total"])
