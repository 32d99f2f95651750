"""Tiers, rate limits, shedding, async jobs, idempotency, webhooks and recovery on real Ray Serve.

A second app runs beside the default one with API keys, one image slot (so order is visible)
and low shedding thresholds.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import httpx
import pytest
import ray
from PIL import Image
from pydantic import SecretStr
from ray import serve

from serve_app.app import build_app
from serve_app.config import AppConfig, SchedulerConfig, TierConfig
from serve_app.jobs import sign_webhook
from tests.images import hole_mask, noise_png
from tests.integration.conftest import RunningService

APP_NAME = "imagegen-tiers"
ROUTE = "/tiers"
WEBHOOK_SECRET = "webhook-test-secret"
DEADLINE_S = 120.0
KEYS = {
    "acme": ("sk-paid-acme-0001", "paid"),
    "bob": ("sk-free-bob-0001", "free"),
    "carol": ("sk-free-carol-001", "free"),
    "dave": ("sk-trial-dave-001", "trial"),
    "erin": ("sk-paid-erin-0001", "paid"),
    "frank": ("sk-paid-frank-001", "paid"),
}
BLOCKER = {"prompt": "a blocking job", "size": "128x128", "n": 4, "num_inference_steps": 8}
LONG_BLOCKER = {**BLOCKER, "n": 10, "num_inference_steps": 20}


@dataclass(frozen=True)
class TierService:
    base_url: str
    storage_dir: Path

    def client(self, tenant: str | None) -> httpx.Client:
        headers = {"authorization": f"Bearer {KEYS[tenant][0]}"} if tenant else {}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=DEADLINE_S)

    def stored_images(self, tenant: str) -> list[Path]:
        return sorted((self.storage_dir / tenant).rglob("*.png"))


def write_keys_file(path: Path) -> Path:
    entries = []
    for tenant, (key, tier) in KEYS.items():
        # bob's key is stored hashed, as an operator who keeps no plain keys would.
        stored = f"sha256:{hashlib.sha256(key.encode()).hexdigest()}" if tenant == "bob" else key
        entries.append({"key": stored, "tenant": tenant, "tier": tier})
    path.write_text(json.dumps({"keys": entries}))  # JSON is YAML
    return path


@pytest.fixture(scope="module")
def tiers(service: RunningService, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TierService]:
    directory = tmp_path_factory.mktemp("tiers")
    storage = service.config.storage.model_copy(update={"url": f"file://{directory / 'store'}"})
    auth = service.config.auth.model_copy(
        update={
            "keys_file": write_keys_file(directory / "keys.yaml"),
            "webhook_secret": SecretStr(WEBHOOK_SECRET),
        }
    )
    config: AppConfig = service.config.model_copy(
        update={
            "storage": storage,
            "auth": auth,
            "tiers": {
                "paid": TierConfig(),
                "free": TierConfig(queue_delay_s=2.0, sheddable=True, max_wait_s=600),
                "trial": TierConfig(requests_per_minute=2),
            },
            "scheduler": SchedulerConfig(
                slots_per_replica=1,
                defer_at_backlog=0,
                shed_at_backlog=3,
                max_backlog=200,
                webhook_allow_private=True,
            ),
        }
    )
    serve.run(build_app(config), name=APP_NAME, route_prefix=ROUTE)
    try:
        yield TierService(f"{service.base_url}{ROUTE}", directory / "store")
    finally:
        serve.delete(APP_NAME)


def submit_job(client: httpx.Client, body: dict[str, object], **headers: str) -> dict[str, object]:
    response = client.post(
        "/v1/images/generations", json=body, headers={"prefer": "respond-async", **headers}
    )
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["status"] == "queued" and job["id"].startswith("job_")
    assert response.headers["location"] == f"/v1/images/jobs/{job['id']}"
    return job


def wait_for_job(
    client: httpx.Client, job_id: str, statuses: tuple[str, ...] = ("succeeded",)
) -> dict[str, object]:
    deadline = time.monotonic() + DEADLINE_S
    while True:  # poll the job's state, as a client does, until it ends
        response = client.get(f"/v1/images/jobs/{job_id}")
        assert response.status_code == 200, response.text
        job = response.json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            assert job["status"] in statuses, json.dumps(job)[:600]
            return job
        assert time.monotonic() < deadline, f"job {job_id} still {job['status']}"
        time.sleep(0.2)


def serve_actor(deployment: str) -> ray.actor.ActorHandle:
    (name,) = [
        actor["name"]
        for actor in ray.util.list_named_actors(all_namespaces=True)
        if actor["name"].startswith(f"SERVE_REPLICA::{APP_NAME}#{deployment}#")
    ]
    return ray.get_actor(name, namespace="serve")


def test_keys_map_to_tenants_and_bad_keys_are_401(tiers: TierService) -> None:
    for tenant in (None, "bad"):
        headers = {"authorization": "Bearer sk-wrong-key-000"} if tenant else {}
        with httpx.Client(base_url=tiers.base_url, headers=headers, timeout=30) as client:
            response = client.post("/v1/images/generations", json={"prompt": "x"})
            assert response.status_code == 401
            assert response.json()["error"]["type"] == "invalid_request_error"
            assert response.headers["x-request-id"]
    with tiers.client("bob") as client:  # a key stored as sha256:<hex> works
        assert client.post("/v1/images/generations", json={"prompt": "x", "size": "64x64"}).status_code == 200


def test_rate_limit_is_429_with_openai_headers(tiers: TierService) -> None:
    with tiers.client("dave") as client:
        statuses = [
            client.post("/v1/images/generations", json={"prompt": "x", "size": "64x64"}) for _ in range(3)
        ]
    assert [response.status_code for response in statuses] == [200, 200, 429]
    first, limited = statuses[0], statuses[2]
    assert first.headers["x-ratelimit-limit-requests"] == "2"
    assert first.headers["x-ratelimit-remaining-requests"] == "1"
    assert limited.json()["error"]["code"] == "rate_limit_exceeded"
    assert int(limited.headers["retry-after"]) >= 1
    for name in ("limit", "remaining", "reset"):
        assert f"x-ratelimit-{name}-requests" in limited.headers
        assert f"x-ratelimit-{name}-tokens" in limited.headers


def test_paid_goes_first_under_contention_and_free_still_completes(tiers: TierService) -> None:
    with tiers.client("acme") as acme, tiers.client("carol") as carol:
        blocker = submit_job(acme, BLOCKER)
        free = submit_job(carol, {"prompt": "free work", "size": "64x64"})
        paid = submit_job(acme, {"prompt": "paid work", "size": "64x64"})
        assert paid["eta_seconds"] is not None
        free_now = carol.get(f"/v1/images/jobs/{free['id']}").json()
        paid_now = acme.get(f"/v1/images/jobs/{paid['id']}").json()
        assert (paid_now["queue_position"], free_now["queue_position"]) == (0, 1)
        done = {
            job["id"]: wait_for_job(client, job["id"])
            for client, job in ((acme, blocker), (acme, paid), (carol, free))
        }
    assert done[paid["id"]]["completed_at"] < done[free["id"]]["completed_at"]


def test_bounded_overload_sheds_free_and_serves_every_paid(tiers: TierService) -> None:
    with tiers.client("acme") as acme, tiers.client("carol") as carol:
        blocker = submit_job(acme, BLOCKER)

        def generate(client: httpx.Client) -> httpx.Response:
            return client.post("/v1/images/generations", json={"prompt": "burst", "size": "64x64"})

        with ThreadPoolExecutor(max_workers=12) as pool:
            free = list(pool.map(generate, [carol] * 8))
            paid = list(pool.map(generate, [acme] * 4))
        wait_for_job(acme, blocker["id"])
    assert all(response.status_code == 200 for response in paid), [r.text for r in paid]
    shed = [response for response in free if response.status_code == 429]
    assert shed, "no free request was shed"
    assert all(response.status_code in (200, 429) for response in free)
    for response in shed:
        assert response.json()["error"]["code"] == "overloaded"
        assert int(response.headers["retry-after"]) >= 1
        assert response.headers["x-should-retry"] == "true"
        assert "x-ratelimit-remaining-requests" in response.headers


def test_async_job_lifecycle_and_tenant_isolation(tiers: TierService) -> None:
    with tiers.client("acme") as acme, tiers.client("bob") as bob:
        job = submit_job(acme, {"prompt": "async", "size": "64x64", "n": 2, "seed": 7})
        assert isinstance(job["queue_position"], int) and job["eta_seconds"] is not None
        assert bob.get(f"/v1/images/jobs/{job['id']}").status_code == 404
        assert bob.delete(f"/v1/images/jobs/{job['id']}").status_code == 404
        done = wait_for_job(acme, job["id"])
    result = done["result"]
    assert result["size"] == "64x64" and [item["seed"] for item in result["data"]] == [7, 8]
    for item in result["data"]:
        assert Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))).size == (64, 64)


def test_cancel_queued_and_running_jobs(tiers: TierService) -> None:
    with tiers.client("acme") as acme:
        running = submit_job(acme, LONG_BLOCKER)
        queued = submit_job(acme, {"prompt": "never runs", "size": "64x64"})
        cancelled = acme.delete(f"/v1/images/jobs/{queued['id']}")
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
        deadline = time.monotonic() + DEADLINE_S
        while acme.get(f"/v1/images/jobs/{running['id']}").json()["status"] == "queued":
            assert time.monotonic() < deadline
            time.sleep(0.1)  # waiting for the job to be picked up before cancelling it mid-run
        assert acme.delete(f"/v1/images/jobs/{running['id']}").json()["status"] == "cancelled"
        assert wait_for_job(acme, queued["id"], ("cancelled",))["status"] == "cancelled"
        assert acme.get("/v1/images/jobs/job_does_not_exist").status_code == 404


def test_idempotency_key_same_body_same_result_other_body_422(tiers: TierService) -> None:
    body = {"prompt": "idempotent", "size": "64x64", "response_format": "url"}
    key = f"idem-{uuid.uuid4().hex}"
    with tiers.client("acme") as acme, ThreadPoolExecutor(max_workers=2) as pool:
        first, attached = pool.map(
            lambda _: acme.post("/v1/images/generations", json=body, headers={"idempotency-key": key}),
            range(2),
        )
        again = acme.post("/v1/images/generations", json=body, headers={"idempotency-key": key})
        conflict = acme.post(
            "/v1/images/generations", json={**body, "prompt": "different"}, headers={"idempotency-key": key}
        )
        async_again = acme.post(
            "/v1/images/generations", json=body, headers={"idempotency-key": key, "prefer": "respond-async"}
        )
    for response in (first, attached, again):
        assert response.status_code == 200, response.text
    job_ids = {response.headers["x-imagegen-job-id"] for response in (first, attached, again)}
    assert len(job_ids) == 1
    urls = {response.json()["data"][0]["url"].split("?")[0] for response in (first, attached, again)}
    assert len(urls) == 1  # one generation, one stored object
    assert conflict.status_code == 422 and conflict.json()["error"]["code"] == "idempotency_key_reused"
    assert async_again.status_code == 202 and async_again.json()["id"] in job_ids
    with tiers.client("bob") as bob:  # keys are scoped to the tenant
        other = bob.post("/v1/images/generations", json=body, headers={"idempotency-key": key})
    assert other.status_code == 200 and other.headers["x-imagegen-job-id"] not in job_ids


class WebhookReceiver(BaseHTTPRequestHandler):
    received: ClassVar[list[tuple[dict[str, str], bytes]]] = []
    arrived: ClassVar[threading.Event] = threading.Event()

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["content-length"]))
        WebhookReceiver.received.append((dict(self.headers), body))
        WebhookReceiver.arrived.set()
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_webhook_is_called_signed_on_completion(tiers: TierService) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), WebhookReceiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/hook"
        with tiers.client("acme") as acme:
            job = submit_job(acme, {"prompt": "call me", "size": "64x64", "webhook_url": url})
            wait_for_job(acme, job["id"])
            assert WebhookReceiver.arrived.wait(DEADLINE_S)
            bad = acme.post(
                "/v1/images/generations",
                json={"prompt": "x", "webhook_url": "ftp://example.com/"},
                headers={"prefer": "respond-async"},
            )
    finally:
        server.shutdown()
    headers, body = WebhookReceiver.received[0]
    assert json.loads(body) == {"id": job["id"], "object": "image.job", "status": "succeeded"}
    timestamp = int(headers["x-imagegen-signature"].split(",")[0].removeprefix("t="))
    assert headers["x-imagegen-signature"] == sign_webhook(WEBHOOK_SECRET, body, timestamp)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "webhook_url"


def test_model_replica_killed_mid_batch_loses_no_job(tiers: TierService) -> None:
    with tiers.client("erin") as erin:
        jobs = [submit_job(erin, {"prompt": f"survivor {index}", "size": "64x64"}) for index in range(10)]
        deadline = time.monotonic() + DEADLINE_S
        while not any(erin.get(f"/v1/images/jobs/{job['id']}").json()["status"] != "queued" for job in jobs):
            assert time.monotonic() < deadline
            time.sleep(0.05)  # waiting for the first job to start before killing the replica under it
        ray.kill(serve_actor("ModelReplica-tiny-sd"), no_restart=True)
        finished = [wait_for_job(erin, job["id"]) for job in jobs]
    assert all(job["status"] == "succeeded" for job in finished)
    assert len(tiers.stored_images("erin")) == 10  # exactly one object per image


def test_scheduler_killed_recovers_queued_jobs(tiers: TierService) -> None:
    with tiers.client("frank") as frank:
        jobs = [submit_job(frank, {**BLOCKER, "n": 4})]
        jobs += [submit_job(frank, {"prompt": f"queued {index}", "size": "64x64"}) for index in range(4)]
        ray.kill(serve_actor("Scheduler"), no_restart=True)
        finished = [wait_for_job(frank, job["id"]) for job in jobs]
    assert all(job["status"] == "succeeded" for job in finished)
    assert len(tiers.stored_images("frank")) == 8  # 4 + 4 x 1, none stored twice


def test_edit_as_async_job_keeps_uploads_out_of_the_record(tiers: TierService) -> None:
    files = [
        ("image", ("in.png", noise_png(64, 64), "image/png")),
        ("mask", ("m.png", hole_mask(64, 64), "image/png")),
    ]
    with tiers.client("acme") as acme:
        response = acme.post(
            "/v1/images/edits",
            data={"prompt": "an async edit", "size": "64x64"},
            files=files,
            headers={"prefer": "respond-async"},
        )
        assert response.status_code == 202, response.text
        done = wait_for_job(acme, response.json()["id"])
    (item,) = done["result"]["data"]
    assert Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))).size == (64, 64)
    record = json.loads((tiers.storage_dir / "jobs" / "records" / f"{done['id']}.json").read_text())
    assert len(record["request"]["input_keys"]) == 1 and record["request"]["mask_key"]
    assert "images" not in record["request"]
