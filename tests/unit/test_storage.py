"""Object keys, URL signing and whole-object writes on the local store."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from deployments.storage import ObjectStore, UrlSigner, build_object_key, is_valid_object_key
from serve_app.config import StorageConfig


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
