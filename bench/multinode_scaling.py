"""Scaling of `llmtune train` from 1 process to 2, launched as 2 nodes on 127.0.0.1 (the multi-node path:
handshake, accelerate, torchrun static rendezvous, DDP over gloo or NCCL), on this machine.

    .venv/bin/python bench/multinode_scaling.py [--model embedded:smollm2-135m-instruct] [--steps 4]
        [--micro-batch 4] [--single-node] [--out docs/benchmarks]

Every run trains the same recipe with the same global batch (1 x micro-batch B vs 2 x B/2), the same
steps and the same data (the team's roleplay samples, no packing), all measured in this run:

- scaling efficiency = throughput(2 processes) / (2 x throughput(1 process)), 1.0 = linear, where a
  process has one device: one GPU on a machine with 2+ GPUs, one core (1 thread) on a CPU machine;
- on a CPU machine also the ratio against the strongest 1-process baseline, one process using every
  core: what splitting the same cores into two DDP ranks gains or costs.

Throughput is the Trainer's own train_runtime (metrics.jsonl; no process start or model loading) for
the same work. --single-node also measures `--nproc 2` on one node. Numbers taken while other work
shares the machine are pessimistic and noisy, the multi-threaded baseline most of all.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from llmtune.distributed import free_port

REPO = Path(__file__).resolve().parents[1]


def cuda_devices() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def write_recipe(tmp: Path, model: str, steps: int) -> Path:
    recipe = {
        "name": "scaling",
        "model": {"base": model},
        "data": {"sources": [{"path": str(REPO / "data/roleplay/mara_vell.jsonl"), "license": "CC0-1.0"}],
                 "val_fraction": 0.0, "max_seq_length": 256},
        "lora": {"rank": 16, "alpha": 32, "dropout": 0.0},
        "training": {"max_steps": steps, "micro_batch_size": 1, "learning_rate": 2e-4, "logging_steps": 1,
                     "save_steps": 10_000, "eval_steps": 10_000, "warmup_ratio": 0.0, "packing": False,
                     "group_by_length": False, "gradient_checkpointing": False},
        "eval": {"prompts": []},
        "output": {"dir": str(tmp / "runs")},
    }
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def train_runtime(run_dir: Path) -> float:
    for line in reversed((run_dir / "metrics.jsonl").read_text().splitlines()):
        record = json.loads(line)
        if "train_runtime" in record:
            return float(record["train_runtime"])
    raise RuntimeError(f"no train_runtime in {run_dir / 'metrics.jsonl'}")


def run(cmds: list[list[str]], label: str) -> None:
    started = time.time()
    procs = [subprocess.Popen(c, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for c in cmds]
    outs = [p.communicate()[0] for p in procs]
    for p, out in zip(procs, outs):
        if p.returncode:
            sys.exit(f"{label} failed:\n{out[-3000:]}")
    print(f"  {label}: done in {time.time() - started:.0f} s (wall, with start-up)", file=sys.stderr)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded:smollm2-135m-instruct")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--micro-batch", type=int, default=4, help="global batch; each of 2 processes takes half")
    ap.add_argument("--single-node", action="store_true", help="also measure --nproc 2 on one node")
    ap.add_argument("--out", type=Path, help="write multinode_scaling.json here")
    args = ap.parse_args()
    if args.micro_batch % 2:
        sys.exit("--micro-batch must be even (2 processes take half each)")

    tmp = Path(tempfile.mkdtemp(prefix="llmtune-scaling-"))
    recipe = write_recipe(tmp, args.model, args.steps)
    cli = [sys.executable, "-m", "llmtune.cli"]
    subprocess.run(cli + ["prepare", str(recipe), "output.name=one"], cwd=REPO, check=True, capture_output=True)
    prepared = json.loads((tmp / "runs/one/data/prepared.json").read_text())["counts"]
    gpus = cuda_devices()
    if gpus == 1:
        sys.exit("one GPU: two processes would share it. Run with CUDA_VISIBLE_DEVICES= for the CPU figure, "
                 "or on a machine with 2+ GPUs for the 1-GPU vs 2-GPU one")
    cores = len(os.sched_getaffinity(0))
    half = f"training.micro_batch_size={args.micro_batch // 2}"
    print(f"{args.model}, {args.steps} steps of global batch {args.micro_batch}, {prepared['train']} conversations, "
          f"{f'{gpus} GPUs' if gpus else f'{cores} CPU cores'}", file=sys.stderr)

    one_thread = [] if gpus else ["training.num_threads=1"]
    full = f"training.micro_batch_size={args.micro_batch}"
    runs = {}
    run([cli + ["train", str(recipe), "output.name=one", full, *one_thread]], "1 process" + ("" if gpus else ", 1 thread"))
    runs["1 process" + ("" if gpus else ", 1 thread")] = "one"
    if not gpus:
        subprocess.run(cli + ["prepare", str(recipe), "output.name=one-all"], cwd=REPO, check=True, capture_output=True)
        run([cli + ["train", str(recipe), "output.name=one-all", full]], f"1 process, {cores} threads")
        runs[f"1 process, {cores} threads"] = "one-all"
    port = free_port()
    two = "2 nodes x 1 process" + ("" if gpus else ", 1 thread each")
    run([cli + ["train", str(recipe), "output.name=two-nodes", half, *one_thread, "--nnodes", "2", "--node-rank", str(r),
                "--master-addr", "127.0.0.1", "--master-port", str(port), "--nproc", "1"] for r in (0, 1)], two)
    runs[two] = "two-nodes"
    if args.single_node:
        run([cli + ["train", str(recipe), "output.name=one-node", half, *one_thread, "--nproc", "2"]],
            "1 node x 2 processes")
        runs["1 node x 2 processes"] = "one-node"

    # The same work in every run, so throughput ratios are runtime ratios.
    tokens = prepared["trained_tokens"] * args.steps * args.micro_batch / max(1, prepared["train"])
    seconds = {label: train_runtime(tmp / "runs" / name) for label, name in runs.items()}
    labels = list(seconds)
    base = seconds[labels[0]]
    report = {"model": args.model, "steps": args.steps, "global_batch": args.micro_batch, "gpus": gpus, "cores": cores,
              "load_average_1min": os.getloadavg()[0], "train_seconds": seconds,
              "approx_tokens_per_s": {k: tokens / v for k, v in seconds.items()}}
    print("\n| run | train s | tokens/s (approx.) | vs first row |\n|---|---|---|---|")
    for label, s in seconds.items():
        print(f"| {label} | {s:.1f} | {tokens / s:.0f} | {base / s:.2f}x |")
    device = "GPU" if gpus else "core"
    for label in labels:
        if label.startswith(("2 nodes", "1 node x 2")):
            eff = base / seconds[label] / 2
            report.setdefault("scaling_efficiency", {})[label] = eff
            print(f"scaling efficiency, {label} vs 1 process, one {device} each: {eff:.2f} (1.0 = linear)")
            if not gpus:
                ratio = seconds[f"1 process, {cores} threads"] / seconds[label]
                report.setdefault("vs_one_process_all_cores", {})[label] = ratio
                print(f"  {label} vs 1 process using all {cores} cores: {ratio:.2f}x")
    print(f"load average while measuring: {os.getloadavg()[0]:.1f} on {cores} cores")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "multinode_scaling.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
