"""API keys -> tenant and tier. Keys are compared in constant time and never logged."""

from __future__ import annotations

import hashlib
import hmac
import logging
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field

from serve_app.errors import AuthenticationError

logger = logging.getLogger("imagegen.auth")
LOCAL_TENANT = "local"
LOCAL_TIER = "paid"


@dataclass(frozen=True)
class Principal:
    """Who is calling: the tenant that owns the work and the tier that orders it."""

    tenant: str
    tier: str


class KeyEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    key: str = Field(min_length=8, description="The key itself, or 'sha256:<hex>' of it.")
    tenant: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    tier: str


class KeysFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    keys: list[KeyEntry]


def key_digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class KeyRing:
    """Authenticates bearer keys. Without a keys file every caller is the local paid tenant."""

    def __init__(self, entries: list[KeyEntry], tiers: set[str], open_mode: bool) -> None:
        unknown = {entry.tier for entry in entries} - tiers
        if unknown:
            raise ValueError(f"keys file names unknown tiers {sorted(unknown)}; configured: {sorted(tiers)}")
        self.open_mode = open_mode
        self._digests = [
            (
                bytes.fromhex(entry.key.removeprefix("sha256:"))
                if entry.key.startswith("sha256:")
                else key_digest(entry.key),
                Principal(entry.tenant, entry.tier),
            )
            for entry in entries
        ]

    @classmethod
    def load(cls, keys_file: Path | None, tiers: set[str]) -> KeyRing:
        if keys_file is None:
            logger.warning(
                "no keys file configured: open local mode, every caller is tenant 'local', tier 'paid'"
            )
            return cls([], tiers, open_mode=True)
        parsed = KeysFile.model_validate(yaml.safe_load(keys_file.read_text()) or {})
        return cls(parsed.keys, tiers, open_mode=False)

    def authenticate(self, authorization: str | None) -> Principal:
        """The principal for an ``Authorization: Bearer <key>`` header; raises AuthenticationError."""
        if self.open_mode:
            return Principal(LOCAL_TENANT, LOCAL_TIER)
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise AuthenticationError(
                "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.",
                code="missing_api_key",
            )
        digest = key_digest(key.strip())
        match = None
        for candidate, principal in self._digests:  # no early exit: the time taken says nothing
            if hmac.compare_digest(candidate, digest):
                match = principal
        if match is None:
            raise AuthenticationError("Incorrect API key provided.")
        return match
