"""Images on local storage, served back by the ingress through HMAC-signed, expiring URLs.

For S3 the store presigns its own URLs; for file:// storage a URL points at ``FILES_ROUTE`` on
this service and carries an expiry and a signature over the key and expiry, so only URLs this
service handed out can read an image, and only until they expire.
"""

from __future__ import annotations

import time

from deployments.config import StorageConfig
from deployments.storage import ObjectStore, UrlSigner, is_valid_object_key
from serve_app.errors import ForbiddenError, NotFoundError

FILES_ROUTE = "/v1/images/files"


class SignedFiles:
    def __init__(self, store: ObjectStore, storage: StorageConfig) -> None:
        assert storage.signing_key is not None, "build_app sets a signing key"
        self.store = store
        self.storage = storage
        self.signer = UrlSigner(storage.signing_key.get_secret_value())

    def url(self, base_url: str, key: str) -> str:
        """A presigned URL for S3; for local storage a URL this ingress serves, HMAC-signed."""
        ttl_s = self.storage.url_ttl_s
        if not self.store.is_local:
            return self.store.presigned_url(key, ttl_s)
        expires = int(time.time()) + ttl_s
        base = (self.storage.public_base_url or base_url).rstrip("/")
        signature = self.signer.signature(key, expires)
        return f"{base}{FILES_ROUTE}/{key}?expires={expires}&signature={signature}"

    def read(self, key: str, expires: str, signature: str) -> bytes:
        """The image a signed URL names; 403 for a bad or expired signature, 404 once it is gone."""
        valid = (
            self.store.is_local
            and is_valid_object_key(key)
            and expires.isdecimal()
            and self.signer.is_valid(key, int(expires), signature, time.time())
        )
        if not valid:
            raise ForbiddenError("This URL is invalid or has expired.", code="invalid_signature")
        try:
            return self.store.get(key)
        except FileNotFoundError as missing:
            raise NotFoundError("This image no longer exists.", code="image_not_found") from missing
