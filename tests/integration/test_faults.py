"""Fault injection on real Ray Serve: a store outage (moto's S3 behind a cuttable TCP proxy),
clients that leave, cancel and retry under saturation, and a local webhook receiver.

This app deploys preprocess and postprocess apart (``colocate: false``), so the faults run through
every hop; the shared test service runs them colocated, the default.

Each test asserts the end state: the breaker closed again, slots free, records final, each
object stored once, each webhook received once.
"""

from __future__ import annotations

import contextlib
import io
import json
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from PIL import Image
from pydantic import SecretStr
from ray import serve

from deployments.config import GenerationLogConfig
from serve_app.app import build_app
from serve_app.config import AppConfig, SchedulerConfig, TierConfig
from tests.integration.conftest import ProxiedS3, RunningService
from tests.integration.tcp_proxy import TcpProxy

APP_NAME = "imagegen-faults"
ROUTE = "/faults"
BUCKET = "imagegen-faults"
PREFIX = "images"
WEBHOOK_SECRET = "faults-webhook-secret"
API_KEY = "sk-faults-tenant-0001"
TENANT = "faults"
TRICKLE_KEY = "sk-faults-trickle-0001"  # a tenant allowed one request a minute
DEADLINE_S = 120.0
SMALL = {"prompt": "a small square", "size": "64x64"}
SLOW_BODY_TIMEOUT_S = 3.0
SLOW = {"prompt": "a slow square", "size": "128x128", "n": 4, "num_inference_steps": 12}


@dataclass
class WebhookLog:
    deliveries: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def ids_for_job(self, job_id: str) -> set[str]:
        """The ``webhook-id`` headers of every delivery about ``job_id``."""
        with self.lock:
            deliveries = list(self.deliveries)
        return {
            {name.lower(): value for name, value in headers.items()}["webhook-id"]
            for headers, body in deliveries
            if json.loads(body)["id"] == job_id
        }

    def for_job(self, job_id: str) -> list[dict[str, Any]]:
        with self.lock:
            payloads = [json.loads(body) for _, body in self.deliveries]
        return [payload for payload in payloads if payload["id"] == job_id]


@dataclass(frozen=True)
class FaultService:
    base_url: str
    proxy: TcpProxy
    s3: Any  # a boto3 client talking to moto directly, never through the proxy
    webhooks: WebhookLog
    webhook_url: str

    def client(self, timeout: float = DEADLINE_S, key: str = API_KEY) -> httpx.Client:
        headers = {"authorization": f"Bearer {key}"}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)

    def object_keys(self, prefix: str) -> list[str]:
        listing = self.s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix)
        return [item["Key"] for item in listing.get("Contents", [])]


def webhook_receiver(log: WebhookLog) -> ThreadingHTTPServer:
    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["content-length"]))
            with log.lock:
                log.deliveries.append((dict(self.headers), body))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture(scope="module")
