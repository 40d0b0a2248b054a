"""Training throughput: `trl sft` (TRL's own CLI, defaults + the same hyper-parameters) vs `llmtune train`.

    .venv/bin/python bench/train_speed.py [--conversations 40] [--out docs/benchmarks]

Both train SmolLM2-135M-Instruct (the demo's model) with LoRA r=16/alpha=32 on all linear
layers, lr 2e-4, micro-batch 4, max length 1024, one epoch over the same length-skewed
roleplay set (many short turns, a few long conversations), fp32. The baseline is `trl sft`
as a knowledgeable user runs it on a CPU (DESIGN.md): OMP_NUM_THREADS = cores and
`--bf16 False` (TRL's default bf16 is emulated on CPUs without AVX512-BF16). TRL's default
trains every token of each sequence, so llmtune runs with `data.mask=all` here: both count
loss-bearing, non-padding tokens the same way.

Prints, for each: loss-bearing tokens/s, peak RSS of the training process, model FLOPs
utilisation against this machine's fp32 matmul rate measured in the same run, and the
ratios llmtune / trl. With --out, also writes train_speed.json and train_speed.png there.

The default 40 conversations (11,913 tokens; 5 of them reach the 1024-token cap) keep both
runs within about ten minutes on 2 cores: `trl sft` pads each random batch of 4 to its
longest conversation, so it pushes about twice the real tokens through the model.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LINES = [json.loads(line) for line in (REPO / "data/roleplay/mara_vell.jsonl").read_text().splitlines()]


def skewed_set(n: int, seed: int = 0) -> list[dict]:
    """Length-skewed roleplay: most conversations are 1-2 short exchanges, ~10% run long."""
    rng = random.Random(seed)
    pool = [(m["content"], r["content"]) for c in LINES for m, r in zip(c["messages"][1::2], c["messages"][2::2])]
    system = LINES[0]["messages"][0]
    rows = []
    for i in range(n):
        turns = rng.choice([1, 1, 1, 2, 2, 3]) if rng.random() > 0.1 else rng.randint(12, 20)
        msgs = [system]
        for _ in range(turns):
            user, reply = rng.choice(pool)
            msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
        rows.append({"messages": msgs, "id": i})
    return rows


def matmul_flops(seconds: float = 3.0, size: int = 1024) -> float:
    import torch

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    a, b = torch.randn(size, size), torch.randn(size, size)
    for _ in range(3):
        a @ b
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        n += 1
    return 2 * size**3 * n / (time.perf_counter() - start)


def model_flops_per_token(model_dir: str, seq_len: float) -> float:
    """LoRA step FLOPs per token: forward 2N + backward input-gradients 2N over every matmul weight
    (frozen weights get no weight-gradient matmul), plus attention scores (4 * layers * seq * d, x2 for backward)."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    d, L, ff, V = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = cfg["num_key_value_heads"] * cfg.get("head_dim", d // cfg["num_attention_heads"])
    per_layer = d * d * 2 + d * kv * 2 + 3 * d * ff
    matmul_params = L * per_layer + d * V
    return 4 * matmul_params + 2 * 4 * L * seq_len * d


