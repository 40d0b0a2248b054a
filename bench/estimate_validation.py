#!/usr/bin/env python
"""Measured vs predicted peak training memory: the estimator (llmtune.estimate) against real steps.

CPU (always): real TRL SFTTrainer + PEFT LoRA steps, built the way llmtune/train/sft.py builds
them, on the embedded tiny random Llama and SmolLM2-135M shapes in fp32. Each case runs in a
fresh subprocess under `torch.profiler` with `profile_memory=True`: PyTorch's CPU allocator
reports every allocation and free with the running total of live bytes ("Total Allocated"),
so the measured peak is the largest live-tensor total from before the model is built to after
the last step. The peak RSS growth of a second, unprofiled subprocess is printed beside it
(`--rss`); it also counts glibc's arena slack and the Python objects, so it runs higher.

The model is built with `AutoModelForCausalLM.from_config` (random weights, same shapes):
`from_pretrained` on a CPU memory-maps safetensors, and those file-backed weights are invisible
to the allocator, which would make the measurement flatter than the truth.

CUDA (when a GPU is present, `--gpu`): for each GPU recipe under recipes/, a random-weight
model of the recipe's real shape (from llmtune/archs, no download) is saved once, loaded the
way training loads it (bitsandbytes NF4 through llmtune.models.load_base_model), and trained
for a few QLoRA steps; `torch.cuda.max_memory_allocated()` is compared with the estimator's
allocator part (the peak less CUDA context, allocator slack and paged optimizer state).

    python bench/estimate_validation.py            # CPU table (about 4 minutes on 2 cores)
    python bench/estimate_validation.py --rss      # plus the RSS column (twice the time)
    python bench/estimate_validation.py --gpu      # CUDA table for recipes/*-qlora-*gb.yaml
    python bench/estimate_validation.py --gpu --recipes recipes/qwen2.5-7b-qlora-16gb.yaml
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MB = 1024**2

# Shapes chosen so that, between them, every part of the model carries weight. With SmolLM2's
# 49k vocabulary the loss-head tiles decide the CPU peak; the `wide-llama` shape (small
# vocabulary, wide MLP, a local directory with only a config.json) makes the decoder layers
# decide it, with and without checkpointing. The `bf16 autocast` cases run the GPU recipes'
# dtype path on the CPU: NF4 base, fp32 embeddings/norms after prepare_model_for_kbit_training,
# bf16 LoRA weights, bf16 autocast (sft.py only enables it on CUDA; the bench forces it here).
CPU_CASES: list[dict] = [
    {"label": "tiny-random-llama b2x64 r8", "base": "embedded:tiny-random-llama", "b": 2, "s": 64, "r": 8, "drop": 0.0},
    {"label": "tiny-random-llama b4x512 r8 padded", "base": "embedded:tiny-random-llama", "b": 4, "s": 512, "r": 8,
     "pack": False},
    {"label": "tiny-random-llama b4x512 r8 ckpt", "base": "embedded:tiny-random-llama", "b": 4, "s": 512, "r": 8, "ckpt": True},
    {"label": "smollm2-135m b2x128 r16 padded", "base": "embedded:smollm2-135m-instruct", "b": 2, "s": 128, "r": 16,
     "pack": False},
    {"label": "smollm2-135m b4x256 r16 (demo-cpu)", "base": "embedded:smollm2-135m-instruct", "b": 4, "s": 256, "r": 16},
    {"label": "smollm2-135m b4x256 r16 ckpt", "base": "embedded:smollm2-135m-instruct", "b": 4, "s": 256, "r": 16, "ckpt": True},
    {"label": "smollm2-135m b2x512 r16 padded no dropout", "base": "embedded:smollm2-135m-instruct", "b": 2, "s": 512,
     "r": 16, "drop": 0.0, "pack": False},
    {"label": "smollm2-135m b1x1024 r8 ckpt", "base": "embedded:smollm2-135m-instruct", "b": 1, "s": 1024, "r": 8, "ckpt": True},
    {"label": "wide-llama b8x512 r16 padded", "base": "custom:wide-llama", "b": 8, "s": 512, "r": 16, "pack": False},
    {"label": "wide-llama b8x512 r16 ckpt", "base": "custom:wide-llama", "b": 8, "s": 512, "r": 16, "ckpt": True},
    {"label": "wide-llama b16x512 r16 ckpt padded no dropout", "base": "custom:wide-llama", "b": 16, "s": 512, "r": 16,
     "drop": 0.0, "ckpt": True, "pack": False},
    {"label": "mini-gemma2 b4x512 r16 (eager, soft-capping)", "base": "custom:mini-gemma2", "b": 4, "s": 512, "r": 16},
    {"label": "mini-gemma2 b8x1024 r16 ckpt padded", "base": "custom:mini-gemma2", "b": 8, "s": 1024, "r": 16,
     "ckpt": True, "pack": False},
    {"label": "mid-llama QLoRA bf16 autocast b8x512", "base": "custom:mid-llama", "b": 8, "s": 512, "r": 16,
     "qlora": True, "autocast": True},
    {"label": "mid-llama QLoRA bf16 autocast b16x512 ckpt padded", "base": "custom:mid-llama", "b": 16, "s": 512,
     "r": 16, "qlora": True, "autocast": True, "ckpt": True, "pack": False},
]

# Local "models" that exist only as a config.json (random weights are built in the child).
CUSTOM_SHAPES = {
    "wide-llama": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 2, "num_attention_heads": 8,
                   "num_key_value_heads": 2, "vocab_size": 512},
    "mini-gemma2": {"model_type": "gemma2", "hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 2,
                    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 512,
                    "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0, "query_pre_attn_scalar": 64,
                    "sliding_window": 4096, "hidden_activation": "gelu_pytorch_tanh"},
    "mid-llama": {"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 2, "num_attention_heads": 4,
                  "num_key_value_heads": 2, "vocab_size": 512},
}


def custom_model_dir(name: str) -> str:
    """A directory holding only the config.json of a custom shape (the estimator reads it offline)."""
    from transformers import AutoConfig

    out = Path(tempfile.gettempdir()) / "llmtune-bench-shapes" / name
    if not (out / "config.json").exists():
        shape = {"model_type": "llama", **CUSTOM_SHAPES[name]}
        AutoConfig.for_model(**shape, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                             pad_token_id=2).save_pretrained(out)
    return str(out)


def case_recipe(case: dict, steps: int) -> dict:
    base = case["base"]
    if base.startswith("custom:"):
        base = custom_model_dir(base.removeprefix("custom:"))
    qlora = case.get("qlora", False)
    return {
        "name": "bench",
        "model": {"base": base, "dtype": "bfloat16" if case.get("autocast") else "auto",
                  "attn_implementation": "eager" if "gemma" in base else "sdpa"},
        "data": {"sources": [{"path": "data/roleplay/mara_vell.jsonl"}], "max_seq_length": case["s"]},
        "lora": {"rank": case["r"], "alpha": 2 * case["r"], "dropout": case.get("drop", 0.05), "target_modules": "all-linear"},
        "quantization": {"mode": "nf4" if qlora else "none",
                         "compute_dtype": "bfloat16" if case.get("autocast") else "auto"},
        "training": {"max_steps": steps, "micro_batch_size": case["b"], "gradient_checkpointing": case.get("ckpt", False),
                     "packing": case.get("pack", True), "optim": "adamw_torch", "learning_rate": 1e-4},
    }


# ---------------------------------------------------------------------------------------------
# The child: a few real training steps, mirroring llmtune/train/sft.py


def synthetic_dataset(vocab: int, micro_batch: int, seq: int, steps: int, every_token: bool, packed: bool):
    """Worst-case batches. Packed: every sequence max_seq_length long, so each packed row is full.
    Padded: [seq, seq-1, seq-1, ...] per batch, so there is a 4-D mask (as real chats give) and the
    longest sequence is max_seq_length."""
    import torch
    from datasets import Dataset

    g = torch.Generator().manual_seed(0)
    ids, labels = [], []
    for k in range(micro_batch * steps):
        n = seq if packed or k % micro_batch == 0 else seq - 1
        row = torch.randint(10, vocab - 10, (n,), generator=g).tolist()
        ids.append(row)
        labels.append(row if every_token else [-100] * (n // 3) + row[n // 3:])
    return Dataset.from_dict({"input_ids": ids, "labels": labels})


def build_trainer(recipe, model, tokenizer, dataset, out_dir: str, force_bf16: bool = False):
    """The model wrapping and SFTConfig of llmtune/train/sft.py, minus callbacks, eval and checkpoints.

    `force_bf16` turns on bf16 autocast on a CPU too (sft.py does that on CUDA only), to run the
    GPU recipes' dtype path here."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from torch.utils.data import SequentialSampler
    from trl import SFTConfig, SFTTrainer

    from llmtune.models import placement_for

    where = placement_for(recipe)
    t = recipe.training
    model.config.use_cache = False
    if where.qlora:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=t.gradient_checkpointing)
    model = get_peft_model(model, LoraConfig(
        r=recipe.lora.rank, lora_alpha=recipe.lora.alpha, lora_dropout=recipe.lora.dropout,
        target_modules=recipe.lora.target_modules, bias="none", task_type="CAUSAL_LM"))
    args = SFTConfig(
        output_dir=out_dir, max_steps=t.max_steps, per_device_train_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=1, learning_rate=t.learning_rate, optim=t.optim,
        gradient_checkpointing=t.gradient_checkpointing, seed=t.seed, data_seed=t.seed,
        bf16=(where.device == "cuda" or force_bf16) and where.dtype == torch.bfloat16,
        fp16=where.device == "cuda" and where.dtype == torch.float16,
        use_cpu=where.device == "cpu", ddp_find_unused_parameters=False, max_length=recipe.data.max_seq_length,
        packing=t.packing, packing_strategy="bfd",
        logging_steps=1, save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True,
        dataloader_num_workers=0, remove_unused_columns=True,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    # Same batches every run (padded: the first sequence of each is the longest).
    trainer._get_train_sampler = lambda *a, **k: SequentialSampler(trainer.train_dataset)
    if where.qlora and where.compute_dtype == torch.float32:
        for p in trainer.model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    return trainer


def peak_from_trace(path: str) -> int:
    events = json.loads(Path(path).read_text())["traceEvents"]
    return max((e["args"].get("Total Allocated", 0) for e in events if e.get("name") == "[memory]"), default=0)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child_cpu(spec: dict) -> dict:
    import resource

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from llmtune.config import Recipe
    from llmtune.models import load_base_model, load_tokenizer, placement_for, resolve_base

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    recipe = Recipe.model_validate(spec["recipe"])
    path = resolve_base(recipe.model.base)
    config = AutoConfig.from_pretrained(path)
    tokenizer = load_tokenizer(resolve_base("embedded:smollm2-135m-instruct"))  # pre-tokenized data: any will do
    dataset = synthetic_dataset(config.vocab_size, recipe.training.micro_batch_size, recipe.data.max_seq_length,
                                recipe.training.max_steps, every_token=False, packed=recipe.training.packing)
    out = tempfile.mkdtemp(prefix="llmtune-bench-")
    where = placement_for(recipe)
    weights_dir = None
    if where.qlora:
        # bitsandbytes quantizes while loading: save random weights once, load them the real way.
        weights_dir = os.path.join(out, "weights")
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config, dtype=where.dtype).save_pretrained(weights_dir)

    def run():
        torch.manual_seed(0)
        if weights_dir:
            model = load_base_model(recipe.model_copy(update={"model": recipe.model.model_copy(update={"base": weights_dir})}), where)
        else:
            model = AutoModelForCausalLM.from_config(config, dtype=where.dtype,
                                                     attn_implementation=recipe.model.attn_implementation)
        build_trainer(recipe, model, tokenizer, dataset, out, force_bf16=spec.get("autocast", False)).train()

    baseline = rss_bytes()
    start = time.time()
    try:
        if spec["profile"]:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                run()
            trace = os.path.join(out, "trace.json")
            prof.export_chrome_trace(trace)
            return {"peak_allocated": peak_from_trace(trace), "seconds": time.time() - start}
        run()
        peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return {"rss_growth": peak_rss - baseline, "seconds": time.time() - start}
    finally:
        shutil.rmtree(out, ignore_errors=True)


