"""Training throughput: every strong `trl sft` setting vs `llmtune train`, in one run.

    .venv/bin/python bench/train_speed.py [--conversations 40] [--out docs/benchmarks]

All runs train SmolLM2-135M-Instruct (the demo's model) with LoRA r=16/alpha=32 on all linear
layers, lr 2e-4, micro-batch 4, max length 1024, gradient checkpointing, one epoch over the same
length-skewed roleplay set (many short turns, a few long conversations). The baselines are
`trl sft` (TRL's CLI, its defaults plus the same hyper-parameters, OMP_NUM_THREADS = cores) in
the settings a knowledgeable user would try on a CPU: `--bf16 False` (fp32) or TRL's
default dtype (bf16 autocast), each with and without `--packing True`, and the packed bf16 one
without gradient checkpointing (`--gradient_checkpointing False`; compare it with llmtune's
`--no-gradient-checkpointing` run). The ratio that counts is
against the fastest of them. TRL's default trains every token of each sequence, so llmtune runs
with `data.mask=all`: both count loss-bearing, non-padding tokens the same way.

llmtune runs with `training.autocast: auto` (the per-machine probe picks float32 or bf16
autocast, llmtune/hardware.py); `--llmtune-autocast float32,bfloat16` runs it in each named
precision instead (the bf16 run's held-out loss is then compared with the fp32 run's), and
QLoRA (bitsandbytes NF4, `training.autocast: auto`) runs too unless `--no-qlora`. The probe's
decision for this shape is printed first.

Prints, for each run: loss-bearing tokens/s, peak RSS of the training process, model FLOPs
utilisation against this machine's matmul rate *in the dtype that run used* (fp32 and bf16
2048x2048 matmuls, measured before and after the runs), the held-out loss of llmtune's adapters
(8 more conversations, fp32), and the ratios llmtune / strongest `trl sft`. With --out, also
writes train_speed.json and train_speed.png there.

The default 40 conversations (11,913 tokens; 5 of them reach the 1024-token cap) keep the whole
run within about 20-25 minutes on 2 cores.
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


def matmul_flops(dtype: str = "float32", seconds: float = 3.0, size: int = 2048) -> float:
    """This machine's matmul rate in `dtype` on every core (FLOP/s)."""
    import torch

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    a, b = torch.randn(size, size, dtype=getattr(torch, dtype)), torch.randn(size, size, dtype=getattr(torch, dtype))
    for _ in range(3):
        a @ b
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        n += 1
    return 2 * size**3 * n / (time.perf_counter() - start)


