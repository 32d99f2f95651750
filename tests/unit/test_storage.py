"""Object keys, URL signing and whole-object writes on the local store."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError

from deployments.config import StorageConfig
from deployments.storage import ObjectStore, UrlSigner, build_object_key, is_valid_object_key
from serve_app.config import load_config


def test_keys_are_built_by_the_server() -> None:
    now = dt.datetime(2026, 3, 4, 5, 6, tzinfo=dt.UTC)
    key = build_object_key("acme", "png", now)
    tenant, year, month, day, name = key.split("/")
    assert (tenant, year, month, day) == ("acme", "2026", "03", "04")
    assert name.endswith(".png") and len(name) == 36
    assert is_valid_object_key(key)
    assert build_object_key("acme", "png", now) != key


@pytest.mark.parametrize("tenant", ["../../etc", "a/b", "", "x" * 200, "ténant"])
def test_hostile_tenant_names_stay_one_safe_segment(tenant: str) -> None:
    key = build_object_key(tenant, "webp")
    assert is_valid_object_key(key)
    assert ".." not in key and key.count("/") == 4


@pytest.mark.parametrize(
    "key", ["../x.png", "acme/2026/01/01/abc.png", "acme/2026/01/01/" + "0" * 32 + ".exe", "/etc/passwd"]
)
def test_foreign_keys_are_invalid(key: str) -> None:
    assert not is_valid_object_key(key)


def test_signatures_verify_and_expire() -> None:
    signer = UrlSigner("secret")
    key = build_object_key("acme", "png")
    signature = signer.signature(key, 1000)
    assert signer.is_valid(key, 1000, signature, now=999)
    assert not signer.is_valid(key, 1000, signature, now=1001)
    assert not signer.is_valid(key, 1001, signature, now=999)
    assert not signer.is_valid(key.replace("acme", "evil"), 1000, signature, now=999)
    assert not UrlSigner("other").is_valid(key, 1000, signature, now=999)


def test_local_store_round_trip_leaves_no_temporaries(tmp_path: Path) -> None:
    store = ObjectStore(StorageConfig(url=f"file://{tmp_path}"))
    key = build_object_key("acme", "png")
    store.put(key, b"\x89PNG data")
    assert store.get(key) == b"\x89PNG data"
    assert [path.name for path in tmp_path.rglob("*") if path.is_file()] == [key.rsplit("/", 1)[1]]
    with pytest.raises(FileNotFoundError):
        store.get(build_object_key("acme", "png"))


def signer_of_a_fresh_start() -> UrlSigner:
    """The URL signer a newly started service builds from its configuration (as build_app does)."""
    key = load_config().with_secrets().storage.signing_key
    assert key is not None
    return UrlSigner(key.get_secret_value())


def test_a_configured_signing_key_keeps_urls_valid_across_restarts(monkeypatch: pytest.MonkeyPatch) -> None:
    key, expires = build_object_key("acme", "png"), 2_000_000_000
    monkeypatch.setenv("IMAGEGEN_STORAGE__SIGNING_KEY", "0123456789abcdef" * 4)
    signature = signer_of_a_fresh_start().signature(key, expires)
    assert signer_of_a_fresh_start().is_valid(key, expires, signature, now=expires - 1)
    monkeypatch.delenv("IMAGEGEN_STORAGE__SIGNING_KEY")
    unset = signer_of_a_fresh_start().signature(key, expires)
    assert not signer_of_a_fresh_start().is_valid(key, expires, unset, now=expires - 1)  # random per start


def test_url_lifetime_is_capped_at_seven_days(monkeypatch: pytest.MonkeyPatch) -> None:
    seven_days = 7 * 24 * 3600
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}.items():
        monkeypatch.setenv(name, value)  # presigning is computed locally: no call to S3
    store = ObjectStore(StorageConfig(url="s3://bucket/prefix", url_ttl_s=seven_days))
    url = httpx.URL(store.presigned_url(build_object_key("acme", "png"), seven_days))
    assert url.params["X-Amz-Expires"] == str(seven_days)
    with pytest.raises(ValidationError, match="url_ttl_s"):
        StorageConfig(url_ttl_s=seven_days + 1)
    monkeypatch.setenv("IMAGEGEN_STORAGE__URL_TTL_S", str(seven_days + 1))
    with pytest.raises(ValidationError, match="url_ttl_s"):
        load_config()
