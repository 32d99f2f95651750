"""The webhook outbox: at-least-once delivery over long receiver outages and restarts, one id per
webhook, and connections only to the address that passed the check.

Real parts: a local HTTP receiver, a file:// object store, the scheduler class on a plain event
loop. Faked below the boundary: the clock and the backoff timer (an outage of virtual minutes),
the DNS resolver (a rebinding one) and, for the rebinding test, the network (httpx's MockTransport
records which address a connection goes to).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from deployments.config import StorageConfig
from deployments.errors import InvalidRequestError
from deployments.stage_chain import StageChain
from deployments.storage import ObjectStore
from serve_app import service as service_module
from serve_app.config import SchedulerConfig
from serve_app.service import ImageService
from serve_app.webhook_outbox import (
    OUTBOX,
    RetryPolicy,
    WebhookOutbox,
    WebhookRefused,
    WebhookSender,
    delivery_for_job,
)
from tests.conftest import make_test_config
from tests.job_harness import FakeStages, scheduler_config, start_scheduler, submission, until

SECRET = "outbox-secret"
OLD_WINDOW_S = 3.5  # the four attempts the scheduler used to make, then gave up
POLICY = RetryPolicy(first_backoff_s=1.0, max_backoff_s=600.0, retry_for_s=24 * 3600.0)
PAYLOAD = {"id": "job_1", "object": "image.job", "status": "succeeded"}


@dataclass
class Receiver:
    """A webhook receiver that answers 503 while ``down``; it keeps every attempt's headers and body."""

    url: str = ""
    down: bool = True
    attempts: list[tuple[dict[str, str], bytes, int]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def delivered(self) -> list[tuple[dict[str, str], bytes]]:
        with self.lock:
            return [(headers, body) for headers, body, status in self.attempts if status == 204]

    def count(self) -> int:
        with self.lock:
            return len(self.attempts)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["content-length"]))
            status = 503 if state.down else 204
            with state.lock:
                state.attempts.append(({k.lower(): v for k, v in self.headers.items()}, body, status))
            self.send_response(status)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


class VirtualTime:
    """A clock the backoff timer moves forward: minutes of retries pass at once."""

    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds
        await asyncio.sleep(0)


def outbox(store: ObjectStore, time: VirtualTime, sender: WebhookSender | None = None) -> WebhookOutbox:
    sender = sender or WebhookSender(SECRET, timeout_s=10.0, allow_private=True)
    return WebhookOutbox(store, sender, POLICY, clock=time.clock, sleep=time.sleep)


def file_store(tmp_path: Path) -> ObjectStore:
    return ObjectStore(StorageConfig(url=f"file://{tmp_path / 'store'}"))


def signature_is_valid(headers: dict[str, str], body: bytes) -> bool:
    timestamp, _, digest = headers["x-imagegen-signature"].partition(",v1=")
    message = timestamp.removeprefix("t=").encode() + b"." + body
    return hmac.compare_digest(digest, hmac.new(SECRET.encode(), message, hashlib.sha256).hexdigest())


async def running(box: WebhookOutbox, condition: Callable[[], bool]) -> None:
    """Run the outbox until ``condition`` holds, then stop it (as a scheduler stops)."""
    task = asyncio.ensure_future(box.run())
    try:
        await until(condition)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


def test_a_receiver_down_for_minutes_then_up_gets_the_webhook_once(
    tmp_path: Path, receiver: Receiver
) -> None:
    async def scenario() -> None:
        time = VirtualTime()
        box = outbox(file_store(tmp_path), time)
        delivery = delivery_for_job("job_1", receiver.url, PAYLOAD, time.now)
        await asyncio.to_thread(box.save, delivery)
        box.arm(delivery)
        await running(box, lambda: time.now - delivery.created_at > 120 or receiver.count() > 20)
        assert time.now - delivery.created_at > OLD_WINDOW_S and receiver.delivered() == []
        receiver.down = False
        # Until the outbox has seen the 2xx and dropped its file, not merely until the receiver got it.
        await running(box, lambda: bool(receiver.delivered()) and not box.store.list_keys(OUTBOX))
        [(headers, body)] = receiver.delivered()
        assert json.loads(body) == PAYLOAD and signature_is_valid(headers, body)
        ids = {headers["webhook-id"] for headers, _, _ in receiver.attempts}
        assert ids == {"whk_job_1"}  # one id across every attempt: receivers drop repeats
        assert receiver.count() > 4  # more than the old four attempts
        assert box.store.list_keys(OUTBOX) == [] and box.armed == {}

    asyncio.run(scenario())


