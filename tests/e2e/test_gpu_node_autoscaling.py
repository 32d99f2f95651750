"""GPU nodes follow the backlog, on Ray's fake multi-node provider with cluster.yaml's node types.

A Ray head of our own runs the cluster autoscaler over a `fake_multinode` provider whose worker
types are cluster.yaml's GPU node types (their GPU and `accelerator_type:*` resources, a small
`max_workers`). The service is deployed from its Serve config (the backlog policy included) with a
cold tiny-sd variant whose replica needs one GPU: the head has none. A steady backlog makes the
policy ask for two replicas; the autoscaler launches a GPU node for each; the scheduler's slots
grow with the running replicas. Once the load stops, the replicas go back to zero, the slots with
them, and the idle GPU nodes are removed.

The head runs as `ray start --block` in its own process group (every port free, its own short
temp dir); teardown ends that group, then any process still running from its temp dir, and checks
that none is left. Never `ray stop`: it would stop every cluster on the machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import ray
import yaml
from ray import serve
from ray._private.authentication_test_utils import reset_auth_token_state

from serve_app.config import CONFIG_DIR, DEFAULT_CONFIG_PATH, load_config
from serve_app.deploy import APP_NAME, serve_config
from serve_app.scheduler import running_replicas, slots_per_replica
from tests.conftest import TEST_SIGNING_KEY, free_port
from tests.polling import DEADLINE_S, application_running, wait_until

BIN = Path(sys.executable).parent
CLUSTER_YAML = Path(__file__).parents[2] / "cluster.yaml"
VARIANT = "tiny-sd"
MODEL_DEPLOYMENT = f"ModelReplica-{VARIANT}"
HEAD_TYPE = "ray.head.default"  # the fake provider's name for the head's type
HEAD_CPUS = 4  # the head runs the controller, proxy and CPU stages, no GPU (as cluster.yaml's head)
# A fake node is a raylet on this machine: give it the CPU one model replica asks for, not the
# cloud instance's 8 or 192 (idle workers per CPU would crowd a small machine), and a small store.
FAKE_NODE_CPUS = 1
FAKE_NODE_OBJECT_STORE_BYTES = 100 * 1024**2
MAX_NODES_PER_TYPE = 2
IDLE_TIMEOUT_MINUTES = 0.1  # the autoscaler takes fractions: a node idle for 6 s is removed
MAX_REPLICAS = 2
CONCURRENT_REQUESTS = 6  # a steady backlog of ~6 images: 3 replicas' worth at 2 images each
AUTOSCALING = {
    "cold": True,
    "min_replicas": 0,
    "max_replicas": MAX_REPLICAS,
    "target_images_per_replica": 2,
    "upscale_delay_s": 0,
    "downscale_delay_s": 2,
}
HEAD_STARTED = "Ray runtime started."  # what `ray start` prints once its head is up


def reached(condition: Callable[[], bool], what: str) -> float:
    """When ``condition`` held (``time.monotonic()``), for the phase timings."""
    wait_until(condition, what)
    return time.monotonic()


def fake_cluster_config(gcs_address: str) -> dict[str, Any]:
    """An autoscaling config for the fake provider: cluster.yaml's GPU worker types, resources kept.

    The keys `ray up` would fill in (commands, mounts, auth) are given empty, as in the fake
    provider's own example config; ``gcs_address`` tells the provider where its nodes join.
    """
    cluster: dict[str, Any] = yaml.safe_load(CLUSTER_YAML.read_text())
    workers = {
        name: {
            "resources": {
                **spec["resources"],
                "CPU": FAKE_NODE_CPUS,
                "object_store_memory": FAKE_NODE_OBJECT_STORE_BYTES,
            },
            "node_config": {},
            "min_workers": spec["min_workers"],
            "max_workers": min(spec["max_workers"], MAX_NODES_PER_TYPE),
        }
        for name, spec in cluster["available_node_types"].items()
        if spec["resources"].get("GPU", 0) > 0
    }
    head = {"resources": {"CPU": HEAD_CPUS, "GPU": 0}, "node_config": {}, "max_workers": 0}
    return {
        "cluster_name": "imagegen-fake",
        "max_workers": MAX_NODES_PER_TYPE * len(workers),
        "upscaling_speed": cluster["upscaling_speed"],
        "idle_timeout_minutes": IDLE_TIMEOUT_MINUTES,
        "provider": {
            "type": "fake_multinode",
            "gcs_address": gcs_address,
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
        },
        "available_node_types": {HEAD_TYPE: head, **workers},
        "head_node_type": HEAD_TYPE,
        "auth": {},
        "docker": {},
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


def processes_using(temp_dir: str) -> list[int]:
    """PIDs of the processes whose command line names ``temp_dir`` (this cluster's raylets,
    agents and workers) or that still run in the head's process group."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone meanwhile
            continue
        if temp_dir in command:
            found.append(int(entry.name))
    return found


