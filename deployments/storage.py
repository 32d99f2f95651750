"""Object storage over fsspec, server-built object keys, and HMAC-signed expiring URLs."""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import os
import posixpath
import re
import uuid

import fsspec

KEY_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}/\d{4}/\d{2}/\d{2}/[0-9a-f]{32}\.(png|jpeg|webp)$")
TENANT_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def build_object_key(tenant: str, extension: str, now: dt.datetime | None = None) -> str:
    """``tenant/YYYY/MM/DD/<uuid>.<ext>``; built by the server, never from user text."""
    now = now or dt.datetime.now(dt.UTC)
    safe_tenant = TENANT_UNSAFE.sub("_", tenant)[:64] or "_"
    return f"{safe_tenant}/{now:%Y/%m/%d}/{uuid.uuid4().hex}.{extension}"


def is_valid_object_key(key: str) -> bool:
    return KEY_PATTERN.match(key) is not None


class ObjectStore:
    """Whole-object writes and reads under one fsspec URL (``file://...`` or ``s3://...``)."""

    def __init__(self, url: str, **storage_options: object) -> None:
        self.url = url
        self.fs, root = fsspec.core.url_to_fs(url, **storage_options)
        self.root = root.rstrip("/")
        self.is_local = "file" in (
            self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        )

    def _path(self, key: str) -> str:
        return posixpath.join(self.root, key)

    def put(self, key: str, data: bytes) -> None:
        """Write ``data`` in one call: a failed write leaves no object behind."""
        path = self._path(key)
        if self.is_local:
            # Local files are written beside and renamed, so readers never see a partial image.
            directory = posixpath.dirname(path)
            os.makedirs(directory, exist_ok=True)
            temporary = posixpath.join(directory, f".{uuid.uuid4().hex}.tmp")
            with open(temporary, "wb") as handle:
                handle.write(data)
            os.replace(temporary, path)
        else:
            self.fs.pipe_file(path, data)

    def get(self, key: str) -> bytes:
        return bytes(self.fs.cat_file(self._path(key)))

    def exists(self, key: str) -> bool:
        return bool(self.fs.exists(self._path(key)))


class UrlSigner:
    """Signs ``(key, expiry)`` with HMAC-SHA256 so the ingress can serve local objects safely."""

    def __init__(self, secret: str) -> None:
        self._secret = secret.encode()

    def signature(self, key: str, expires: int) -> str:
        message = f"{key}\n{expires}".encode()
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()

    def is_valid(self, key: str, expires: int, signature: str, now: float) -> bool:
        if expires < now:
            return False
        return hmac.compare_digest(self.signature(key, expires), signature)
