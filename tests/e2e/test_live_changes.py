"""Live changes to a running service under load, as an operator makes them: edit the config files,
`imagegen config apply` (the Serve config of `imagegen config build`, deployed as `serve deploy`
does). A variant is added, an alias reweighted, a variant removed, while clients keep sending
synchronous requests and async jobs through real HTTP to an alias and a variant that stays: not
one of them fails, and the jobs queued on the removed variant finish before it goes (its model
is gated, tests/integration/model_gate.py, so they are still there when the removal starts).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import ray
import yaml
from ray import serve
from ray.serve.context import _connect

from serve_app.aliases import caller_identity, choose_variant
from serve_app.auth import LOCAL_TENANT
from serve_app.config import CONFIG_DIR
from serve_app.deploy import APP_NAME, apply, deploy
from tests.conftest import free_port
from tests.integration.model_gate import GATED_FAMILY, closed, start_gate
from tests.polling import application_running, wait_until

ALIAS = "imagegen-1"
STAYS, ADDED, REMOVED = "tiny-a", "tiny-c", "tiny-b"
REMOVED_DEPLOYMENT = f"ModelReplica-{REMOVED}"
SYNC_CLIENTS = 2
JOBS_ON_REMOVED = 4
BODY = {"prompt": "a live change", "size": "64x64", "quality": "low", "response_format": "b64_json"}
TERMINAL = {"succeeded", "failed", "cancelled"}


@dataclass
class Operator:
    """The config files an operator edits, and the service they configure."""

    directory: Path
    base_url: str
    port: int

    def write(self, variants: list[str], aliases: dict[str, dict[str, float]]) -> Path:
        tiny = yaml.safe_load((CONFIG_DIR / "variants" / "tiny-sd.yaml").read_text())
        tiny["resources"] = {"num_cpus": 0.25, "num_replicas": 1, "max_ongoing_requests": 64}
        tiny["cpu_threads"] = 1  # three variants (six during a rollout) share a small machine
        config = {
            "port": self.port,
            "default_model": STAYS,
            "storage": {"url": f"file://{self.directory / 'store'}"},
            "variants": [{**tiny, "name": name, **gated(name)} for name in variants],
            "aliases": aliases,
        }
        path = self.directory / "imagegen.yaml"
        path.write_text(yaml.safe_dump(config))
        return path


@dataclass
class Load:
    """Clients that keep calling until stopped; every call that is not a success is an error."""

    base_url: str
    stop: threading.Event = field(default_factory=threading.Event)
    errors: list[str] = field(default_factory=list)
    successes: int = 0
    jobs: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def run_sync_client(self, index: int) -> None:
        with httpx.Client(base_url=self.base_url, timeout=120) as client:
            count = 0
            while not self.stop.is_set():
                model = ALIAS if count % 2 else STAYS
                body = {**BODY, "model": model, "user": f"caller-{index}-{count % 5}"}
                self.check(client.post("/v1/images/generations", json=body), f"sync {model}")
                count += 1

    def run_job_client(self) -> None:
        with httpx.Client(base_url=self.base_url, timeout=120) as client:
            while not self.stop.is_set():
                if (job_id := self.submit(client, ALIAS)) is not None:
                    self.check_job(client, job_id)

    def submit(self, client: httpx.Client, model: str) -> str | None:
        response = client.post(
            "/v1/images/generations", json={**BODY, "model": model}, headers={"prefer": "respond-async"}
        )
        if response.status_code != 202:
            self.error(f"job submit {model}: {response.status_code} {response.text[:300]}")
            return None
        return str(response.json()["id"])

    def check_job(self, client: httpx.Client, job_id: str) -> None:
        job = wait_until(lambda: finished_job(client, job_id), f"job {job_id}")
        if job["status"] != "succeeded":
            self.error(f"job {job_id}: {job}")
        else:
            with self.lock:
                self.jobs += 1

    def check(self, response: httpx.Response, what: str) -> None:
        if response.status_code != 200:
            self.error(f"{what}: {response.status_code} {response.text[:300]}")
        else:
            with self.lock:
                self.successes += 1

    def error(self, message: str) -> None:
        with self.lock:
            self.errors.append(message)

    def progress(self) -> int:
        with self.lock:
            return self.successes + self.jobs


def finished_job(client: httpx.Client, job_id: str) -> dict[str, Any] | None:
    response = client.get(f"/v1/images/jobs/{job_id}")
    assert response.status_code == 200, response.text
    job: dict[str, Any] = response.json()
    return job if job["status"] in TERMINAL else None


@pytest.fixture
def operator(tmp_path: Path) -> Iterator[Operator]:
    port = free_port()
    ray.init(address="local", num_cpus=8, include_dashboard=False, object_store_memory=256 * 1024**2)
    try:
        yield Operator(tmp_path, f"http://127.0.0.1:{port}", port)
    finally:
        serve.shutdown()
        ray.shutdown()


def gated(name: str) -> dict[str, str]:
    """The removed variant runs the real tiny model behind the test's gate."""
    return {"family": GATED_FAMILY} if name == REMOVED else {}