def end_cluster(head: subprocess.Popen[bytes], temp_dir: str) -> None:
    """Stop exactly this cluster: its process group, then anything left running from its temp dir."""
    for signal_number, grace_s in ((signal.SIGTERM, 60.0), (signal.SIGKILL, 30.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal_number)
        for pid in processes_using(temp_dir):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal_number)
        deadline = time.monotonic() + grace_s
        while (head.poll() is None or processes_using(temp_dir)) and time.monotonic() < deadline:
            time.sleep(0.5)  # waiting for processes to exit, with a deadline
        if head.poll() is not None and not processes_using(temp_dir):
            return
    head.wait(timeout=10)


@dataclass(frozen=True)
class FakeCluster:
    gcs_address: str
    temp_dir: str
    log: Path
    gpu_node_types: dict[str, dict[str, float]]  # cluster.yaml's GPU types and their resources


@pytest.fixture(scope="module")
def fake_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeCluster]:
    directory = tmp_path_factory.mktemp("fake-cluster")
    # Unix socket paths are short; pytest's temp paths are not.
    temp_dir = tempfile.mkdtemp(prefix="rayfake-", dir="/tmp")
    gcs, client, agent, metrics, runtime_env_agent = (free_port() for _ in range(5))
    gcs_address = f"127.0.0.1:{gcs}"
    config = fake_cluster_config(gcs_address)
    config_path = directory / "fake_cluster.yaml"
    config_path.write_text(json.dumps(config))
    env = {
        **os.environ,
        "RAY_FAKE_CLUSTER": "1",  # lets the autoscaler load the fake provider
        "AUTOSCALER_UPDATE_INTERVAL_S": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "disabled",  # loopback only; a token would stand between the test and its cluster
    }
    log = directory / "ray.log"
    command = [
        str(BIN / "ray"),
        "start",
        "--head",
        "--block",
        f"--autoscaling-config={config_path}",
        f"--temp-dir={temp_dir}",
        "--node-ip-address=127.0.0.1",
        f"--port={gcs}",
        f"--num-cpus={HEAD_CPUS}",
        "--num-gpus=0",
        f"--object-store-memory={256 * 1024**2}",
        "--include-dashboard=false",
        f"--ray-client-server-port={client}",
        f"--dashboard-agent-listen-port={agent}",
        f"--metrics-export-port={metrics}",
        f"--runtime-env-agent-port={runtime_env_agent}",
        "--disable-usage-stats",
    ]
    with log.open("w") as output:
        head = subprocess.Popen(
            command, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )
    gpu_types = {
        name: spec["resources"] for name, spec in config["available_node_types"].items() if name != HEAD_TYPE
    }
    # Ray reads the auth mode once per process: an earlier cluster of this pytest run (token auth,
    # Ray's default) would make this driver refuse the replicas' replies, and this cluster's mode the
    # later ones'. So the cached state is reset on the way in and again once the env is restored.
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("RAY_AUTH_MODE", "disabled")  # this driver speaks to the cluster as its head does
            reset_auth_token_state()
            try:
                wait_until(lambda: head.poll() is None and HEAD_STARTED in log.read_text(), "the Ray head")
                ray.init(address=gcs_address, log_to_driver=False)
                yield FakeCluster(gcs_address, temp_dir, log, gpu_types)
            finally:
                ray.shutdown()
                end_cluster(head, temp_dir)
                left = processes_using(temp_dir)
                shutil.rmtree(temp_dir, ignore_errors=True)
    finally:
        reset_auth_token_state()
    assert not left, f"processes of the fake cluster outlived it: {left}"


@dataclass(frozen=True)
class Service:
    base_url: str
    slots_per_replica: int


