"""Tiers, rate limits, shedding, async jobs, idempotency, webhooks and recovery on real Ray Serve.

A second app runs beside the default one with API keys, one image slot (so order is visible)
and low shedding thresholds. Its model waits at a gate (tests/integration/model_gate.py) before
each forward pass, so "while the model is busy" is a state the tests set, never a race.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar, TypeVar

import httpx
import pytest
import ray
from PIL import Image
from pydantic import SecretStr
from ray import serve

from deployments.model_replica import ReplicaStats
from serve_app.app import build_app
from serve_app.config import AppConfig, SchedulerConfig, TierConfig
from tests.images import hole_mask, noise_png
from tests.integration.conftest import RunningService
from tests.integration.model_gate import GATED_FAMILY, closed, start_gate
from tests.polling import wait_until

APP_NAME = "imagegen-tiers"
ROUTE = "/tiers"
WEBHOOK_SECRET = "webhook-test-secret"
DEADLINE_S = 300.0  # generous: a loaded 2-core machine is slow; passing tests never wait it out
KEYS = {
    "acme": ("sk-paid-acme-0001", "paid"),
    "bob": ("sk-free-bob-0001", "free"),
    "carol": ("sk-free-carol-001", "free"),
    "dave": ("sk-trial-dave-001", "trial"),
    "erin": ("sk-paid-erin-0001", "paid"),
    "frank": ("sk-paid-frank-001", "paid"),
    "gina": ("sk-paid-gina-0001", "paid"),
}
BLOCKER = {"prompt": "a blocking job", "size": "64x64"}
JOB_ATTEMPTS = 2
T = TypeVar("T")


@dataclass(frozen=True)
class TierService:
    base_url: str
    storage_dir: Path
    gate: ray.actor.ActorHandle

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
    variants = [variant.model_copy(update={"family": GATED_FAMILY}) for variant in service.config.variants]
    config: AppConfig = service.config.model_copy(
        update={
            "storage": storage,
            "auth": auth,
            "variants": variants,
            "tiers": {
                "paid": TierConfig(),
                # Free work never ages past paid work within a test: the order under test is the tiers'.
                "free": TierConfig(queue_delay_s=300.0, sheddable=True, max_wait_s=600),
                "trial": TierConfig(requests_per_minute=2),
            },
            "scheduler": SchedulerConfig(
                slots_per_replica=1,
                defer_at_backlog=0,
                shed_at_backlog=3,
                max_backlog=200,
                job_attempts=JOB_ATTEMPTS,
                webhook_allow_private=True,
            ),
        }
    )
    gate = start_gate()
    serve.run(build_app(config), name=APP_NAME, route_prefix=ROUTE)
    try:
        yield TierService(f"{service.base_url}{ROUTE}", directory / "store", gate)
    finally:
        serve.delete(APP_NAME)
        ray.kill(gate)


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


def replica_names(deployment: str) -> list[str]:
    return [
        actor["name"]
        for actor in ray.util.list_named_actors(all_namespaces=True)
        if actor["name"].startswith(f"SERVE_REPLICA::{APP_NAME}#{deployment}#")
    ]


def kill_replica(deployment: str) -> None:
    """Kill the deployment's one replica and wait until it is gone (Serve then starts another)."""
    (name,) = replica_names(deployment)
    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
    wait_until(lambda: name not in replica_names(deployment), f"{name} to be gone")


def replica_stats() -> ReplicaStats | None:
    """The model replica's state; None while Serve replaces a killed one."""
    handle = serve.get_deployment_handle("ModelReplica-tiny-sd", app_name=APP_NAME)
    try:
        stats: ReplicaStats = handle.stats.remote().result(timeout_s=DEADLINE_S)
    except ray.exceptions.RayError:
        return None
    return stats


def in_a_forward_pass(images: int) -> Callable[[], ReplicaStats | None]:
    """A condition: the model holds ``images`` tasks in a pass (at the closed gate)."""
    return lambda: stats if (stats := replica_stats()) is not None and stats.running == images else None


def scheduler_stats() -> dict[str, object]:
    stats: dict[str, object] = (
        serve.get_deployment_handle("Scheduler", app_name=APP_NAME)
        .stats.remote()
        .result(timeout_s=DEADLINE_S)
    )
    return stats


def queued_images(tier: str) -> int:
    variants: dict[str, dict[str, int]] = scheduler_stats()["variants"]  # type: ignore[assignment]
    return variants["tiny-sd"][f"queued_{tier}"]