def run(cmd: list[str], env: dict, log: Path) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes, the process and its children, sampled every 0.2 s)."""
    import psutil

    start = time.perf_counter()
    peak = 0
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
        ps = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                peak = max(peak, sum(p.memory_info().rss for p in [ps, *ps.children(recursive=True)]))
            except psutil.Error:
                pass
            time.sleep(0.2)
    seconds = time.perf_counter() - start
    if proc.returncode:
        sys.exit(f"{cmd[0]} failed; see {log}:\n" + "\n".join(log.read_text().splitlines()[-20:]))
    return seconds, peak


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--conversations", type=int, default=40, help="Size of the length-skewed set (one epoch each).")
    ap.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false",
                    help="Run llmtune without gradient checkpointing (faster, more memory). By default it checkpoints "
                         "(not its `auto`), "
                         "like `trl sft`, whose SFTConfig turns it on: the same hyper-parameters on both sides.")
    ap.add_argument("--out", default=None, help="Write results JSON and a plot here (e.g. docs/benchmarks).")
    args = ap.parse_args()

    from transformers import AutoTokenizer

    from llmtune.models import resolve_base

    model_dir = resolve_base("embedded:smollm2-135m-instruct")
    cores = len(os.sched_getaffinity(0))
    env = {**os.environ, "OMP_NUM_THREADS": str(cores), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    tmp = Path(tempfile.mkdtemp(prefix="bench-train-"))
    rows = skewed_set(args.conversations)
    (tmp / "data").mkdir()
    with (tmp / "data" / "train.jsonl").open("w") as f:
        for r in rows:
            f.write(json.dumps({"messages": r["messages"]}) + "\n")

    # Loss-bearing, non-padding tokens of one epoch, the same for both (every token, max 1024).
    tok = AutoTokenizer.from_pretrained(model_dir)
    lengths = [min(1024, len(tok.apply_chat_template(r["messages"], tokenize=True, return_dict=True)["input_ids"])) for r in rows]
    tokens = sum(lengths)
    print(f"data: {len(rows)} conversations, {tokens:,} tokens, lengths min {min(lengths)} / "
          f"median {sorted(lengths)[len(lengths) // 2]} / max {max(lengths)}")

    peak = matmul_flops()

    trl_cmd = [
        str(Path(sys.executable).parent / "trl"), "sft", "--model_name_or_path", model_dir, "--dataset_name", str(tmp / "data"),
        "--output_dir", str(tmp / "trl"), "--use_peft", "--lora_r", "16", "--lora_alpha", "32",
        "--lora_target_modules", "all-linear", "--learning_rate", "2e-4", "--per_device_train_batch_size", "4",
        "--num_train_epochs", "1", "--max_length", "1024", "--bf16", "False", "--report_to", "none",
        "--save_strategy", "no", "--logging_steps", "5", "--seed", "42", "--use_cpu", "True",
    ]
    trl_s, trl_rss = run(trl_cmd, env, tmp / "trl.log")

    recipe = tmp / "recipe.yaml"
    recipe.write_text(json.dumps({
        "name": "bench", "stages": ["prepare", "train"],
        "model": {"base": "embedded:smollm2-135m-instruct"},
        "data": {"sources": [{"path": str(tmp / "data" / "train.jsonl"), "license": "CC0-1.0"}], "val_fraction": 0.0,
                 "max_seq_length": 1024, "mask": "all", "dedup": "none"},
        "lora": {"rank": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"},
        "training": {"epochs": 1, "micro_batch_size": 4, "learning_rate": 2e-4, "save_steps": 100000,
                     "eval_steps": 100000, "logging_steps": 5, "gradient_checkpointing": args.gradient_checkpointing},
        "eval": {"prompts": []}, "output": {"dir": str(tmp / "runs")},
    }))
    subprocess.run([sys.executable, "-m", "llmtune.cli", "prepare", str(recipe)], env=env, check=True, capture_output=True)
    lt_s, lt_rss = run([sys.executable, "-m", "llmtune.cli", "train", str(recipe)], env, tmp / "llmtune.log")

    # The machine's rate before and after the runs: the better of the two, since other load only lowers it.
    peak = max(peak, matmul_flops())
    print(f"machine: {cores} cores, fp32 matmul {peak / 1e9:.1f} GFLOP/s")

    def runtime(log_history: list[dict]) -> float:
        return next(h["train_runtime"] for h in log_history if "train_runtime" in h)

    # `trl sft` with --save_strategy no writes no trainer_state.json; its log prints the same train_runtime.
    logged = re.search(r"'train_runtime': '?([0-9.]+)", (tmp / "trl.log").read_text())
    trl_runtime = float(logged.group(1)) if logged else trl_s
    lt_metrics = [json.loads(line) for line in (tmp / "runs" / "bench" / "metrics.jsonl").read_text().splitlines()]
    lt_runtime = runtime(lt_metrics)
    prepared = json.loads((tmp / "runs" / "bench" / "data" / "prepared.json").read_text())["counts"]
    lt_tokens = prepared["trained_tokens"]  # mask=all: every non-system token carries loss

    flops_tok = model_flops_per_token(model_dir, sum(l * l for l in lengths) / tokens)
    results = {}
    for name, toks, secs, rss in (("trl sft", tokens, trl_runtime, trl_rss), ("llmtune", lt_tokens, lt_runtime, lt_rss)):
        tps = toks / secs
        processed = tokens / secs  # every token of each sequence goes through the model either way
        results[name] = {"loss_tokens_per_s": tps, "tokens_per_s": processed, "train_seconds": secs,
                         "peak_rss_gib": rss / 2**30, "mfu": processed * flops_tok / peak}
        print(f"{name:8s}: {tps:7.1f} loss-bearing tok/s, {processed:7.1f} tok/s through the model, "
              f"{secs:6.1f} s, peak RSS {rss / 2**30:.2f} GiB, MFU {100 * results[name]['mfu']:.1f}%")
    r = {k: results["llmtune"][k] / results["trl sft"][k] for k in ("loss_tokens_per_s", "tokens_per_s", "peak_rss_gib")}
    print(f"ratios llmtune / trl: loss-bearing tokens/s {r['loss_tokens_per_s']:.2f}x (target >= 1.5), "
          f"tokens/s {r['tokens_per_s']:.2f}x, peak RSS {r['peak_rss_gib']:.2f}x (target <= 1.0)")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_speed.json").write_text(json.dumps({"results": results, "ratios": r, "matmul_flops": peak,
                                                           "tokens": tokens, "conversations": len(rows),
                                                           "llmtune_gradient_checkpointing": args.gradient_checkpointing}, indent=2))
        plot = plot_results(results, r, out / "train_speed.png",
                            f"SmolLM2-135M LoRA, {len(rows)} conversations / {tokens:,} tokens, {cores} cores, "
                            f"fp32 matmul {peak / 1e9:.0f} GFLOP/s"
                            + ("; both with gradient checkpointing" if args.gradient_checkpointing else "; llmtune without gradient checkpointing"))
        print(f"wrote {out / 'train_speed.json'} and {plot}")


def plot_results(results: dict, ratios: dict, path: Path, title: str) -> Path:
    """Two bar charts side by side: loss-bearing tokens/s (with MFU) and peak RSS, trl sft vs llmtune."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    colors = ["#9e9e9e", "#1f77b4"]
    fig, (speed, memory) = plt.subplots(1, 2, figsize=(9, 3.8))
    bars = speed.bar(names, [results[n]["loss_tokens_per_s"] for n in names], color=colors)
    speed.bar_label(bars, labels=[f"{results[n]['loss_tokens_per_s']:.0f}\nMFU {100 * results[n]['mfu']:.1f}%" for n in names])
    speed.set_ylabel("trained tokens / s")
    speed.set_title(f"speed: {ratios['loss_tokens_per_s']:.2f}x (target >= 1.5x)")
    bars = memory.bar(names, [results[n]["peak_rss_gib"] for n in names], color=colors)
    memory.bar_label(bars, labels=[f"{results[n]['peak_rss_gib']:.2f} GiB" for n in names])
    memory.set_ylabel("peak RSS (GiB)")
    memory.set_title(f"memory: {ratios['peak_rss_gib']:.2f}x (target <= 1.0x)")
    for ax in (speed, memory):
        ax.margins(y=0.25)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