def write_config(directory: Path, port: int) -> Path:
    data: dict[str, Any] = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
    variant = yaml.safe_load((CONFIG_DIR / "variants" / f"{VARIANT}.yaml").read_text())
    variant["resources"] = {"num_cpus": FAKE_NODE_CPUS, "num_gpus": 1, "max_ongoing_requests": 64}
    variant["cpu_threads"] = 1  # the machine is shared; these nodes only pretend to have cores
    variant["autoscaling"] = AUTOSCALING
    data.update(
        port=port,
        default_model=VARIANT,
        variants=[variant],
        storage={"url": f"file://{directory / 'store'}", "signing_key": TEST_SIGNING_KEY},
    )
    path = directory / "gpu-autoscaled.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def service(fake_cluster: FakeCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    from ray.serve._private.api import serve_start
    from ray.serve.schema import ServeDeploySchema

    port = free_port()
    config_path = write_config(tmp_path_factory.mktemp("gpu-autoscaled"), port)
    config = load_config(config_path)
    # The Serve config `imagegen serve` deploys, with its proxy on the head only: the fake nodes
    # share this machine's network, so a proxy on each would share the head's HTTP port.
    schema = ServeDeploySchema(**serve_config(config_path))
    serve_start(http_options=schema.http_options.model_dump(), proxy_location="HeadOnly").deploy_apps(schema)
    try:
        wait_until(lambda: application_running(APP_NAME), "the application to run")
        yield Service(f"http://127.0.0.1:{port}", slots_per_replica(config, config.variants[0]))
    finally:
        serve.shutdown()


def model_replicas() -> int | None:
    return running_replicas(serve.status(), APP_NAME, MODEL_DEPLOYMENT)


def slots() -> int:
    scheduler = serve.get_deployment_handle("Scheduler", app_name=APP_NAME)
    return int(scheduler.stats.remote().result(timeout_s=60)["variants"][VARIANT]["capacity"])


def gpu_nodes() -> list[dict[str, float]]:
    """The resources of every live node that offers a GPU."""
    return [
        node["Resources"] for node in ray.nodes() if node["Alive"] and node["Resources"].get("GPU", 0) > 0
    ]


def of_a_cluster_yaml_type(resources: dict[str, float], node_types: dict[str, dict[str, float]]) -> bool:
    """The node offers exactly the GPUs and accelerator resources of one of cluster.yaml's types."""

    def accelerators(offer: dict[str, float]) -> dict[str, float]:
        return {
            key: value for key, value in offer.items() if key == "GPU" or key.startswith("accelerator_type:")
        }

    return any(accelerators(resources) == accelerators(spec) for spec in node_types.values())


@dataclass
class SteadyLoad:
    """``concurrency`` callers, each sending its next request as soon as its last one is answered."""

    base_url: str
    concurrency: int
    statuses: list[int] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def __enter__(self) -> SteadyLoad:
        self._threads = [threading.Thread(target=self._caller, args=(i,)) for i in range(self.concurrency)]
        for thread in self._threads:
            thread.start()
        return self

    def _caller(self, index: int) -> None:
        body = {"model": VARIANT, "prompt": f"caller {index}", "size": "64x64"}
        with httpx.Client(base_url=self.base_url, timeout=DEADLINE_S) as http:
            while not self._stop.is_set():
                try:
                    self.statuses.append(http.post("/v1/images/generations", json=body).status_code)
                except httpx.HTTPError:
                    self.statuses.append(0)  # no answer: the test fails on it below

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()


@pytest.mark.timeout(900)
def test_a_backlog_brings_gpu_nodes_and_replicas_and_idle_takes_them_away(
    fake_cluster: FakeCluster, service: Service
) -> None:
    assert model_replicas() == 0 and slots() == 0
    assert gpu_nodes() == []  # a cold variant at zero holds no GPU node

    step = time.monotonic()
    with SteadyLoad(service.base_url, CONCURRENT_REQUESTS) as load:
        nodes_at = reached(lambda: len(gpu_nodes()) == MAX_REPLICAS, "a GPU node per wanted replica")
        replicas_at = reached(lambda: model_replicas() == MAX_REPLICAS, "two running model replicas")
        slots_at = reached(
            lambda: slots() == MAX_REPLICAS * service.slots_per_replica, "the scheduler's slots to grow"
        )
        nodes = gpu_nodes()
    assert all(of_a_cluster_yaml_type(resources, fake_cluster.gpu_node_types) for resources in nodes), nodes
    assert load.statuses and set(load.statuses) == {200}  # every request of the burst was served

    idle = time.monotonic()
    zero_at = reached(lambda: model_replicas() == 0, "the idle variant to go back to zero")
    wait_until(lambda: slots() == 0, "the scheduler's slots to follow it")
    nodes_gone_at = reached(lambda: gpu_nodes() == [], "the idle GPU nodes to be removed")
    print(
        f"step -> {MAX_REPLICAS} GPU nodes {nodes_at - step:.1f}s, -> {MAX_REPLICAS} replicas "
        f"{replicas_at - step:.1f}s, -> slots {slots_at - step:.1f}s; idle -> 0 replicas "
        f"{zero_at - idle:.1f}s, -> 0 GPU nodes {nodes_gone_at - idle:.1f}s ({len(load.statuses)} requests)"
    )