def test_a_restarted_outbox_delivers_what_the_stopped_one_had_not(tmp_path: Path, receiver: Receiver) -> None:
    async def scenario() -> None:
        time = VirtualTime()
        first = outbox(file_store(tmp_path), time)
        done = delivery_for_job("job_done", receiver.url, PAYLOAD, time.now)
        unfinished = delivery_for_job("job_running", receiver.url, PAYLOAD, time.now)
        for delivery in (done, unfinished):
            await asyncio.to_thread(first.save, delivery)
        first.arm(done)
        await running(first, lambda: receiver.count() >= 2)  # then the scheduler stops
        assert receiver.delivered() == []
        receiver.down = False
        restarted = outbox(file_store(tmp_path), time)
        await restarted.recover(is_final=lambda job_id: job_id == "job_done")
        assert set(restarted.armed) == {"whk_job_done"}  # a job still running sends its own later

        def stored() -> list[str]:
            return [key.rsplit("/", 1)[-1] for key in restarted.store.list_keys(OUTBOX)]

        await running(restarted, lambda: bool(receiver.delivered()) and len(stored()) < 2)
        [(headers, _)] = receiver.delivered()
        assert headers["webhook-id"] == "whk_job_done"
        assert stored() == ["whk_job_running.json"]

    asyncio.run(scenario())


def test_a_scheduler_restart_with_an_undelivered_webhook_still_delivers_it(
    tmp_path: Path, receiver: Receiver
) -> None:
    async def scenario() -> None:
        config = make_config(tmp_path)
        first = start_scheduler(config, FakeStages())
        await first.ready()
        job = submission(config)
        job = type(job)(job.work, job.request, job.options, job.quality, webhook_url=receiver.url)
        view = await first.submit(job)
        await asyncio.wait_for(first.wait("local", view.record.id), 30)
        await until(lambda: receiver.count() >= 1)
        for task in list(first._background):  # the scheduler process dies
            task.cancel()
        assert receiver.delivered() == []
        receiver.down = False
        restarted = start_scheduler(config, FakeStages())
        await restarted.ready()
        await until(lambda: bool(receiver.delivered()))
        [(headers, body)] = receiver.delivered()
        assert json.loads(body)["id"] == view.record.id and json.loads(body)["status"] == "succeeded"
        assert headers["webhook-id"] == f"whk_{view.record.id}"
        for task in list(restarted._background):
            task.cancel()

    asyncio.run(scenario())


def make_config(tmp_path: Path) -> Any:
    config = scheduler_config(tmp_path)
    scheduler = SchedulerConfig(
        **{
            **config.scheduler.model_dump(),
            "webhook_allow_private": True,
            "webhook_first_backoff_s": 0.05,
            "webhook_max_backoff_s": 0.05,
        }
    )
    auth = config.auth.model_copy(update={"webhook_secret": SecretStr(SECRET)})
    return config.model_copy(update={"scheduler": scheduler, "auth": auth})


def test_a_rebinding_resolver_cannot_reach_a_private_address() -> None:
    answers = [["93.184.216.34"], ["127.0.0.1"]]  # public at the check, private a moment later

    async def rebinding(host: str, port: int) -> list[str]:
        return answers.pop(0) if len(answers) > 1 else answers[0]

    connections: list[httpx.Request] = []

    def network(request: httpx.Request) -> httpx.Response:
        connections.append(request)
        return httpx.Response(204)

    sender = WebhookSender(
        SECRET,
        timeout_s=5.0,
        allow_private=False,
        resolver=rebinding,
        transport=httpx.MockTransport(network),
    )
    delivery = delivery_for_job("job_1", "http://hooks.example.com:8080/in", PAYLOAD, 0.0)

    async def scenario() -> None:
        assert await sender.send(delivery)
        [connection] = connections
        assert connection.url.host == "93.184.216.34"  # the address checked is the address connected to
        assert connection.headers["host"] == "hooks.example.com:8080"
        with pytest.raises(WebhookRefused):  # the rebound answer is refused, not connected to
            await sender.send(delivery)
        assert len(connections) == 1

    asyncio.run(scenario())


def test_https_webhooks_keep_their_host_name_for_tls() -> None:
    async def resolver(host: str, port: int) -> list[str]:
        return ["93.184.216.34"]

    seen: list[httpx.Request] = []

    def network(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200)

    sender = WebhookSender(
        SECRET, timeout_s=5.0, allow_private=False, resolver=resolver, transport=httpx.MockTransport(network)
    )
    delivery = delivery_for_job("job_1", "https://hooks.example.com/in", PAYLOAD, 0.0)
    assert asyncio.run(sender.send(delivery))
    [request] = seen
    assert request.url.host == "93.184.216.34" and request.extensions["sni_hostname"] == "hooks.example.com"
    assert request.headers["host"] == "hooks.example.com"


def test_the_backoff_doubles_up_to_its_bound() -> None:
    assert [POLICY.delay_s(attempt) for attempt in (1, 2, 3, 11, 30)] == [1.0, 2.0, 4.0, 600.0, 600.0]


def test_without_a_secret_a_webhook_url_is_refused_before_its_host_is_resolved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    resolved: list[str] = []
    monkeypatch.setattr(service_module, "check_webhook_url", lambda url, allow_private: resolved.append(url))
    config = make_test_config(tmp_path / "store")
    assert config.auth.webhook_secret is None
    service = ImageService(config, StageChain(None, None, {}), None)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError) as refused:
        asyncio.run(service.check_webhook("http://hooks.example.com/in"))
    assert refused.value.code == "webhooks_disabled"
    assert resolved == []  # no DNS lookup for a request that is refused anyway
