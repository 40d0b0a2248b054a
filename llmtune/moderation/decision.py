"""What the screen decided about one text or conversation, and how decisions about parts combine."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Decision:
    """The outcome of screening one text or conversation."""

    allowed: bool
    categories: list[str]  # blocked categories
    scores: dict[str, float]  # adapter score per category (1.0/0.0 for rule-only policy categories)
    layer: str  # "rules", "adapter", "conversation" or "none"
    reasons: list[str] = field(default_factory=list)  # rule evidence and adapter scores, for quarantine notes
    evidence: list[dict] = field(default_factory=list)  # the facts behind a block, with where they were found

    def to_json(self) -> dict[str, Any]:
        return {"allowed": self.allowed, "categories": list(self.categories), "scores": dict(self.scores),
                "layer": self.layer, "evidence": list(self.evidence)}

    def reason(self) -> str:
        """One line for a quarantine file: what was blocked and why."""
        if self.allowed:
            return "allowed"
        return f"blocked ({', '.join(self.categories)}) by {self.layer}: " + "; ".join(self.reasons)


def merge_decisions(decisions: Iterable[Decision], categories: list[str]) -> Decision:
    decisions = list(decisions)
    blocked = [c for c in categories if any(c in d.categories for d in decisions)]
    scores = {c: max(d.scores.get(c, 0.0) for d in decisions) for c in categories}
    layers = {d.layer for d in decisions if not d.allowed}
    layer = "rules" if "rules" in layers else "adapter" if layers else "none"
    reasons: list[str] = []
    evidence: list[dict] = []
    for d in decisions:
        reasons += [r for r in d.reasons if r not in reasons]
        evidence += [e for e in d.evidence if e not in evidence]
    return Decision(not blocked, blocked, scores, layer, reasons, evidence)
