#!/usr/bin/env python3
"""Moderation screening speed on CPU: one message p50/p90 latency and batched throughput.

    .venv/bin/python bench/moderation_speed.py [--threads 2] [--repeats 200]

Targets (docs/moderation.md): one message p50 <= 15 ms; batched >= 200 messages/s, with
torch.set_num_threads(2). The baseline, measured in the same run on the same messages, is the
straightforward way to run the same adapter: transformers AutoModel + PeftModel (LoRA not
merged) + head, one message per call, and batches padded in arrival order. Ratios are printed
against it. Messages: the dev set's single texts (short) and roleplay-length messages; and a
conversation resent turn after turn, with and without the prefix cache.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RP_SENTENCES = [
    "*She sets the lantern on the table and studies the map.*", "The storm has pushed us two days off course.",
    "\"We make for the harbour at dawn,\" the captain says, tapping the coastline.", "Rain drums on the deck above.",
    "He laughs and pours two cups of tea, sliding one across.", "The old lighthouse keeper waves from the cliff.",
    "Somewhere below, the cook is singing a song about the sea.", "She folds the letter and tucks it into her coat.",
]


def percentile(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))]


def messages(n_short: int, n_long: int) -> tuple[list[str], list[str]]:
    rows = [json.loads(line) for line in (REPO / "data/moderation/eval/dev.jsonl").read_text().splitlines() if line.strip()]
    short = [r["text"] for r in rows if r.get("text")][:n_short]
    long = [" ".join(RP_SENTENCES[(i + k) % len(RP_SENTENCES)] for k in range(5)) for i in range(n_long)]
    return short, long


class Baseline:
    """transformers + peft, LoRA unmerged, the way a user would load the saved adapter."""

    def __init__(self, adapter_dir: Path):
        import torch
        from peft import PeftModel
        from safetensors.torch import load_file
        from transformers import AutoModel, AutoTokenizer

        from llmtune.encoder import minilm_dir

        self.torch = torch
        self.tok = AutoTokenizer.from_pretrained(str(minilm_dir()))
        self.model = PeftModel.from_pretrained(AutoModel.from_pretrained(str(minilm_dir())), str(adapter_dir)).eval()
        head = load_file(str(adapter_dir / "head.safetensors"))
        self.w, self.b = head["weight"], head["bias"]

    def scores(self, texts: list[str]):
        from llmtune.encoder import mean_pool
        from llmtune.moderation.normalize import canonical

        with self.torch.inference_mode():
            enc = self.tok([canonical(t) for t in texts], return_tensors="pt", padding=True, truncation=True, max_length=128)
            hidden = self.model(**enc).last_hidden_state
            return self.torch.sigmoid(mean_pool(hidden, enc["attention_mask"]) @ self.w.T + self.b)


def time_single(fn, texts: list[str], repeats: int) -> tuple[list[float], list[float]]:
    """Wall-clock and CPU milliseconds per call (CPU time / threads shows what a dedicated core does
    on a machine other jobs share)."""
    for t in texts[:10]:
        fn(t)
    wall, cpu = [], []
    for i in range(repeats):
        t = texts[i % len(texts)]
        w0, c0 = time.perf_counter(), time.process_time()
        fn(t)
        wall.append((time.perf_counter() - w0) * 1000)
        cpu.append((time.process_time() - c0) * 1000)
    return wall, cpu


def time_batched(fn, texts: list[str], batch_size: int) -> tuple[float, float]:
    """Messages per wall second, and per CPU second."""
    fn(texts[:batch_size])
    w0, c0 = time.perf_counter(), time.process_time()
    for i in range(0, len(texts), batch_size):
        fn(texts[i: i + batch_size])
    return len(texts) / (time.perf_counter() - w0), len(texts) / (time.process_time() - c0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--adapter", default="embedded")
    ap.add_argument("--precision", default="auto", choices=["auto", "float32", "bfloat16"],
                    help="the encoder's arithmetic (auto: bf16 where the CPU has native bf16)")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from llmtune.moderation import ModerationConfig, load_screener

    screener = load_screener(ModerationConfig(adapter=args.adapter, precision=args.precision))
    baseline = Baseline(screener.adapter.dir)
    short, long = messages(400, 128)
    print(f"moderation_speed: torch threads {torch.get_num_threads()}, adapter {screener.adapter.dir} ({screener.adapter.precision})")
    print(f"messages: {len(short)} dev-set texts (~{statistics.mean(len(t.split()) for t in short):.0f} words), "
          f"{len(long)} roleplay messages (~{statistics.mean(len(t.split()) for t in long):.0f} words)")

    threads = torch.get_num_threads()
    summary = {}
    def uncached(t):
        screener.clear_caches()  # every call pays for its text: no cache hit flatters the numbers
        return screener.screen(t)

    def uncached_batch(ts):
        screener.clear_caches()
        return screener.screen_batch(ts)

    for name, texts in (("short", short), ("roleplay", long)):
        ours, ours_cpu = time_single(uncached, texts, args.repeats)
        base, base_cpu = time_single(lambda t: baseline.scores([t]), texts, args.repeats)
        rules, _ = time_single(screener.rules.match, texts, args.repeats)
        ours_bs, ours_bs_cpu = time_batched(uncached_batch, texts, args.batch_size)
        base_bs, base_bs_cpu = time_batched(baseline.scores, texts, args.batch_size)
        p50, p50_cpu = percentile(ours, .5), percentile(ours_cpu, .5) / threads
        summary[name] = (p50, ours_bs, p50_cpu, ours_bs_cpu * threads)
        print(f"\n[{name}] one message, full screen (rules + adapter):  p50 {p50:6.2f} ms   p90 {percentile(ours, .9):6.2f} ms"
              f"   (CPU time / thread: p50 {p50_cpu:6.2f} ms)")
        print(f"[{name}] one message, baseline (HF + PEFT, adapter only): p50 {percentile(base, .5):6.2f} ms   "
              f"p90 {percentile(base, .9):6.2f} ms   -> {percentile(base, .5) / p50:.2f}x"
              f"   (CPU: {percentile(base_cpu, .5) / percentile(ours_cpu, .5):.2f}x)")
        print(f"[{name}] rules layer alone:                          p50 {percentile(rules, .5):6.2f} ms")
        print(f"[{name}] batched ({args.batch_size}), full screen: {ours_bs:7.1f} messages/s   baseline {base_bs:7.1f} messages/s"
              f"   -> {ours_bs / base_bs:.2f}x   (per CPU second x {threads} threads: {ours_bs_cpu * threads:7.1f}/s,"
              f" baseline {base_bs_cpu * threads:7.1f}/s)")

    # A chat client resends the whole history every turn (SillyTavern: 2-8k tokens). With the
    # prefix cache a turn pays for its new message only; without it, for the whole conversation.
    history = [{"role": "system", "content": " ".join(RP_SENTENCES * 6)}]
    turn_ms, cold_ms = [], []
    screener.clear_caches()
    for k in range(40):
        history.append({"role": "user" if k % 2 == 0 else "assistant", "content": long[k % len(long)] + f" ({k})"})
        w0 = time.perf_counter()
        screener.screen_conversation(history)
        turn_ms.append((time.perf_counter() - w0) * 1000)
    screener.clear_caches()
    for _ in range(3):
        w0 = time.perf_counter()
        screener.screen_conversation(history)
        cold_ms.append((time.perf_counter() - w0) * 1000)
        screener.clear_caches()
    words = sum(len(m["content"].split()) for m in history)
    print(f"\n[conversation] 41 messages (~{words:,} words) resent every turn: p50 {percentile(turn_ms, .5):.1f} ms a turn "
          f"with the prefix cache, {statistics.median(cold_ms):.1f} ms for the whole conversation uncached "
          f"-> {statistics.median(cold_ms) / percentile(turn_ms, .5):.1f}x")

    p50, batched, p50_cpu, batched_cpu = summary["short"]
    print(f"\ntargets (short messages, wall clock): p50 {p50:.2f} ms <= 15 ms: {'PASS' if p50 <= 15 else 'FAIL'}; "
          f"batched {batched:.0f}/s >= 200/s: {'PASS' if batched >= 200 else 'FAIL'}")
    print(f"targets (short messages, CPU time, i.e. on {threads} dedicated cores): p50 {p50_cpu:.2f} ms <= 15 ms: "
          f"{'PASS' if p50_cpu <= 15 else 'FAIL'}; batched {batched_cpu:.0f}/s >= 200/s: {'PASS' if batched_cpu >= 200 else 'FAIL'}")
    load = os.getloadavg()[0]
    if load > threads + 0.5:
        print(f"note: load average {load:.1f} on {os.cpu_count()} cores while measuring; other jobs shared the CPU, so "
              "wall-clock numbers are pessimistic")


if __name__ == "__main__":
    main()
