"""The one conversation type every input format becomes at the edge."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Literal

Role = Literal["system", "user", "assistant"]
ROLES: tuple[str, ...] = ("system", "user", "assistant")


@dataclass(frozen=True)
class Message:
    role: Role
    content: str


@dataclass
class Conversation:
    messages: list[Message]
    source: str = ""  # file the conversation came from
    line: int = 0  # 1-based line (JSONL) or record index (JSON arrays)
    meta: dict = field(default_factory=dict)

    @property
    def content_hash(self) -> str:
        """Stable id of the conversation's content (not its position): drives split and dedup."""
        canon = json.dumps([[m.role, m.content] for m in self.messages], ensure_ascii=False)
        return hashlib.sha256(canon.encode("utf-8")).hexdigest()

    def to_openai(self) -> dict:
        return {"messages": [{"role": m.role, "content": m.content} for m in self.messages]}


@dataclass(frozen=True)
class Rejection:
    """A row that did not make it into training, and why. Written to quarantine.jsonl."""

    source: str
    line: int
    reason: str
    detail: str
    row: str  # the raw row (truncated), so a user can find and fix it

    def to_json(self) -> dict:
        return {"source": self.source, "line": self.line, "reason": self.reason, "detail": self.detail, "row": self.row}
