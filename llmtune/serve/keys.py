"""API keys: stored only as hashes, each bound to an age-verification record.

`llmtune keys add NAME --age-verified-by METHOD` prints the key once; the store keeps its
SHA-256 (keys are 256-bit random tokens, so a plain hash is enough and lookups are O(1)).
A key without a verification record is refused with 403, an unknown or revoked key with 401.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import os
import secrets
import tempfile
from dataclasses import asdict, dataclass
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

    @classmethod
    def from_json(cls, d: dict) -> "KeyRecord":
        av = d.get("age_verification")
        return cls(**{**d, "age_verification": AgeVerification(**av) if av else None})


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


class KeyStore:
    """Keys in a JSON file, re-read whenever the file changes: a key revoked with
    `llmtune keys revoke` is refused on its very next request, without a restart."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.records: list[KeyRecord] = []
        self._stamp: tuple[int, int] | None = None
        self._by_hash: dict[str, KeyRecord] = {}
        self._load()

    def _load(self) -> None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            self.records, self._by_hash, self._stamp = [], {}, None
            return
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp == self._stamp:
            return
        try:
            self.records = [KeyRecord.from_json(d) for d in json.loads(self.path.read_text())["keys"]]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise KeyError_(f"cannot read key store {self.path}: {exc}") from None
        self._by_hash = {r.sha256: r for r in self.records}
        self._stamp = stamp

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".keys-")
        with os.fdopen(fd, "w") as f:
            json.dump({"keys": [asdict(r) for r in self.records]}, f, indent=2)
        os.chmod(tmp, 0o600)
        os.replace(tmp, self.path)

    def add(self, name: str, verification: AgeVerification | None) -> tuple[str, KeyRecord]:
        if any(r.name == name and not r.revoked for r in self.records):
            raise KeyError_(f"a live key named `{name}` exists; revoke it first (llmtune keys revoke {name})")
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        record = KeyRecord(id=secrets.token_hex(4), name=name, sha256=hash_key(key),
                           created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                           age_verification=verification)
        self.records.append(record)
        self._by_hash[record.sha256] = record
        self.save()
        return key, record

    def revoke(self, name_or_id: str) -> KeyRecord:
        for r in self.records:
            if (r.name == name_or_id or r.id == name_or_id) and not r.revoked:
                r.revoked = True
                self.save()
                return r
        raise KeyError_(f"no live key named or with id `{name_or_id}` in {self.path} (llmtune keys list)")

    def lookup(self, key: str) -> KeyRecord | None:
        try:
            self._load()
        except KeyError_:
            pass  # a half-written file: keep the last good records (saves are atomic, so this is rare)
        digest = hash_key(key)
        record = self._by_hash.get(digest)
        if record is None or not hmac.compare_digest(record.sha256, digest):
            return None
        return None if record.revoked else record
