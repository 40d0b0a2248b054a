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


@dataclass
class PreferenceExample:
    """One preference judgment: the conversation so far (`prompt`) and the reply a person kept
    (`chosen`), the one they turned down (`rejected`), or both. Every preference source (TRL pair
    rows, KTO rows, SillyTavern swipes, the review page's exports) becomes this at the edge.

    A pair has both replies; a KTO row has one: `chosen` for a desirable completion, `rejected`
    for an undesirable one."""

    prompt: list[Message]
    chosen: str | None
    rejected: str | None
    source: str = ""
    line: int = 0
    meta: dict = field(default_factory=dict)

    @property
    def kind(self) -> Literal["pair", "desirable", "undesirable"]:
        if self.chosen is not None and self.rejected is not None:
            return "pair"
        return "desirable" if self.chosen is not None else "undesirable"

    @property
    def content_hash(self) -> str:
        canon = json.dumps([[[m.role, m.content] for m in self.prompt], self.chosen, self.rejected], ensure_ascii=False)
        return hashlib.sha256(canon.encode("utf-8")).hexdigest()

    @property
    def split_hash(self) -> str:
        """Decides the split: the prompt and the preferred (else the only) reply, so the pairs of one
        kept message against each of its swipes land on the same side."""
        reply = self.chosen if self.chosen is not None else self.rejected
        canon = json.dumps([[[m.role, m.content] for m in self.prompt], reply], ensure_ascii=False)
        return hashlib.sha256(canon.encode("utf-8")).hexdigest()

    def to_trl(self) -> dict:
        """TRL's conversational preference format: a pair, or a KTO row (`completion`, `label`)."""
        prompt = [{"role": m.role, "content": m.content} for m in self.prompt]
        if self.kind == "pair":
            return {"prompt": prompt, "chosen": [{"role": "assistant", "content": self.chosen}],
                    "rejected": [{"role": "assistant", "content": self.rejected}]}
        reply = self.chosen if self.chosen is not None else self.rejected
        return {"prompt": prompt, "completion": [{"role": "assistant", "content": reply}], "label": self.chosen is not None}