def deployments() -> dict[str, Any]:
    details: dict[str, Any] = _connect().get_serve_details()["applications"][APP_NAME]["deployments"]
    return details


def replica_ids() -> set[str]:
    """Every replica of the application now: the same set after a change means nothing restarted."""
    return {
        replica["replica_id"] for deployment in deployments().values() for replica in deployment["replicas"]
    }


def models(base_url: str) -> dict[str, dict[str, Any]]:
    listing = httpx.get(f"{base_url}/v1/models", timeout=30).json()
    return {card["id"]: card for card in listing["data"]}


def variant_of(base_url: str, model: str, user: str) -> str:
    response = httpx.post(
        f"{base_url}/v1/images/generations", json={**BODY, "model": model, "user": user}, timeout=120
    )
    assert response.status_code == 200, response.text
    return response.headers["x-model-variant"]


@pytest.mark.timeout(600)  # two rollouts: about two minutes on a quiet machine, more on a busy one
def test_add_reweight_and_remove_variants_under_load_without_an_error(operator: Operator) -> None:
    base_url = operator.base_url
    gate = start_gate()  # open until the removal: the gated variant's replica may run at once
    deploy(operator.write([STAYS, REMOVED], {ALIAS: {STAYS: 1.0}}))
    wait_until(lambda: application_running(APP_NAME), "the first configuration")
    load = Load(base_url)
    with ThreadPoolExecutor(max_workers=SYNC_CLIENTS + 1) as pool:
        clients = [pool.submit(load.run_sync_client, index) for index in range(SYNC_CLIENTS)]
        clients.append(pool.submit(load.run_job_client))
        try:
            wait_until(load.progress, "the load to start")

            # Add a variant: the application rolls out; the new variant serves.
            assert apply(operator.write([STAYS, REMOVED, ADDED], {ALIAS: {STAYS: 1.0}})) == []
            assert variant_of(base_url, ADDED, "anyone") == ADDED
            before = load.progress()
            wait_until(lambda: load.progress() > before, "load served after the addition")

            # Reweight the alias: applied in place, no replica restarts; callers follow the weights.
            weights = {STAYS: 1.0, ADDED: 3.0}
            replicas = replica_ids()
            assert apply(operator.write([STAYS, REMOVED, ADDED], {ALIAS: weights})) == []
            assert replica_ids() == replicas
            assert models(base_url)[ALIAS]["variants"] == weights
            for user in (f"reweighed-{index}" for index in range(6)):
                expected = choose_variant(ALIAS, weights, caller_identity(user, LOCAL_TENANT))
                assert variant_of(base_url, ALIAS, user) == expected

            # Remove a variant with jobs held on it: it is retired (no new work) and removed only
            # once they finished.
            with httpx.Client(base_url=base_url, timeout=120) as client, ThreadPoolExecutor(1) as applying:
                with closed(gate):
                    queued = [load.submit(client, REMOVED) for _ in range(JOBS_ON_REMOVED)]
                    removal = applying.submit(apply, operator.write([STAYS, ADDED], {ALIAS: weights}))
                    wait_until(lambda: REMOVED not in models(base_url), "the variant's retirement")
                    assert not removal.done()  # it waits for the jobs, which the gate holds
                    assert REMOVED_DEPLOYMENT in deployments()
                assert removal.result() == [REMOVED]
                for job_id in queued:
                    assert job_id is not None
                    job = finished_job(client, job_id)
                    assert job is not None and job["status"] == "succeeded", job
                assert REMOVED_DEPLOYMENT not in deployments()
            before = load.progress()
            wait_until(lambda: load.progress() > before, "load served after the removal")
        finally:
            load.stop.set()
            for client_run in clients:
                client_run.result()
    assert load.errors == []

    gone = httpx.post(f"{base_url}/v1/images/generations", json={**BODY, "model": REMOVED}, timeout=60)
    assert gone.status_code == 404
    assert gone.json()["error"]["code"] == "model_not_found"
    assert set(models(base_url)) == {STAYS, ADDED, ALIAS}