def job_record(tiers: TierService, job_id: str) -> dict[str, object]:
    record: dict[str, object] = json.loads(
        (tiers.storage_dir / "jobs" / "records" / f"{job_id}.json").read_text()
    )
    return record


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
        with closed(tiers.gate):  # the blocker holds the one slot until the gate opens
            blocker = submit_job(acme, BLOCKER)
            wait_until(in_a_forward_pass(1), "the blocker to be in a forward pass")
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
    def generate(client: httpx.Client) -> httpx.Response:
        return client.post("/v1/images/generations", json={"prompt": "burst", "size": "64x64"})

    with tiers.client("acme") as acme, tiers.client("carol") as carol, ThreadPoolExecutor(12) as pool:
        with closed(tiers.gate):  # nothing completes until the whole burst has arrived
            blocker = submit_job(acme, BLOCKER)
            wait_until(in_a_forward_pass(1), "the blocker to be in a forward pass")
            # Paid requests arrive in the middle of the free burst, not after it.
            burst = [carol] * 4 + [acme] * 4 + [carol] * 4
            futures = [pool.submit(generate, client) for client in burst]
            free_futures = [future for future, client in zip(futures, burst, strict=True) if client is carol]
            wait_until(
                lambda: (
                    queued_images("paid") == 4
                    and queued_images("free") + sum(future.done() for future in free_futures) == 8
                ),
                "every request of the burst to be queued or shed",
            )
        free = [future.result() for future in free_futures]
        paid = [future.result() for future, client in zip(futures, burst, strict=True) if client is acme]
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
        with closed(tiers.gate):
            before = wait_until(in_a_forward_pass(0), "an idle model replica")
            running = submit_job(acme, {"prompt": "cancelled mid-run", "size": "64x64", "n": 2})
            queued = submit_job(acme, {"prompt": "never runs", "size": "64x64"})
            cancelled = acme.delete(f"/v1/images/jobs/{queued['id']}")
            assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
            wait_until(in_a_forward_pass(2), "the job's two images to be in a forward pass")
            assert acme.delete(f"/v1/images/jobs/{running['id']}").json()["status"] == "cancelled"
            # The replica let go of both tasks: nobody waits for them any more.
            wait_until(
                lambda: (
                    (stats := replica_stats()) is not None
                    and (stats.in_flight, stats.cancelled) == (0, before.cancelled + 2)
                ),
                "the replica to drop the cancelled tasks",
            )
        # Once the gate opens, the pass stops at its first denoising step instead of running on.
        after = wait_until(in_a_forward_pass(0), "the cancelled pass to end")
        assert after.stopped_passes == before.stopped_passes + 1
        assert wait_for_job(acme, queued["id"], ("cancelled",))["status"] == "cancelled"
        assert wait_for_job(acme, running["id"], ("cancelled",))["status"] == "cancelled"
        assert acme.get("/v1/images/jobs/job_does_not_exist").status_code == 404


def test_idempotency_key_same_body_same_result_other_body_422(tiers: TierService) -> None:
    body = {"prompt": "idempotent", "size": "64x64", "response_format": "url"}
    key = f"idem-{uuid.uuid4().hex}"

    def post(**headers: str) -> httpx.Response:
        return acme.post("/v1/images/generations", json=body, headers={"idempotency-key": key, **headers})

    with tiers.client("acme") as acme, ThreadPoolExecutor(max_workers=2) as pool:
        with closed(tiers.gate):  # the first request's job is still running while the repeats arrive
            first_call = pool.submit(post)
            wait_until(in_a_forward_pass(1), "the first request's image to be in a forward pass")
            attached_call = pool.submit(post)
            wait_until(lambda: scheduler_stats()["waiting_callers"] == 2, "the repeat to wait for the first")
            while_running = post(prefer="respond-async")
            assert while_running.status_code == 202 and while_running.json()["status"] == "running"
        first, attached = first_call.result(), attached_call.result()
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
    assert len(job_ids) == 1 and while_running.json()["id"] in job_ids
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
        server.server_close()
    headers, body = WebhookReceiver.received[0]
    assert json.loads(body) == {"id": job["id"], "object": "image.job", "status": "succeeded"}
    # What a receiver does with the README's scheme: t=<unix>,v1=<hex HMAC-SHA256 of "<t>.<body>">.
    timestamp = headers["x-imagegen-signature"].split(",")[0].removeprefix("t=")
    expected = hmac.new(WEBHOOK_SECRET.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    assert headers["x-imagegen-signature"] == f"t={timestamp},v1={expected}"
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "webhook_url"


def test_model_replica_killed_mid_batch_loses_no_job(tiers: TierService) -> None:
    with tiers.client("erin") as erin:
        with closed(tiers.gate):
            first = submit_job(erin, {"prompt": "survivor", "size": "64x64", "n": 2})
            queued = [submit_job(erin, {"prompt": f"queued {index}", "size": "64x64"}) for index in range(2)]
            wait_until(in_a_forward_pass(2), "the first job to be in a forward pass")
            kill_replica("ModelReplica-tiny-sd")
        finished = [wait_for_job(erin, job["id"]) for job in [first, *queued]]
    assert all(job["status"] == "succeeded" for job in finished)
    assert job_record(tiers, first["id"])["attempts"] == 2  # the pass that died was run again
    assert len(tiers.stored_images("erin")) == 4  # exactly one object per image


def test_a_job_whose_replica_keeps_dying_fails_after_its_attempts(tiers: TierService) -> None:
    with tiers.client("gina") as gina, closed(tiers.gate):
        job = submit_job(gina, {"prompt": "doomed", "size": "64x64"})
        for _ in range(JOB_ATTEMPTS):
            wait_until(in_a_forward_pass(1), "the job to be in a forward pass")
            kill_replica("ModelReplica-tiny-sd")
        failed = wait_for_job(gina, job["id"], ("failed",))
    assert failed["error"]["message"] == "A model replica became unavailable; retry shortly.", failed
    assert job_record(tiers, job["id"])["attempts"] == JOB_ATTEMPTS
    assert tiers.stored_images("gina") == []


def test_scheduler_killed_recovers_queued_jobs(tiers: TierService) -> None:
    with tiers.client("frank") as frank:
        jobs = [submit_job(frank, {**BLOCKER, "n": 4})]
        jobs += [submit_job(frank, {"prompt": f"queued {index}", "size": "64x64"}) for index in range(4)]
        kill_replica("Scheduler")
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
