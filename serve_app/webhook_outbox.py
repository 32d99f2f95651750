"""Webhooks that are delivered at least once: a durable outbox in the object store.

The rules, in the order they apply:

1. A job's webhook is written to the outbox (``webhooks/outbox/<id>.json``) before the job's
   final record, and handed to the sender only once that record is stored: an outcome is
   announced only when it is final, and never lost between the two writes.
2. The delivery id (``whk_<job id>``) is the same for every attempt, restart and rerun of the
   job; it goes out as the ``webhook-id`` header (the Standard Webhooks convention), so a
   receiver drops repeats.
3. Each attempt resolves the host once, refuses it unless every address is public (or private
   ones are allowed), and connects to the address it checked, with the URL's own Host header and
   TLS server name: a DNS answer that changes between the check and the connection (rebinding)
   cannot reach another address.
4. A failed attempt is tried again after a delay that doubles from ``first_backoff_s`` up to
   ``max_backoff_s``, for ``retry_for_s`` after the webhook was created; the schedule is stored,
   so a restarted scheduler picks up where the old one stopped. A delivered webhook leaves the
   outbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
from pydantic import BaseModel

from deployments.storage import ObjectStore
from serve_app.config import AppConfig
from serve_app.jobs import sign_webhook

OUTBOX = "webhooks/outbox"
logger = logging.getLogger("imagegen.webhooks")
Resolver = Callable[[str, int], Awaitable[list[str]]]


class WebhookDelivery(BaseModel):
    """One webhook to deliver, and where its retry schedule stands."""

    id: str
    job_id: str
    url: str
    payload: dict[str, Any]
    created_at: float
    attempts: int = 0
    next_attempt_at: float = 0.0


def delivery_for_job(job_id: str, url: str, payload: dict[str, Any], now: float) -> WebhookDelivery:
    """A job's webhook; its id depends on the job alone, so a rerun job overwrites, never adds."""
    return WebhookDelivery(id=f"whk_{job_id}", job_id=job_id, url=url, payload=payload, created_at=now)


@dataclass(frozen=True)
class RetryPolicy:
    first_backoff_s: float
    max_backoff_s: float
    retry_for_s: float

    def delay_s(self, attempts: int) -> float:
        """The wait after the ``attempts``-th failed attempt."""
        return float(min(self.first_backoff_s * 2 ** max(attempts - 1, 0), self.max_backoff_s))

    def gives_up(self, delivery: WebhookDelivery, now: float) -> bool:
        return now - delivery.created_at >= self.retry_for_s


class WebhookRefused(Exception):
    """The webhook's host does not resolve, or resolves to an address we do not call."""


