"""API keys, webhook URL checks and signatures, and job records, without Ray."""

from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path

import pytest

from deployments.config import StorageConfig
from deployments.contracts import EncodeOptions, ImageRequest
from deployments.errors import InvalidRequestError
from deployments.storage import ObjectStore
from serve_app.auth import KeyRing
from serve_app.errors import AuthenticationError
from serve_app.jobs import JobStore, body_digest, check_webhook_url, new_record, sign_webhook

TIERS = {"paid", "free"}


def write_keys(path: Path, entries: list[dict[str, str]]) -> Path:
    path.write_text(json.dumps({"keys": entries}))
    return path


def test_keys_plain_and_hashed(tmp_path: Path) -> None:
    hashed = "sha256:" + hashlib.sha256(b"sk-hashed-key").hexdigest()
    keys = write_keys(
        tmp_path / "keys.yaml",
        [
            {"key": "sk-plain-key", "tenant": "acme", "tier": "paid"},
            {"key": hashed, "tenant": "bob", "tier": "free"},
        ],
    )
    ring = KeyRing.load(keys, TIERS)
    assert ring.authenticate("Bearer sk-plain-key").tenant == "acme"
    assert ring.authenticate("bearer sk-hashed-key").tier == "free"
    for header in (None, "", "Bearer ", "Basic sk-plain-key", "Bearer sk-wrong", "Bearer " + hashed):
        with pytest.raises(AuthenticationError):
            ring.authenticate(header)


def test_open_mode_and_bad_key_files(tmp_path: Path) -> None:
    assert KeyRing.load(None, TIERS).authenticate(None).tenant == "local"
    with pytest.raises(ValueError, match="unknown tiers"):
        KeyRing.load(
            write_keys(tmp_path / "a.yaml", [{"key": "sk-12345678", "tenant": "x", "tier": "gold"}]), TIERS
        )
    with pytest.raises(ValueError):
        KeyRing.load(
            write_keys(tmp_path / "b.yaml", [{"key": "sk-12345678", "tenant": "../x", "tier": "paid"}]), TIERS
        )


@pytest.mark.parametrize(
    "url", ["ftp://example.com/x", "http://127.0.0.1:9/x", "http://10.0.0.1/x", "http://[::1]/x", "http:///x"]
)
def test_webhooks_to_private_or_odd_urls_are_refused(url: str) -> None:
    with pytest.raises(InvalidRequestError) as raised:
        check_webhook_url(url, allow_private=False)
    assert raised.value.param == "webhook_url"


def documented_signature(secret: str, body: bytes, timestamp: int) -> str:
    """The README's scheme, written from its text: ``t=<unix>,v1=<hex HMAC-SHA256 of "<t>.<body>">``."""
    message = str(timestamp).encode() + b"." + body
    return f"t={timestamp},v1={hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()}"


def test_webhook_private_allowed_when_configured_and_signature() -> None:
    check_webhook_url("http://127.0.0.1:9/x", allow_private=True)
    signature = sign_webhook("secret", b'{"id": 1}', 1700000000)
    assert signature == documented_signature("secret", b'{"id": 1}', 1700000000)
    assert sign_webhook("other", b'{"id": 1}', 1700000000) != signature


def test_job_records_round_trip_and_active_markers(tmp_path: Path) -> None:
    store = JobStore(ObjectStore(StorageConfig(url=f"file://{tmp_path}")))
    request = ImageRequest(
        "job_1", "acme", "tiny-sd", "edit", "p", None, 2, 64, 64, 4, 5.0, 7, images=(b"x",)
    )
    record = new_record(
        request,
        EncodeOptions(),
        tier="paid",
        quality="medium",
        idempotency_key="k",
        body_sha256="d",
        webhook_url=None,
    )
    store.save(record)
    assert [job.id for job in store.active()] == ["job_1"]
    loaded = store.load("job_1")
    assert loaded is not None and loaded.image_request.images == ()  # uploads never go into records
    assert loaded.image_request.seed == 7
    record.status = "succeeded"
    store.save(record)
    assert store.active() == [] and store.load("job_1").completed_at is not None  # type: ignore[union-attr]
    store.remember_idempotency_key("acme", "k", "job_1")
    assert store.job_for_idempotency_key("acme", "k") == "job_1"
    assert store.job_for_idempotency_key("bob", "k") is None


def test_body_digest_ignores_key_order() -> None:
    assert body_digest({"a": 1, "b": [1, 2]}) == body_digest({"b": [1, 2], "a": 1})
    assert body_digest({"a": 1}) != body_digest({"a": 2})
