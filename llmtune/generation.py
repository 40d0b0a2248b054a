"""Batched, seeded reply generation with Hugging Face `generate`, shared by eval and review.

Both compare two models on the same chats; seeding every batch from one number gives each
model the same random stream, so differences come from the weights, not the draw.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Sampling:
    """How replies are drawn: the eval and review recipe sections both map onto this."""

    max_new_tokens: int
    temperature: float  # 0: greedy
    top_p: float
    batch_size: int
    seed: int


@dataclass
class Generation:
    text: str
    token_ids: list[int]


class Generator:
    """Batched sampling with a fixed seed, stopping at the trained end-of-turn token."""

    def __init__(self, model, tokenizer, sampling: Sampling, stop_ids: list[int]):
        self.model, self.tokenizer, self.sampling, self.stop_ids = model, tokenizer, sampling, stop_ids
        self.tokens = 0
        self.seconds = 0.0

    def __call__(self, chats: list[list[dict]], on_batch=None) -> list[Generation]:
        """Replies to `chats`, in order. `on_batch(n)` is called after each batch of n chats."""
        import torch

        tok, s, out = self.tokenizer, self.sampling, []
        tok.padding_side = "left"
        pad = tok.pad_token_id if tok.pad_token_id is not None else self.stop_ids[0]
        self.model.eval()
        start = time.perf_counter()
        for i in range(0, len(chats), s.batch_size):
            batch = chats[i : i + s.batch_size]
            enc = tok.apply_chat_template(batch, add_generation_prompt=True, padding=True, return_tensors="pt", return_dict=True)
            enc = {k: v.to(self.model.device) for k, v in enc.items()}
            torch.manual_seed(s.seed + i)  # same stream for both models
            sampling = dict(do_sample=True, temperature=s.temperature, top_p=s.top_p) if s.temperature > 0 else dict(do_sample=False)
            with torch.no_grad():
                ids = self.model.generate(**enc, max_new_tokens=s.max_new_tokens, eos_token_id=self.stop_ids,
                                          pad_token_id=pad, use_cache=True, **sampling)
            for row in ids[:, enc["input_ids"].shape[1]:].tolist():
                cut = next((j + 1 for j, t in enumerate(row) if t in self.stop_ids), len(row))
                row = row[:cut]
                self.tokens += len(row)
                out.append(Generation(tok.decode(row, skip_special_tokens=True).strip(), row))
            if on_batch:
                on_batch(len(batch))
        self.seconds += time.perf_counter() - start
        return out


def held_back_conversations(val_jsonl: Path, train_jsonl: Path, has_val: bool, limit: int) -> list[list[dict]]:
    """Held-back conversations (train when there is no validation split), at most `limit`."""
    source = val_jsonl if has_val else train_jsonl
    rows = [json.loads(line)["messages"] for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
    return rows[:limit]
