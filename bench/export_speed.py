"""Export the demo model (SmolLM2-135M fine-tune) to GGUF, verified, and print the time.

    .venv/bin/python bench/export_speed.py [--run runs/demo-cpu] [--steps 40]

Times the whole export stage: f16, q8_0 and q4_k_m files, llama.cpp checks of each against the
merged model (greedy replies, top-1 agreement, stop at end-of-turn), the transformers read-back,
presets and guides. Without --run it first trains the demo recipe (recipes/demo-cpu.yaml,
stages prepare, train, merge; `--steps` optimizer steps) in a temporary directory, outside the
timing. Target: under 60 s on the 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", type=Path, help="An existing demo run directory with merged/ (default: train one).")
    ap.add_argument("--steps", type=int, default=40, help="Training steps when training the demo run here.")
    ap.add_argument("--threads", type=int, default=None, help="export.gguf_threads (default: every core).")
    args = ap.parse_args()

    from llmtune.config import load_recipe, save_resolved
    from llmtune.data.prepare import prepare
    from llmtune.export.merge import merge
    from llmtune.export.presets import export_for_apps
    from llmtune.train.sft import train

    overrides = ["export.gguf=true"] + ([f"export.gguf_threads={args.threads}"] if args.threads else [])
    with tempfile.TemporaryDirectory() as tmp:
        if args.run:
            recipe = load_recipe(args.run / "recipe.yaml", overrides)
        else:
            recipe = load_recipe(REPO / "recipes" / "demo-cpu.yaml", overrides + [
                f"output.dir={tmp}", f"training.max_steps={args.steps}", "stages=[prepare,train,merge,export]",
            ])
            save_resolved(recipe, recipe.run_dir)
            train(recipe, prepare(recipe))
            merge(recipe)
        start, load = time.perf_counter(), os.getloadavg()[0]
        cpu_before = _cpu_seconds()
        result = export_for_apps(recipe)
        seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu_before
    sizes = ", ".join(f"{f['file']} {f['bytes'] / 2**20:.0f} MiB ({f['seconds']:.1f}s)" for f in result.gguf)
    print(f"exported {recipe.name} in {seconds:.1f}s: {sizes}; target: under 60 s -> {'met' if seconds < 60 else 'NOT met'}")
    print(f"  CPU time {cpu:.1f}s (this process and the read-back process); load average {load:.2f} when it started")
    for f in result.gguf:
        v = f.get("verification") or {}
        if v.get("runtime"):
            print(f"  {f['file']}: greedy tokens equal {v['greedy_tokens_matched']} of {v['greedy_tokens_compared']}, "
                  f"top-1 agreement {v['top1_agreement']:.4f} over {v['positions']} positions, "
                  f"stops at end-of-turn {v['stops_at_end_of_turn']}, tokenizer same {v['tokenizer_matches']}")
        if v.get("readback"):
            print(f"  {f['file']} read back by transformers: {json.dumps(v['readback'])}")


if __name__ == "__main__":
    main()
