"""Prepare 100,000 synthetic conversations end to end and print conversations/s.

    .venv/bin/python bench/prepare_speed.py [--n 100000]

Synthetic rows vary in length the way roleplay logs do: mostly short turns, a long tail
(exchanges 1 + geometric(0.35) up to 12; words per turn log-normal, median 14, up to 400;
~150 tokens a conversation on average, the longest beyond max_seq_length). They are unique and run
through the full prepare stage (read, validate, exact + near dedup, template, mask,
split, write) with the embedded SmolLM2 tokenizer. Target: the whole run under 60 s on
the 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

WORDS = (
    "the kestrel sails north over brass clouds while the crew sings and the captain laughs at the wind "
    "storm harbour lantern engine cargo map star compass rope deck galley stew bread tea sky island tower "
    "old new quiet loud bright dark warm cold quick slow gentle rough far near high low"
).split()


def synthetic(n: int, seed: int = 0):
    rng = random.Random(seed)
    for i in range(n):
        msgs = [{"role": "system", "content": f"You are character {i % 50}."}]
        exchanges = 1
        while exchanges < 12 and rng.random() > 0.35:
            exchanges += 1
        for _ in range(exchanges):
            for role in ("user", "assistant"):
                k = min(400, max(1, int(rng.lognormvariate(2.64, 0.8))))
                msgs.append({"role": role, "content": f"{i} " + " ".join(rng.choices(WORDS, k=k))})
        yield {"messages": msgs}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000)
    args = ap.parse_args()

    from llmtune.config import DataConfig, DataSource, Recipe
    from llmtune.data.prepare import prepare
    from llmtune.models import resolve_base

    resolve_base("embedded:smollm2-135m-instruct")  # convert/cache the model outside the timing
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "synthetic.jsonl"
        with path.open("w") as f:
            for row in synthetic(args.n):
                f.write(json.dumps(row) + "\n")
        recipe = Recipe(
            name="bench-prepare",
            data=DataConfig(sources=[DataSource(path=str(path), license="CC0-1.0")], max_seq_length=1024),
            output={"dir": tmp},
        )
        start = time.perf_counter()
        prepared = prepare(recipe)
        seconds = time.perf_counter() - start
    c = prepared.counts
    print(f"prepared {c['read']:,} conversations in {seconds:.1f}s: {c['read'] / seconds:,.0f} conversations/s "
          f"(kept {c['kept']:,}, quarantined {c['quarantined']:,}, duplicates {c['duplicates']:,}, "
          f"truncated {c['truncated']:,}); target: under 60 s -> {'met' if seconds < 60 else 'NOT met'}")
    print("phases: " + ", ".join(f"{k} {v:.1f}s" for k, v in prepared.seconds.items())
          + f"; moderation: {c['screened']:,} conversations screened, {c['screened_full']:,} had a cue and went through rules + adapter")


if __name__ == "__main__":
    main()