def faults(
    service: RunningService, proxied_s3: ProxiedS3, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[FaultService]:
    keys_file = tmp_path_factory.mktemp("faults") / "keys.yaml"
    keys = [
        {"key": API_KEY, "tenant": TENANT, "tier": "paid"},
        {"key": TRICKLE_KEY, "tenant": "trickle", "tier": "trickle"},
    ]
    keys_file.write_text(json.dumps({"keys": keys}))
    webhooks = WebhookLog()
    receiver = webhook_receiver(webhooks)
    try:
        storage = proxied_s3.storage(
            BUCKET, PREFIX, breaker_reset_s=1.0, log=GenerationLogConfig(enabled=False)
        )
        auth = service.config.auth.model_copy(
            update={"webhook_secret": SecretStr(WEBHOOK_SECRET), "keys_file": keys_file}
        )
        limits = service.config.limits.model_copy(update={"body_read_timeout_s": SLOW_BODY_TIMEOUT_S})
        scheduler = SchedulerConfig(
            slots_per_replica=1,
            defer_at_backlog=0,
            shed_at_backlog=256,
            max_backlog=512,
            webhook_allow_private=True,
        )
        stages = service.config.stages
        apart = {
            "preprocess": stages.preprocess.model_copy(update={"colocate": False}),
            "postprocess": stages.postprocess.model_copy(update={"colocate": False}),
        }
        config: AppConfig = service.config.model_copy(
            update={
                "stages": stages.model_copy(update=apart),
                "storage": storage,
                "auth": auth,
                "scheduler": scheduler,
                "limits": limits,
                "tiers": {**service.config.tiers, "trickle": TierConfig(requests_per_minute=1)},
            }
        )
        serve.run(build_app(config), name=APP_NAME, route_prefix=ROUTE)
        yield FaultService(
            f"{service.base_url}{ROUTE}",
            proxied_s3.proxy,
            proxied_s3.client,
            webhooks,
            f"http://127.0.0.1:{receiver.server_address[1]}/hook",
        )
    finally:
        serve.delete(APP_NAME)
        receiver.shutdown()
        receiver.server_close()


def scheduler_stats() -> dict[str, Any]:
    handle = serve.get_deployment_handle("Scheduler", app_name=APP_NAME)
    stats: dict[str, Any] = handle.stats.remote().result()
    return stats


def is_idle(stats: dict[str, Any]) -> bool:
    variant = stats["variants"]["tiny-sd"]
    queued = sum(value for name, value in variant.items() if name.startswith("queued_"))
    return bool(variant["in_flight"] == 0 and queued == 0 and stats["jobs_running"] == 0)


def wait_until_idle() -> dict[str, Any]:
    deadline = time.monotonic() + DEADLINE_S
    while not is_idle(stats := scheduler_stats()):
        assert time.monotonic() < deadline, f"slots still in use at idle: {stats}"
        time.sleep(0.2)  # polling the scheduler until the work in flight drains
    return stats


def submit_job(client: httpx.Client, body: dict[str, object]) -> httpx.Response:
    return client.post("/v1/images/generations", json=body, headers={"prefer": "respond-async"})


def wait_for_job(client: httpx.Client, job_id: str, until: tuple[str, ...] = ()) -> dict[str, Any]:
    """Poll a job until it is finished (or reaches one of ``until``)."""
    deadline = time.monotonic() + DEADLINE_S
    while True:
        job: dict[str, Any] = client.get(f"/v1/images/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "cancelled", *until):
            return job
        assert time.monotonic() < deadline, f"job {job_id} stuck {job['status']}"
        time.sleep(0.1)  # polling, as a client of the jobs API does


def test_a_probe_spent_on_a_job_still_closes_the_storage_breaker(faults: FaultService) -> None:
    url_body = {**SMALL, "response_format": "url"}
    with faults.client() as client:
        assert client.post("/v1/images/generations", json=url_body).status_code == 200
        faults.proxy.cut()
        try:
            for _ in range(3):  # failed uploads open the ingress's breaker
                failed = client.post("/v1/images/generations", json=url_body)
                assert failed.status_code == 503, failed.text
                assert failed.json()["error"]["code"] == "storage_unavailable"
        finally:
            faults.proxy.restore()
        # Once half-open, the first request through is the probe: here an async job, which never
        # uploads in the ingress. Its outcome (accepted: the store took its record) must count.
        deadline = time.monotonic() + DEADLINE_S
        while (accepted := submit_job(client, url_body)).status_code == 503:
            assert time.monotonic() < deadline, "the breaker never half-opened"
            time.sleep(0.1)  # polling until the breaker lets a probe through
        assert accepted.status_code == 202, accepted.text
        while (response := client.post("/v1/images/generations", json=url_body)).status_code == 503:
            assert time.monotonic() < deadline, "the store is back, but the breaker stays open"
            time.sleep(0.1)  # polling until the breaker closes
        assert response.status_code == 200, response.text
        assert wait_for_job(client, accepted.json()["id"])["status"] == "succeeded"


def test_a_job_running_through_a_store_outage_succeeds_once(faults: FaultService) -> None:
    with faults.client() as client, ThreadPoolExecutor(1) as pool:
        blocker = pool.submit(client.post, "/v1/images/generations", json=SLOW)  # b64: no store
        deadline = time.monotonic() + DEADLINE_S
        while scheduler_stats()["variants"]["tiny-sd"]["in_flight"] == 0:
            assert time.monotonic() < deadline, "the blocking request never started"
            time.sleep(0.05)  # polling until the blocker holds the only slot
        body = {**SMALL, "n": 2, "response_format": "url", "webhook_url": faults.webhook_url}
        accepted = submit_job(client, body)
        assert accepted.status_code == 202, accepted.text
        job_id = accepted.json()["id"]
        faults.proxy.cut()
        try:
            assert blocker.result().status_code == 200
            wait_for_job(client, job_id, until=("running",))  # granted: it is saving its record now
            # Once a new job cannot be recorded either, the running job has met the outage too.
            while submit_job(client, SMALL).status_code != 503:
                assert time.monotonic() < deadline, "the outage was never felt"
        finally:
            faults.proxy.restore()
        done = wait_for_job(client, job_id)
    assert done["status"] == "succeeded", done
    assert len(done["result"]["data"]) == 2
    images = [key for key in faults.object_keys(f"{PREFIX}/{TENANT}/") if key.endswith(".png")]
    for item in done["result"]["data"]:
        key = httpx.URL(item["url"]).path.removeprefix(f"/{BUCKET}/")
        assert images.count(key) == 1
    deadline = time.monotonic() + DEADLINE_S
    while not faults.webhooks.for_job(job_id):
        assert time.monotonic() < deadline, "no webhook arrived"
        time.sleep(0.1)  # polling the receiver for the delivery
    assert faults.webhooks.for_job(job_id) == [{"id": job_id, "object": "image.job", "status": "succeeded"}]
    assert faults.webhooks.ids_for_job(job_id) == {f"whk_{job_id}"}  # receivers drop repeats by it
    wait_until_idle()


def test_a_rate_limited_edit_job_leaves_no_uploads_in_the_store(faults: FaultService) -> None:
    image = io.BytesIO()
    Image.new("RGB", (64, 64), "white").save(image, format="PNG")
    form = {"prompt": "a small square", "size": "64x64"}
    files = {"image": ("image.png", image.getvalue(), "image/png")}
    headers = {"prefer": "respond-async"}
    uploads = f"{PREFIX}/jobs/uploads/"
    with faults.client(key=TRICKLE_KEY) as client:
        accepted = client.post("/v1/images/edits", data=form, files=files, headers=headers)
        assert accepted.status_code == 202, accepted.text
        assert wait_for_job(client, accepted.json()["id"])["status"] == "succeeded"
        assert faults.object_keys(uploads) == []  # a finished job's uploads are deleted
        limited = client.post("/v1/images/edits", data=form, files=files, headers=headers)
    assert limited.status_code == 429, limited.text
    assert limited.json()["error"]["code"] == "rate_limit_exceeded"
    assert faults.object_keys(uploads) == []  # refused before its uploads were written


def test_slots_all_come_back_after_cancels_and_disconnects_under_saturation(faults: FaultService) -> None:
    def leave_early(index: int) -> None:
        # the client gives up while queued, while granted or while its images are made
        timeout = 0.2 + 0.1 * (index % 5)
        with faults.client(timeout=timeout) as impatient, contextlib.suppress(httpx.TimeoutException):
            impatient.post("/v1/images/generations", json={**SMALL, "prompt": f"impatient {index}"})

    def submit_and_cancel(index: int) -> str | None:
        with faults.client() as client:
            response = submit_job(client, {**SMALL, "prompt": f"cancelled {index}"})
            if response.status_code != 202:
                return None
            job_id: str = response.json()["id"]
            client.delete(f"/v1/images/jobs/{job_id}")
            return job_id

    def submit_twice(index: int) -> str | None:
        with faults.client() as client:
            headers = {"idempotency-key": f"hammer-{index}"}
            body = {**SMALL, "prompt": f"idempotent {index}"}
            first = client.post(
                "/v1/images/generations", json=body, headers={**headers, "prefer": "respond-async"}
            )
            client.post("/v1/images/generations", json=body, headers={**headers, "prefer": "respond-async"})
            return str(first.json()["id"]) if first.status_code == 202 else None

    with faults.client() as client:
        saturating = submit_job(client, SLOW)
        assert saturating.status_code == 202
        with ThreadPoolExecutor(12) as pool:
            work = [pool.submit(leave_early, index) for index in range(24)]
            cancelled = [pool.submit(submit_and_cancel, index) for index in range(24)]
            repeated = [pool.submit(submit_twice, index) for index in range(8)]
            for future in work:
                future.result()
            job_ids = [job_id for future in [*cancelled, *repeated] if (job_id := future.result())]
        wait_until_idle()
        finished = [wait_for_job(client, job_id) for job_id in [saturating.json()["id"], *job_ids]]
        assert {job["status"] for job in finished} <= {"succeeded", "cancelled"}
        # the freed capacity serves new work
        assert client.post("/v1/images/generations", json=SMALL).status_code == 200
    assert is_idle(wait_until_idle())


def send_partial_body(faults: FaultService, authorization: str | None) -> int:
    """Send headers and the first part of a JSON body, then nothing more; return the status."""
    url = httpx.URL(faults.base_url)
    lines = [
        f"POST {url.path}/v1/images/generations HTTP/1.1",
        f"host: {url.host}:{url.port}",
        "content-type: application/json",
        "content-length: 1000",
        *([f"authorization: {authorization}"] if authorization else []),
    ]
    with socket.create_connection((url.host, url.port or 80), timeout=DEADLINE_S) as connection:
        connection.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + b'{"prompt": "sl')
        with connection.makefile("rb") as response:  # the socket closes only once this file does
            status_line = response.readline().decode()
    return int(status_line.split()[1])


def test_a_slow_body_is_cut_off_holding_no_slot(faults: FaultService) -> None:
    assert send_partial_body(faults, f"Bearer {API_KEY}") == 408
    assert is_idle(scheduler_stats())


def test_the_key_is_checked_before_the_body_is_read(faults: FaultService) -> None:
    # A body that never arrives: only a server that checks the key first can answer it.
    assert send_partial_body(faults, None) == 401
    assert send_partial_body(faults, "Bearer sk-not-a-key") == 401


def test_a_stream_through_postprocess_deployed_apart_reaches_the_model_it_is_handed(
    faults: FaultService,
) -> None:
    """Postprocess (a deployment of its own here) streams from the model replica whose handle
    the chain passes with the call, and the slot comes back when the stream ends."""
    body = {**SMALL, "stream": True, "partial_images": 2, "num_inference_steps": 4}
    with faults.client() as client, client.stream("POST", "/v1/images/generations", json=body) as response:
        assert response.status_code == 200
        events = [line.split(": ", 1)[1] for line in response.iter_lines() if line.startswith("event: ")]
    assert events == ["image_generation.partial_image"] * 2 + ["image_generation.completed"], events
    wait_until_idle()
