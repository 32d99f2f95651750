"""Async jobs: their durable records in the object store, and how webhooks are checked and signed.

A record is one JSON object at ``jobs/records/<id>.json``; while a job is not finished an empty
marker sits at ``jobs/active/<id>``, so a restarted scheduler finds what to resume by listing
the markers alone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import ipaddress
import json
import re
import socket
import time
import uuid
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, Field

from deployments.contracts import EncodeOptions, ImageRequest
from deployments.errors import InvalidRequestError
from deployments.storage import ObjectStore
from serve_app.errors import StatusError
from serve_app.protocol import JobStatus

TERMINAL: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})
RECORDS = "jobs/records"
ACTIVE = "jobs/active"
IDEMPOTENCY = "jobs/idempotency"
JOB_ID = re.compile(r"job_[0-9a-f]{32}")


class JobImage(BaseModel):
    object_key: str
    seed: int
    byte_count: int


class JobRecord(BaseModel):
    """Everything needed to answer about a job and to run it again after a restart."""

    id: str
    tenant: str
    tier: str
    status: JobStatus = "queued"
    created_at: float
    updated_at: float
    completed_at: float | None = None
    request: dict[str, Any] = Field(description="The ImageRequest, as a dict.")
    options: dict[str, Any] = Field(description="The client's EncodeOptions, as a dict.")
    quality: str
    order_key: float = 0.0
    attempts: int = 0
    idempotency_key: str | None = None
    body_sha256: str | None = None
    webhook_url: str | None = None
    images: list[JobImage] = Field(default_factory=list)
    error_type: str | None = None
    error_code: str | None = None
    error_message: str | None = None
    error_status: int | None = None

    @property
    def failure(self) -> StatusError:
        """The error a failed job ended with, as its client sees it."""
        return StatusError(
            self.error_message or "The job failed.",
            status=self.error_status or 500,
            error_type=self.error_type or "server_error",
            code=self.error_code,
        )

    @property
    def image_request(self) -> ImageRequest:
        fields = dict(self.request)
        fields["input_keys"] = tuple(fields.get("input_keys", ()))
        fields["moderation_checks"] = tuple(fields.get("moderation_checks", ()))
        fields["images"] = ()  # uploads live in the store under input_keys, never in the record
        return ImageRequest(**fields)

    @property
    def encode_options(self) -> EncodeOptions:
        return EncodeOptions(**self.options)

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL


def new_job_id() -> str:
    return f"job_{uuid.uuid4().hex}"


def new_record(
    request: ImageRequest,
    options: EncodeOptions,
    *,
    tier: str,
    quality: str,
    idempotency_key: str | None,
    body_sha256: str | None,
    webhook_url: str | None,
) -> JobRecord:
    now = time.time()
    return JobRecord(
        id=request.request_id,
        tenant=request.tenant,
        tier=tier,
        created_at=now,
        updated_at=now,
        request={
            key: value for key, value in dataclasses.asdict(request).items() if key not in ("images", "mask")
        },
        options=dataclasses.asdict(options),
        quality=quality,
        idempotency_key=idempotency_key,
        body_sha256=body_sha256,
        webhook_url=webhook_url,
    )


class JobStore:
    """Job records in the object store (through its retries and circuit breaker)."""

    def __init__(self, store: ObjectStore) -> None:
        self.store = store

    def save(self, record: JobRecord) -> None:
        record.updated_at = time.time()
        if record.is_terminal and record.completed_at is None:
            record.completed_at = record.updated_at
        self.store.put(f"{RECORDS}/{record.id}.json", record.model_dump_json().encode())
        if record.is_terminal:
            self.forget_active(record.id)
        else:
            self.store.put(f"{ACTIVE}/{record.id}", b"")

    def forget_active(self, job_id: str) -> None:
        """Drop a finished job's marker, so a restart does not resume it."""
        self.store.delete(f"{ACTIVE}/{job_id}")

    def load(self, job_id: str) -> JobRecord | None:
        try:
            return JobRecord.model_validate_json(self.store.get(f"{RECORDS}/{job_id}.json"))
        except FileNotFoundError:
            return None

    @staticmethod
    def _idempotency_path(tenant: str, key: str) -> str:
        return f"{IDEMPOTENCY}/{tenant}/{hashlib.sha256(key.encode()).hexdigest()}"

    def remember_idempotency_key(self, tenant: str, key: str, job_id: str) -> None:
        self.store.put(self._idempotency_path(tenant, key), job_id.encode())

    def job_for_idempotency_key(self, tenant: str, key: str) -> str | None:
        try:
            return self.store.get(self._idempotency_path(tenant, key)).decode()
        except FileNotFoundError:
            return None

    def active(self) -> list[JobRecord]:
        """Every job that had not finished, oldest first."""
        ids = [key.rsplit("/", 1)[-1] for key in self.store.list_keys(ACTIVE)]
        records = [record for job_id in ids if (record := self.load(job_id)) is not None]
        return sorted(records, key=lambda record: record.created_at)


def body_digest(body: dict[str, Any]) -> str:
    """A stable digest of a request body, for idempotency checks."""
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def is_valid_job_id(job_id: str) -> bool:
    return JOB_ID.fullmatch(job_id) is not None


def check_webhook_url(url: str, allow_private: bool) -> None:
    """Refuse anything but http(s) to public addresses (unless private ones are allowed)."""
    try:
        parts = urlsplit(url)
        port = parts.port  # raises for a port out of range or not a number
    except ValueError as malformed:
        raise InvalidRequestError(
            f"webhook_url is not a valid URL: {malformed}.", param="webhook_url"
        ) from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidRequestError("webhook_url must be an http(s) URL.", param="webhook_url")
    if allow_private:
        return
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(parts.hostname, port or 443)}
    except (socket.gaierror, UnicodeError, ValueError) as unresolved:  # a label too long is a UnicodeError
        raise InvalidRequestError("webhook_url's host does not resolve.", param="webhook_url") from unresolved
    if not all(ipaddress.ip_address(str(address).split("%")[0]).is_global for address in addresses):
        raise InvalidRequestError(
            "webhook_url must point to a public address (loopback and private ranges are refused).",
            param="webhook_url",
        )


def sign_webhook(secret: str, body: bytes, timestamp: int) -> str:
    """``t=<unix time>,v1=<hex HMAC-SHA256 of "<t>.<body>">``: receivers recompute and compare."""
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"
