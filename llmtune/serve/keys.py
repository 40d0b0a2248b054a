"""API keys: what a key is, how it is made and hashed, and the old keys.json format.

`llmtune keys add NAME --age-verified-by METHOD` prints the key once; the store
(llmtune/serve/store.py) keeps only its SHA-256 (keys are 256-bit random tokens, so a plain
hash is enough). A key without a verification record is refused with 403, an unknown or
revoked key with 401.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import dataclass
from pathlib import Path

from llmtune.errors import LlmtuneError

KEY_PREFIX = "lt-"


class KeyError_(LlmtuneError):
    """A key store problem (unknown name, duplicate name, unreadable file)."""


@dataclass
class AgeVerification:
    method: str  # e.g. "id-document", "credit-card", "in-person"
    verifier: str  # who checked
    date: str  # ISO date


@dataclass
class KeyRecord:
    id: str  # short public id, safe to log
    name: str
    sha256: str
    created: str
    revoked: bool = False
    age_verification: AgeVerification | None = None
    requests_per_minute: int | None = None  # the key's own rate limit; None: the config's
    burst: int | None = None
    revoked_at: str | None = None
    revoke_reason: str | None = None

    @classmethod
    def from_json(cls, d: dict) -> "KeyRecord":
        av = d.get("age_verification")
        return cls(**{**d, "age_verification": AgeVerification(**av) if av else None})


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def new_key_id() -> str:
    return secrets.token_hex(4)


def read_keys_json(path: str | Path) -> list[KeyRecord]:
    """The records of a keys.json written by llmtune before the database store (`llmtune keys import`)."""
    path = Path(path)
    try:
        return [KeyRecord.from_json(d) for d in json.loads(path.read_text(encoding="utf-8"))["keys"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise KeyError_(f"cannot read key file {path}: {exc}; expected {{\"keys\": [...]}} as older llmtune wrote it") from None
