"""Judgments as training data, in the shapes TRL's preference trainers read.

- A verdict for one side -> one pair in TRL's conversational preference format:
  `{"prompt": [messages...], "chosen": [{"role": "assistant", ...}], "rejected": [...]}`.
- "Both bad" -> two unpaired rows (TRL's KTO format), one per reply:
  `{"prompt": [messages...], "completion": [{"role": "assistant", ...}], "label": false}`.
- Ties carry no preference and are counted, not written; withheld replies were never stored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from llmtune.review.store import ReviewStore


@dataclass
class ExportResult:
    pairs_path: Path
    kto_path: Path
    pairs: int
    kto_rows: int
    ties: int  # judged, no preference: not written
    unjudged: int
    withheld: int  # a reply blocked by the screen: never shown, never written

    def summary(self) -> str:
        return (f"{self.pairs} preference pairs -> {self.pairs_path}; {self.kto_rows} KTO rows (both bad) -> {self.kto_path}; "
                f"not written: {self.ties} ties, {self.unjudged} unjudged pairs, {self.withheld} withheld by the screen")


def _assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def export_judgments(store: ReviewStore, out_dir: Path) -> ExportResult:
    judgments = store.judgments()
    pairs, kto = [], []
    ties = unjudged = withheld = 0
    for item in store.items():
        if not item.shown:
            withheld += 1
            continue
        j = judgments.get(item.id)
        if j is None:
            unjudged += 1
        elif j.verdict == "tie":
            ties += 1
        elif j.verdict == "both_bad":
            kto += [{"prompt": item.messages, "completion": _assistant(reply), "label": False}
                    for reply in (item.reply_a, item.reply_b)]
        else:
            chosen, rejected = (item.reply_a, item.reply_b) if j.verdict == "run_a" else (item.reply_b, item.reply_a)
            pairs.append({"prompt": item.messages, "chosen": _assistant(chosen), "rejected": _assistant(rejected)})
    out_dir.mkdir(parents=True, exist_ok=True)
    pairs_path, kto_path = out_dir / "preferences.jsonl", out_dir / "kto.jsonl"
    for path, rows in ((pairs_path, pairs), (kto_path, kto)):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        tmp.replace(path)
    return ExportResult(pairs_path, kto_path, len(pairs), len(kto), ties, unjudged, withheld)
