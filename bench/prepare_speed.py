"""Prepare 100,000 synthetic conversations end to end and print conversations/s.

    .venv/bin/python bench/prepare_speed.py [--n 100000] [--cues]

Synthetic rows vary in length the way roleplay logs do: mostly short turns, a long tail
(exchanges 1 + geometric(0.35) up to 12; words per turn log-normal, median 14, up to 400;
~150 tokens a conversation on average, the longest beyond max_seq_length). They are unique and run
through the full prepare stage (read, validate, exact + near dedup, template, mask,
split, write) with the embedded SmolLM2 tokenizer. Target: the whole run under 60 s on
the 2-core machine.

`--cues` puts romance and adult-sexual words in the vocabulary and at least one in every
conversation (what a real adult roleplay corpus looks like): every conversation then has a cue
the old fast path keyed on. Target: 100,000 of them in under 5 minutes. The quarantine
reasons are printed, so a screen that blocks word salad shows up here.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from collections import Counter
from pathlib import Path

WORDS = (
    "the kestrel sails north over brass clouds while the crew sings and the captain laughs at the wind "
    "storm harbour lantern engine cargo map star compass rope deck galley stew bread tea sky island tower "
    "old new quiet loud bright dark warm cold quick slow gentle rough far near high low"
).split()


CUES = ("kiss kissed lover lovers bed bedroom desire passion embrace naked undress sensual seduce intimate "
        "sex sexy aroused moan caress lust romance tender blush").split()


def synthetic(n: int, seed: int = 0, cues: bool = False):
    rng = random.Random(seed)
    words = WORDS + CUES if cues else WORDS
    for i in range(n):
        msgs = [{"role": "system", "content": f"You are character {i % 50}."}]
        exchanges = 1
        while exchanges < 12 and rng.random() > 0.35:
            exchanges += 1
        for _ in range(exchanges):
            for role in ("user", "assistant"):
                k = min(400, max(1, int(rng.lognormvariate(2.64, 0.8))))
                msgs.append({"role": role, "content": f"{i} " + " ".join(rng.choices(words, k=k))})
        if cues:  # at least one cue in every conversation
            msgs[-1]["content"] += " " + rng.choice(CUES)
        yield {"messages": msgs}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--cues", action="store_true", help="romance and sexual words in every conversation")
    args = ap.parse_args()
    target = 300 if args.cues else 60

    from llmtune.config import DataConfig, DataSource, Recipe
    from llmtune.data.prepare import prepare
    from llmtune.models import resolve_base

    resolve_base("embedded:smollm2-135m-instruct")  # convert/cache the model outside the timing
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "synthetic.jsonl"
        with path.open("w") as f:
            for row in synthetic(args.n, cues=args.cues):
                f.write(json.dumps(row) + "\n")
        recipe = Recipe(
            name="bench-prepare",
            data=DataConfig(sources=[DataSource(path=str(path), license="CC0-1.0")], max_seq_length=1024),
            output={"dir": tmp},
        )
        start = time.perf_counter()
        prepared = prepare(recipe)
        seconds = time.perf_counter() - start
        reasons = Counter(json.loads(line)["reason"] for line in prepared.quarantine.read_text().splitlines()) \
            if prepared.quarantine.exists() else Counter()
    c = prepared.counts
    print(f"prepared {c.read:,} conversations in {seconds:.1f}s: {c.read / seconds:,.0f} conversations/s "
          f"(kept {c.kept:,}, quarantined {c.quarantined:,}, duplicates {c.duplicates:,}, "
          f"truncated {c.truncated:,})")
    projected = seconds * 100_000 / max(1, c.read)  # the targets are for 100,000 conversations
    print(f"{'cue-laden' if args.cues else 'cue-free'} target: 100,000 conversations in under {target} s; "
          f"{'measured' if c.read == 100_000 else 'projected from this run'}: {projected:,.0f} s -> "
          f"{'met' if projected < target else 'NOT met'}")
    print("quarantine reasons: " + (", ".join(f"{r} {k:,}" for r, k in reasons.most_common()) or "none"))
    print("phases: " + ", ".join(f"{k} {v:.1f}s" for k, v in prepared.seconds.items())
          + f"; moderation: {c.screened:,} conversations screened, {c.screened_full:,} took the full screen "
          "(the rest: no rule or fact could block them and the classifier's first stage cleared every text)")


if __name__ == "__main__":
    main()