def child_cuda(spec: dict) -> dict:
    """QLoRA steps of a random-weight model at a recipe's real shape; torch.cuda peak statistics.

    `spec["device"] = "cpu"` runs the same path without CUDA (a smoke test of this code on a
    small shipped shape, e.g. embedded:tiny-random-llama; its numbers mean nothing)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from llmtune.config import load_recipe
    from llmtune.estimate.arch import shipped_configs
    from llmtune.models import load_base_model, load_tokenizer, placement_for, resolve_base

    device = spec.get("device", "cuda")
    cuda = device == "cuda"
    recipe_path = spec["recipe_path"]
    recipe = load_recipe(recipe_path, [f"training.max_steps={spec['steps']}"])
    hub_config, _ = shipped_configs()[recipe.model.base]
    model_dir = Path(spec["cache"]) / recipe.model.base.replace("/", "--").replace(":", "-")
    if not (model_dir / "config.json").exists():
        # Random weights at the real shape, saved once so loading (and NF4 quantization) is the real path.
        config = AutoConfig.for_model(**hub_config)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        tmp = model_dir.with_suffix(".tmp")
        model.save_pretrained(tmp, safe_serialization=True)
        del model
        if cuda:
            torch.cuda.empty_cache()
        tmp.rename(model_dir)
    recipe = load_recipe(recipe_path, [f"training.max_steps={spec['steps']}", f"model.base={model_dir}"])
    where = placement_for(recipe)
    # Any tokenizer will do for pre-tokenized data; the SmolLM2 one is local.
    tokenizer = load_tokenizer(resolve_base("embedded:smollm2-135m-instruct"))
    total = torch.cuda.mem_get_info()[1] if cuda else 0
    model = load_base_model(recipe, where)
    dataset = synthetic_dataset(hub_config["vocab_size"], recipe.training.micro_batch_size,
                                recipe.data.max_seq_length, spec["steps"], every_token=True, packed=recipe.training.packing)
    out = tempfile.mkdtemp(prefix="llmtune-bench-")
    trainer = build_trainer(recipe, model, tokenizer, dataset, out)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    shutil.rmtree(out, ignore_errors=True)
    if not cuda:
        return {"max_allocated": 0, "max_reserved": 0, "device_used_end": 0, "device": "cpu",
                "steps": trainer.state.global_step}
    torch.cuda.synchronize()
    return {
        "max_allocated": torch.cuda.max_memory_allocated(),
        "max_reserved": torch.cuda.max_memory_reserved(),
        "device_used_end": total - torch.cuda.mem_get_info()[0],
        "device": torch.cuda.get_device_name(),
        "steps": trainer.state.global_step,
    }


# ---------------------------------------------------------------------------------------------
# The parent: run children, predict, print the table


def run_child(mode: str, spec: dict, timeout: int = 1800) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if mode == "cpu":
        env["OMP_NUM_THREADS"] = str(len(os.sched_getaffinity(0)))
    proc = subprocess.run([sys.executable, __file__, f"--child-{mode}", json.dumps(spec)], capture_output=True,
                          text=True, timeout=timeout, cwd=REPO, env=env, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{\"")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"measurement failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1])


def predict_cpu(recipe_d: dict, autocast: bool = False):
    """(peak bytes, moment) the estimator predicts for a CPU run of this recipe."""
    from dataclasses import replace

    from llmtune.config import Recipe
    from llmtune.estimate import estimate
    from llmtune.estimate.arch import load_arch
    from llmtune.estimate.memory import peak_memory, precision_for, shape_for

    recipe = Recipe.model_validate(recipe_d)
    if not autocast:
        est = estimate(recipe, None, device="cpu")
        return est.peak_bytes, est.moment
    arch = load_arch(recipe.model.base)
    prec = replace(precision_for(recipe, "cpu"), autocast=True)
    peak, _, moment, _ = peak_memory(arch, prec, shape_for(recipe, arch))
    return peak, moment


def measure_cpu_cases(with_rss: bool, steps: int = 2, only: str | None = None) -> list[dict]:
    rows = []
    for case in CPU_CASES:
        if only and only not in case["label"]:
            continue
        recipe_d = case_recipe(case, steps)
        autocast = case.get("autocast", False)
        predicted, moment = predict_cpu(recipe_d, autocast)
        measured = run_child("cpu", {"recipe": recipe_d, "profile": True, "autocast": autocast})
        row = {"case": case["label"], "predicted": predicted, "measured": measured["peak_allocated"],
               "moment": moment, "seconds": round(measured["seconds"], 1)}
        if with_rss:
            row["rss_growth"] = run_child("cpu", {"recipe": recipe_d, "profile": False, "autocast": autocast})["rss_growth"]
        row["error_pct"] = 100.0 * (row["predicted"] - row["measured"]) / row["measured"]
        rows.append(row)
        print(f"  {row['case']}: predicted {predicted / MB:.0f} MiB, measured {row['measured'] / MB:.0f} MiB "
              f"({row['error_pct']:+.1f}%, {row['seconds']:.0f}s)", file=sys.stderr, flush=True)
    return rows


def gpu_recipes(paths: list[str] | None) -> list[Path]:
    if paths:
        return [Path(p) for p in paths]
    return sorted((REPO / "recipes").glob("*-qlora-*gb.yaml"))


def measure_gpu_cases(paths: list[str] | None, steps: int, cache: str, keep_models: bool) -> list[dict]:
    from llmtune.config import load_recipe
    from llmtune.estimate import estimate

    rows = []
    recipes = [(path, load_recipe(path)) for path in gpu_recipes(paths)]
    for base in dict.fromkeys(r.model.base for _, r in recipes):
        for path, recipe in [(p, r) for p, r in recipes if r.model.base == base]:
            tier = float(path.stem.rsplit("-", 1)[-1].removesuffix("gb"))
            est = estimate(recipe, tier)
            try:
                measured = run_child("cuda", {"recipe_path": str(path), "steps": steps, "cache": cache})
            except RuntimeError as exc:
                print(f"  {path.name}: {exc}", file=sys.stderr)
                continue
            predicted = est.torch_allocated_bytes
            rows.append({
                "case": path.name, "predicted": predicted, "measured": measured["max_allocated"],
                "predicted_peak": est.peak_bytes, "reserved": measured["max_reserved"],
                "device_used_end": measured["device_used_end"], "device": measured["device"],
                "error_pct": 100.0 * (predicted - measured["max_allocated"]) / measured["max_allocated"],
            })
            print(f"  {path.name}: predicted {predicted / MB:.0f} MiB allocated, measured "
                  f"{measured['max_allocated'] / MB:.0f} MiB ({rows[-1]['error_pct']:+.1f}%)", file=sys.stderr, flush=True)
        if not keep_models:  # a 7B model in bf16 is 15 GB of disk
            shutil.rmtree(Path(cache) / base.replace("/", "--"), ignore_errors=True)
    return rows


def markdown_table(rows: list[dict], gpu: bool) -> str:
    if gpu:
        head = "| recipe | predicted allocated (MiB) | measured max_memory_allocated (MiB) | error | max reserved (MiB) | predicted peak incl. context (MiB) |\n|---|---:|---:|---:|---:|---:|"
        body = [f"| {r['case']} | {r['predicted'] / MB:.0f} | {r['measured'] / MB:.0f} | {r['error_pct']:+.1f}% | "
                f"{r['reserved'] / MB:.0f} | {r['predicted_peak'] / MB:.0f} |" for r in rows]
    else:
        rss = any("rss_growth" in r for r in rows)
        head = ("| case (LoRA fp32, CPU) | predicted (MiB) | measured (MiB) | error |" + (" RSS growth (MiB) |" if rss else "")
                + " peak moment |\n|---|---:|---:|---:|" + ("---:|" if rss else "") + "---|")
        body = [f"| {r['case']} | {r['predicted'] / MB:.0f} | {r['measured'] / MB:.0f} | {r['error_pct']:+.1f}% |"
                + (f" {r.get('rss_growth', 0) / MB:.0f} |" if rss else "") + f" {r['moment']} |" for r in rows]
    return "\n".join([head, *body])


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] in ("--child-cpu", "--child-cuda"):
        spec = json.loads(sys.argv[2])
        result = child_cpu(spec) if sys.argv[1] == "--child-cpu" else child_cuda(spec)
        print(json.dumps(result))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu", action="store_true", help="measure the GPU recipes on this machine's CUDA device")
    ap.add_argument("--recipes", nargs="*", help="GPU recipes to measure (default: recipes/*-qlora-*gb.yaml)")
    ap.add_argument("--rss", action="store_true", help="also measure peak RSS growth (CPU; unprofiled reruns)")
    ap.add_argument("--only", help="CPU cases whose label contains this text")
    ap.add_argument("--steps", type=int, default=3, help="training steps per GPU measurement")
    ap.add_argument("--json", help="also write the rows to this JSON file")
    ap.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "llmtune-bench-models"),
                    help="where random-weight GPU models are saved while a model's recipes are measured")
    ap.add_argument("--keep-models", action="store_true", help="keep the saved random-weight models for another run")
    args = ap.parse_args()
    if args.gpu:
        import torch

        if not torch.cuda.is_available():
            print("no CUDA device here: the GPU column stays pending (see docs/memory.md)", file=sys.stderr)
            return 1
        rows = measure_gpu_cases(args.recipes, args.steps, args.cache, args.keep_models)
    else:
        rows = measure_cpu_cases(args.rss, only=args.only)
    print(markdown_table(rows, args.gpu))
    errors = [abs(r["error_pct"]) for r in rows]
    if errors:
        print(f"\nmax |error| {max(errors):.1f}% over {len(rows)} cases (target: {'10' if args.gpu else '15'}%)")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