async def resolve(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to, without blocking the event loop."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


def is_public(address: str) -> bool:
    return ipaddress.ip_address(address.split("%")[0]).is_global


class WebhookSender:
    """Signs and POSTs one delivery to the address that passed the check."""

    def __init__(
        self,
        secret: str,
        *,
        timeout_s: float,
        allow_private: bool,
        resolver: Resolver = resolve,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.secret = secret
        self.timeout_s = timeout_s
        self.allow_private = allow_private
        self.resolver = resolver
        self.transport = transport

    async def checked_address(self, host: str, port: int) -> str:
        """Resolve once; every address must be public (unless private ones are allowed)."""
        try:
            addresses = await self.resolver(host, port)
        except (OSError, UnicodeError, ValueError) as unresolved:
            raise WebhookRefused(f"{host!r} does not resolve: {unresolved}") from unresolved
        if not addresses:
            raise WebhookRefused(f"{host!r} does not resolve")
        if not self.allow_private and not all(is_public(address) for address in addresses):
            raise WebhookRefused(f"{host!r} resolves to a private address: {addresses}")
        return addresses[0]

    async def send(self, delivery: WebhookDelivery) -> bool:
        """One attempt; True once the receiver answered 2xx."""
        parts = urlsplit(delivery.url)
        host = parts.hostname or ""
        port = parts.port or (443 if parts.scheme == "https" else 80)
        address = await self.checked_address(host, port)
        pinned = httpx.URL(delivery.url).copy_with(host=address)
        body = json.dumps(delivery.payload).encode()
        timestamp = int(time.time())
        headers = {
            "host": parts.netloc.rpartition("@")[2],
            "content-type": "application/json",
            "webhook-id": delivery.id,
            "webhook-timestamp": str(timestamp),
            "x-imagegen-signature": sign_webhook(self.secret, body, timestamp),
        }
        # TLS checks the certificate against the URL's host, not the address connected to.
        extensions = {"sni_hostname": host} if parts.scheme == "https" else {}
        async with httpx.AsyncClient(
            timeout=self.timeout_s, follow_redirects=False, transport=self.transport
        ) as client:
            response = await client.post(pinned, content=body, headers=headers, extensions=extensions)
        if not response.is_success:
            logger.warning("webhook %s answered %d", delivery.id, response.status_code)
        return response.is_success


class WebhookOutbox:
    """Pending webhooks: stored, sent when due, retried with backoff, dropped once delivered."""

    def __init__(
        self,
        store: ObjectStore,
        sender: WebhookSender,
        policy: RetryPolicy,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.store = store
        self.sender = sender
        self.policy = policy
        self.clock = clock
        self.sleep = sleep
        self.armed: dict[str, WebhookDelivery] = {}
        self._wake = asyncio.Event()

    @staticmethod
    def _path(delivery_id: str) -> str:
        return f"{OUTBOX}/{delivery_id}.json"

    def save(self, delivery: WebhookDelivery) -> None:
        """Store a delivery (blocking: call it in a thread)."""
        self.store.put(self._path(delivery.id), delivery.model_dump_json().encode())

    def stored(self) -> list[WebhookDelivery]:
        """Every delivery in the store (blocking)."""
        keys = self.store.list_keys(OUTBOX)
        names = [key.rsplit("/", 1)[-1].removesuffix(".json") for key in keys]
        return [WebhookDelivery.model_validate_json(self.store.get(self._path(name))) for name in names]

    def arm(self, delivery: WebhookDelivery) -> None:
        """Send ``delivery`` when due (its job's outcome is final and stored)."""
        self.armed[delivery.id] = delivery
        self._wake.set()

    async def recover(self, is_final: Callable[[str], bool]) -> None:
        """Arm every stored delivery whose job is final (a job still running stores it again)."""
        for delivery in await asyncio.to_thread(self.stored):
            if await asyncio.to_thread(is_final, delivery.job_id):
                self.arm(delivery)

    async def run(self) -> None:
        """Send what is due, then wait until the next delivery is due or a new one is armed."""
        while True:
            now = self.clock()
            due = [delivery for delivery in self.armed.values() if delivery.next_attempt_at <= now]
            if due:
                await asyncio.gather(*(self._attempt(delivery) for delivery in due))
                continue
            self._wake.clear()
            upcoming = [delivery.next_attempt_at for delivery in self.armed.values()]
            await self._wait(min(upcoming) - now if upcoming else None)

    async def _wait(self, delay_s: float | None) -> None:
        waits: set[asyncio.Future[Any]] = {asyncio.ensure_future(self._wake.wait())}
        if delay_s is not None:
            waits.add(asyncio.ensure_future(self.sleep(delay_s)))  # the backoff timer
        _, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for waiting in pending:
            waiting.cancel()

    async def _attempt(self, delivery: WebhookDelivery) -> None:
        try:
            # Bounded: resolution has no timeout of its own.
            delivered = await asyncio.wait_for(self.sender.send(delivery), 2 * self.sender.timeout_s)
        except Exception as failure:  # any failure is one failed attempt: the outbox keeps running
            logger.warning("webhook %s failed: %r", delivery.id, failure)
            delivered = False
        now = self.clock()
        delivery.attempts += 1
        if delivered or self.policy.gives_up(delivery, now):
            if not delivered:
                logger.error("webhook %s dropped after %d attempts", delivery.id, delivery.attempts)
            self.armed.pop(delivery.id, None)
            with contextlib.suppress(Exception):  # left in the store, it is sent again after a restart
                await asyncio.to_thread(self.store.delete, self._path(delivery.id))
            return
        delivery.next_attempt_at = now + self.policy.delay_s(delivery.attempts)
        with contextlib.suppress(Exception):  # the schedule in memory goes on; a restart starts it over
            await asyncio.to_thread(self.save, delivery)


def outbox_from_config(config: AppConfig, store: ObjectStore) -> WebhookOutbox | None:
    """The scheduler's outbox; None when no webhook secret is configured (webhooks are refused)."""
    if config.auth.webhook_secret is None:
        return None
    settings = config.scheduler
    sender = WebhookSender(
        config.auth.webhook_secret.get_secret_value(),
        timeout_s=settings.webhook_timeout_s,
        allow_private=settings.webhook_allow_private,
    )
    policy = RetryPolicy(
        settings.webhook_first_backoff_s, settings.webhook_max_backoff_s, settings.webhook_retry_for_s
    )
    return WebhookOutbox(store, sender, policy)
