"""Where a training step's time goes: torch.profiler over `llmtune train` on the train_speed bench set.

    .venv/bin/python bench/train_profile.py [--conversations 40] [--steps 6] [--autocast float32] [--out docs/benchmarks]

Runs the real train stage in-process (SmolLM2-135M, LoRA r16 on all linear layers, micro-batch 4, max
length 1024, packing, chunked loss, gradient checkpointing, `data.mask=all`: the bench's llmtune
run) and profiles steps 2..N+1 (the first step warms up). Every op is charged to the category
whose range encloses it: attention (self-attention modules with their LoRA, forward, recomputed
forward and backward), MLP (likewise), loss (final norm, LM head and loss), optimizer (AdamW step,
gradient clipping and zeroing), data (the next batch: collation) and other (embeddings, norms
between blocks, autograd bookkeeping). Backward ranges come from identity autograd functions at
each module's output and input, so a module's backward is the span between their gradients.
Prints the table (ms per step, share of the step) and with --out writes train_profile.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

CATEGORIES = ("attention", "mlp", "loss", "optimizer", "data")


def mark_backward(model, torch):
    """Forward hooks on attention / MLP modules that open a profiler range when the gradient reaches the
    module's output and close it when it leaves through the module's input."""
    from torch.autograd.profiler import record_function

    open_ranges: dict[int, list] = {}

    class Enter(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, key, label):
            ctx.key, ctx.label = key, label
            return x.view_as(x)

        @staticmethod
        def backward(ctx, g):
            r = record_function(f"{ctx.label}")
            r.__enter__()
            open_ranges.setdefault(ctx.key, []).append(r)
            return g, None, None

    class Exit(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, key):
            ctx.key = key
            return x.view_as(x)

        @staticmethod
        def backward(ctx, g):
            stack = open_ranges.get(ctx.key)
            if stack:
                stack.pop().__exit__(None, None, None)
            return g, None

    def pre(label):
        def hook(module, args, kwargs):
            module._llmtune_range = record_function(label)
            module._llmtune_range.__enter__()
            x = args[0] if args else kwargs.get("hidden_states")
            if torch.is_grad_enabled() and isinstance(x, torch.Tensor) and x.requires_grad:
                x = Exit.apply(x, id(module))
                if args:
                    args = (x, *args[1:])
                else:
                    kwargs = {**kwargs, "hidden_states": x}
            return args, kwargs
        return hook

    def post(label):
        def hook(module, args, kwargs, out):
            module._llmtune_range.__exit__(None, None, None)
            first = out[0] if isinstance(out, tuple) else out
            if torch.is_grad_enabled() and isinstance(first, torch.Tensor) and first.requires_grad:
                first = Enter.apply(first, id(module), label)
                return (first, *out[1:]) if isinstance(out, tuple) else first
            return out
        return hook

    for name, module in model.named_modules():
        label = "attention" if name.endswith("self_attn") else "mlp" if name.endswith(".mlp") else None
        if label:
            module.register_forward_pre_hook(pre(label), with_kwargs=True)
            module.register_forward_hook(post(label), with_kwargs=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--conversations", type=int, default=40)
    ap.add_argument("--steps", type=int, default=6, help="Profiled steps (after one warm-up step).")
    ap.add_argument("--autocast", default="float32", help="training.autocast for the profiled run.")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import torch
    from torch.autograd.profiler import record_function
    from torch.profiler import ProfilerActivity, profile

    import train_speed
    from llmtune.config import load_recipe
    from llmtune.data.prepare import prepare
    from llmtune.train import sft

    tmp = Path(tempfile.mkdtemp(prefix="bench-profile-"))
    with (tmp / "train.jsonl").open("w") as f:
        for r in train_speed.skewed_set(args.conversations):
            f.write(json.dumps({"messages": r["messages"]}) + "\n")
    recipe_path = tmp / "recipe.yaml"
    recipe_path.write_text(json.dumps({
        "name": "profile", "stages": ["prepare", "train"], "model": {"base": "embedded:smollm2-135m-instruct"},
        "data": {"sources": [{"path": str(tmp / "train.jsonl"), "license": "CC0-1.0"}], "val_fraction": 0.0,
                 "max_seq_length": 1024, "mask": "all", "dedup": "none"},
        "lora": {"rank": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"},
        "training": {"max_steps": args.steps + 1, "micro_batch_size": 4, "learning_rate": 2e-4, "save_steps": 100000,
                     "eval_steps": 100000, "logging_steps": 1, "gradient_checkpointing": True, "autocast": args.autocast},
        "eval": {"prompts": []}, "output": {"dir": str(tmp / "runs")},
    }))
    recipe = load_recipe(recipe_path)
    prepared = prepare(recipe)
    state: dict = {"step": 0, "prof": None, "tokens": 0}
    original = sft._make_trainer_class

    def profiled_trainer_class(base=None):
        cls = original(base)

        class Profiled(cls):
            def get_batch_samples(self, *a, **k):
                with record_function("data"):
                    batches, n = super().get_batch_samples(*a, **k)
                if state["prof"] is not None:
                    state["tokens"] += sum(int(b["input_ids"].numel()) for b in batches)
                return batches, n

            def create_optimizer(self, *a, **k):
                opt = super().create_optimizer(*a, **k)
                step = opt.step

                def timed_step(*sa, **sk):
                    with record_function("optimizer"):
                        return step(*sa, **sk)
                opt.step = timed_step
                return opt

            def training_step(self, model, inputs, num_items_in_batch=None):
                if state["step"] == 0:
                    mark_backward(model, torch)
                state["step"] += 1
                if state["step"] == 2:  # after the warm-up step
                    state["prof"] = profile(activities=[ProfilerActivity.CPU])
                    state["prof"].__enter__()
                    state["start"] = time.perf_counter()
                return super().training_step(model, inputs, num_items_in_batch)

        return Profiled

    sft._make_trainer_class = profiled_trainer_class
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    load = os.getloadavg()[0]
    sft.train(recipe, prepared)
    prof = state["prof"]
    wall = time.perf_counter() - state["start"]
    prof.__exit__(None, None, None)
    totals = {e.key: e.cpu_time_total / 1e3 for e in prof.key_averages() if e.key in CATEGORIES}
    steps = args.steps
    # Each op's self time goes to the nearest enclosing category range (a recomputed forward inside its own
    # backward range, LoRA inside attention): nothing is counted twice.
    owned = {c: 0.0 for c in CATEGORIES}
    for e in prof.events():
        if e.key in CATEGORIES:
            continue
        parent = e.cpu_parent
        while parent is not None and parent.key not in CATEGORIES:
            parent = parent.cpu_parent
        if parent is not None:
            owned[parent.key] += e.self_cpu_time_total / 1e3
    step_ms = wall * 1e3 / steps
    rows = {c: owned[c] / steps for c in CATEGORIES}
    rows["other"] = max(0.0, step_ms - sum(rows.values()))
    print(f"profile: {steps} steps of llmtune train ({args.autocast}), {state['tokens'] / steps:.0f} tokens per step, "
          f"{step_ms:.0f} ms per step, load average {load:.2f} -> {os.getloadavg()[0]:.2f}")
    print(f"{'category':10s} {'ms/step':>9s} {'share':>7s}")
    for c, ms in rows.items():
        print(f"{c:10s} {ms:9.0f} {100 * ms / step_ms:6.1f}%")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_profile.json").write_text(json.dumps({
            "autocast": args.autocast, "steps": steps, "ms_per_step": step_ms, "tokens_per_step": state["tokens"] / steps,
            "ms_per_step_by_category": rows, "range_totals_ms": totals, "load_average_start": load}, indent=2))


if __name__ == "__main__":
    main()