def heldout_loss(model_dir: str, adapter_dir: Path, rows: list[dict]) -> float:
    """Token-weighted cross-entropy of base + adapter over every token of `rows`, in fp32 (the same scale for
    every adapter, whatever precision trained it)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), str(adapter_dir))
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for r in rows:
            ids = torch.tensor([tok.apply_chat_template(r["messages"], tokenize=True, return_dict=True)["input_ids"][:1024]])
            logits = model(input_ids=ids).logits.float()
            total += float(torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum"))
            count += ids.shape[1] - 1
    return total / count


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


TRL_SETTINGS = {  # name: extra `trl sft` flags
    "trl fp32": ["--bf16", "False"],
    "trl fp32 packed": ["--bf16", "False", "--packing", "True"],
    "trl default dtype": [],
    "trl default dtype packed": ["--packing", "True"],
    # TRL's SFTConfig checkpoints by default; where memory allows, a knowledgeable user turns it off.
    "trl default dtype packed no checkpointing": ["--packing", "True", "--gradient_checkpointing", "False"],
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--conversations", type=int, default=40, help="Size of the length-skewed set (one epoch each).")
    ap.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false",
                    help="Run llmtune without gradient checkpointing (faster, more memory). By default it checkpoints "
                         "(not its `auto`), like `trl sft`, whose SFTConfig turns it on: the same hyper-parameters on both sides.")
    ap.add_argument("--baselines", default=",".join(TRL_SETTINGS), help="Comma-separated `trl sft` settings to run.")
    ap.add_argument("--llmtune-autocast", default="auto",
                    help="Comma-separated training.autocast values for llmtune runs (auto, float32, bfloat16).")
    ap.add_argument("--no-qlora", dest="qlora", action="store_false", help="Skip the QLoRA (NF4) llmtune run.")
    ap.add_argument("--out", default=None, help="Write results JSON and a plot here (e.g. docs/benchmarks).")
    args = ap.parse_args()

    from transformers import AutoTokenizer

    from llmtune.models import resolve_base

    model_dir = resolve_base("embedded:smollm2-135m-instruct")
    cores = len(os.sched_getaffinity(0))
    load = os.getloadavg()
    print(f"load average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    env = {**os.environ, "OMP_NUM_THREADS": str(cores), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    tmp = Path(tempfile.mkdtemp(prefix="bench-train-"))
    rows = skewed_set(args.conversations)
    heldout = skewed_set(8, seed=1)
    (tmp / "data").mkdir()
    with (tmp / "data" / "train.jsonl").open("w") as f:
        for r in rows:
            f.write(json.dumps({"messages": r["messages"]}) + "\n")

    # Loss-bearing, non-padding tokens of one epoch, the same for every run (every token, max 1024).
    tok = AutoTokenizer.from_pretrained(model_dir)
    lengths = [min(1024, len(tok.apply_chat_template(r["messages"], tokenize=True, return_dict=True)["input_ids"])) for r in rows]
    tokens = sum(lengths)
    print(f"data: {len(rows)} conversations, {tokens:,} tokens, lengths min {min(lengths)} / "
          f"median {sorted(lengths)[len(lengths) // 2]} / max {max(lengths)}")

    peaks = {d: matmul_flops(d) for d in ("float32", "bfloat16")}
    flops_tok = model_flops_per_token(model_dir, sum(l * l for l in lengths) / tokens)
    results = {}

    def record(name: str, toks: int, secs: float, rss: int, dtype: str, **extra) -> None:
        processed = tokens / secs  # every token of each sequence goes through the model either way
        results[name] = {"loss_tokens_per_s": toks / secs, "tokens_per_s": processed, "train_seconds": secs,
                         "peak_rss_gib": rss / 2**30, "dtype": dtype, "mfu_flops": processed * flops_tok, **extra}
        print(f"  {name}: {toks / secs:.1f} loss-bearing tok/s in {secs:.1f} s ({dtype}), peak RSS {rss / 2**30:.2f} GiB", flush=True)

    for name in args.baselines.split(","):
        out_dir = tmp / name.replace(" ", "-")
        trl_cmd = [
            str(Path(sys.executable).parent / "trl"), "sft", "--model_name_or_path", model_dir, "--dataset_name", str(tmp / "data"),
            "--output_dir", str(out_dir), "--use_peft", "--lora_r", "16", "--lora_alpha", "32",
            "--lora_target_modules", "all-linear", "--learning_rate", "2e-4", "--per_device_train_batch_size", "4",
            "--num_train_epochs", "1", "--max_length", "1024", "--report_to", "none",
            "--save_strategy", "no", "--logging_steps", "5", "--seed", "42", "--use_cpu", "True", *TRL_SETTINGS[name],
        ]
        log = tmp / f"{out_dir.name}.log"
        secs, rss = run(trl_cmd, env, log)
        # `trl sft` with --save_strategy no writes no trainer_state.json; its log prints the same train_runtime.
        logged = re.search(r"'train_runtime': '?([0-9.]+)", log.read_text())
        record(name, tokens, float(logged.group(1)) if logged else secs, rss,
               "float32" if "--bf16" in TRL_SETTINGS[name] else "bfloat16")

    # What `training.autocast: auto` picks for this bench's shape on this machine (the probe, or its cached answer).
    from transformers import AutoConfig

    from llmtune.hardware import probe_tokens, training_precision

    decision = training_precision(AutoConfig.from_pretrained(model_dir), lora_rank=16, tokens=probe_tokens(4, 1024),
                                  threads=cores, say=print)
    print(f"training.autocast auto on this machine: {decision.label} ({decision.reason}"
          f"{', cached' if decision.cached else ''})", flush=True)
    variants = [(f"llmtune {a}" if a != "auto" else "llmtune", a, "none") for a in args.llmtune_autocast.split(",")]
    if args.qlora:
        variants.append(("llmtune QLoRA", "auto", "nf4"))
    for name, autocast, quant in variants:
        recipe = tmp / f"{name.replace(' ', '-')}.yaml"
        recipe.write_text(json.dumps({
            "name": recipe.stem, "stages": ["prepare", "train"],
            "model": {"base": "embedded:smollm2-135m-instruct"},
            "data": {"sources": [{"path": str(tmp / "data" / "train.jsonl"), "license": "CC0-1.0"}], "val_fraction": 0.0,
                     "max_seq_length": 1024, "mask": "all", "dedup": "none"},
            "lora": {"rank": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"},
            "quantization": {"mode": quant},
            "training": {"epochs": 1, "micro_batch_size": 4, "learning_rate": 2e-4, "save_steps": 100000,
                         "eval_steps": 100000, "logging_steps": 5, "gradient_checkpointing": args.gradient_checkpointing,
                         "autocast": autocast},
            "eval": {"prompts": []}, "output": {"dir": str(tmp / "runs")},
        }))
        subprocess.run([sys.executable, "-m", "llmtune.cli", "prepare", str(recipe)], env=env, check=True, capture_output=True)
        log = tmp / f"{recipe.stem}.log"
        secs, rss = run([sys.executable, "-m", "llmtune.cli", "train", str(recipe)], env, log)
        run_dir = tmp / "runs" / recipe.stem
        metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        runtime = next(h["train_runtime"] for h in metrics if "train_runtime" in h)
        trained = json.loads((run_dir / "data" / "prepared.json").read_text())["counts"]["trained_tokens"]
        precision = re.search(r"precision: (.*)", log.read_text())
        dtype = "bfloat16" if precision and precision.group(1).startswith("bf16 autocast") else "float32"
        record(name, trained, runtime, rss, dtype, precision=precision.group(1).strip() if precision else None,
               heldout_loss=heldout_loss(model_dir, run_dir / "adapter", heldout))
        print(f"    precision: {results[name]['precision']}; held-out loss {results[name]['heldout_loss']:.4f}", flush=True)

    # The machine's rates before and after the runs: the better of the two, since other load only lowers them.
    peaks = {d: max(p, matmul_flops(d)) for d, p in peaks.items()}
    load_end = os.getloadavg()
    print(f"machine: {cores} cores, matmul fp32 {peaks['float32'] / 1e9:.1f} GFLOP/s, bf16 {peaks['bfloat16'] / 1e9:.1f} GFLOP/s; "
          f"load average at the end {load_end[0]:.2f} {load_end[1]:.2f} {load_end[2]:.2f}")
    for r in results.values():
        r["mfu"] = r.pop("mfu_flops") / peaks[r["dtype"]]
    baselines = [n for n in results if n.startswith("trl")]
    strongest = max(baselines, key=lambda n: results[n]["loss_tokens_per_s"])
    for name, r in results.items():
        ratio = r["loss_tokens_per_s"] / results[strongest]["loss_tokens_per_s"]
        rss = r["peak_rss_gib"] / results[strongest]["peak_rss_gib"]
        r["ratio_vs_strongest"], r["rss_vs_strongest"] = ratio, rss
        print(f"{name:26s}: {r['loss_tokens_per_s']:7.1f} loss-bearing tok/s, {r['tokens_per_s']:7.1f} tok/s through the model, "
              f"{r['train_seconds']:6.1f} s, peak RSS {r['peak_rss_gib']:.2f} GiB, MFU {100 * r['mfu']:.1f}% of {r['dtype']} peak, "
              f"{ratio:.2f}x the strongest trl sft ({strongest})")
    llm = [n for n in results if n.startswith("llmtune") and "QLoRA" not in n]
    if llm:
        best = max(llm, key=lambda n: results[n]["loss_tokens_per_s"])
        b = results[best]
        print(f"ratios {best} / {strongest}: loss-bearing tokens/s {b['ratio_vs_strongest']:.2f}x (target >= 2.0), "
              f"peak RSS {b['rss_vs_strongest']:.2f}x (target <= 1.0), MFU {100 * b['mfu']:.1f}% (target >= 45%)")
    if "llmtune float32" in results and "llmtune bfloat16" in results:
        f, h = results["llmtune float32"]["heldout_loss"], results["llmtune bfloat16"]["heldout_loss"]
        print(f"held-out loss bf16 / fp32: {h:.4f} / {f:.4f} = {h / f:.4f} (target within 2%)")
    if "llmtune QLoRA" in results and llm:
        q = results["llmtune QLoRA"]
        print(f"QLoRA / LoRA ({llm[0]}): {q['loss_tokens_per_s'] / results[llm[0]]['loss_tokens_per_s']:.2f}x tokens/s, "
              f"peak RSS {q['peak_rss_gib'] / results[llm[0]]['peak_rss_gib']:.2f}x")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_speed.json").write_text(json.dumps({
            "results": results, "strongest_baseline": strongest, "matmul_flops": peaks, "tokens": tokens,
            "conversations": len(rows), "load_average": {"start": load, "end": load_end},
            "probe": {"autocast": decision.autocast, "reason": decision.reason, "fp32_seconds": decision.fp32_seconds,
                      "bf16_seconds": decision.bf16_seconds},
            "llmtune_gradient_checkpointing": args.gradient_checkpointing}, indent=2))
        plot = plot_results(results, strongest, out / "train_speed.png",
                            f"SmolLM2-135M LoRA, {len(rows)} conversations / {tokens:,} tokens, {cores} cores, "
                            f"matmul fp32 {peaks['float32'] / 1e9:.0f} / bf16 {peaks['bfloat16'] / 1e9:.0f} GFLOP/s, "
                            f"load {load[0]:.1f}-{load_end[0]:.1f}")
        print(f"wrote {out / 'train_speed.json'} and {plot}")


def plot_results(results: dict, strongest: str, path: Path, title: str) -> Path:
    """Two bar charts: loss-bearing tokens/s (with MFU of the dtype each run used) and peak RSS, every run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    colors = ["#9e9e9e" if n.startswith("trl") else "#1f77b4" for n in names]
    colors = ["#555555" if n == strongest else c for n, c in zip(names, colors)]
    labels = [n.replace(" ", "\n", 2) for n in names]
    fig, (speed, memory) = plt.subplots(1, 2, figsize=(13, 4.6))
    bars = speed.bar(labels, [results[n]["loss_tokens_per_s"] for n in names], color=colors)
    speed.bar_label(bars, fontsize=7, labels=[
        f"{results[n]['loss_tokens_per_s']:.0f}\n{results[n]['ratio_vs_strongest']:.2f}x\nMFU {100 * results[n]['mfu']:.0f}%\n"
        f"{'bf16' if results[n]['dtype'] == 'bfloat16' else 'fp32'}" for n in names])
    speed.set_ylabel("trained tokens / s")
    speed.set_title(f"speed vs the strongest trl sft ({strongest}, dark); target >= 2.0x", fontsize=9)
    bars = memory.bar(labels, [results[n]["peak_rss_gib"] for n in names], color=colors)
    memory.bar_label(bars, fontsize=7, labels=[f"{results[n]['peak_rss_gib']:.1f} GiB\n{results[n]['rss_vs_strongest']:.2f}x" for n in names])
    memory.set_ylabel("peak RSS (GiB)")
    memory.set_title("memory; target <= 1.0x", fontsize=9)
    for ax in (speed, memory):
        ax.margins(y=0.35)
        ax.tick_params(axis="x", labelsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
