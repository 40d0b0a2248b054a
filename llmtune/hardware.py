"""What this machine trains fastest in: float32 or bf16 autocast, measured once and cached.

A CPU with AVX512-BF16 or AMX multiplies bf16 matrices several times faster than fp32, but a
LoRA training step is more than a matmul: autocast casts every frozen weight on each forward,
oneDNN builds a kernel per new shape (packed batches change shape every step), norms and
softmax stay fp32. Whether the step gets faster depends on the model's widths and the batch,
so `training_precision` times a forward + backward + AdamW step of a two-layer copy of the
model's own architecture (random weights, same widths, vocabulary scaled so the LM head keeps
its share of the work, LoRA on every linear layer, several packed-batch lengths) in both, and
picks bf16 only when it is clearly faster. The result is cached per machine, torch version,
thread count and model shape (`LLMTUNE_CACHE/hardware/precision.json`), unless the machine was
busy (load average above 1.25 per core) while it ran: then it decides this run only.

On CUDA nothing is probed: bf16 where `torch.cuda.is_bf16_supported()`, else fp16 (model.dtype).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

PROBE_VERSION = 1
PROBE_LAYERS = 2
# bf16 must beat fp32 by this factor: it also costs precision, and small gaps are timing noise.
BF16_MARGIN = 1.10
# A probe run while the load average exceeds this many runnable tasks per core decides only the current run.
BUSY_LOAD = 1.25
_DECIDED: dict[str, "PrecisionDecision"] = {}


@dataclass(frozen=True)
class PrecisionDecision:
    """Whether training autocasts to bf16 (LoRA master weights stay fp32), and why."""

    autocast: str | None  # "bfloat16" or None (plain float32)
    reason: str
    fp32_seconds: float | None = None
    bf16_seconds: float | None = None
    cached: bool = False

    @property
    def label(self) -> str:
        return "bf16 autocast (fp32 weights)" if self.autocast else "float32"


def native_bf16() -> bool:
    """Whether this CPU computes bfloat16 matmuls natively (AVX512-BF16 or AMX); elsewhere bf16 is emulated,
    hundreds of times slower, and never worth probing."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()) and torch.backends.cpu.get_cpu_capability() != "DEFAULT"
    except (AttributeError, RuntimeError):
        return False


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_bf16_flags() -> list[str]:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return []
    return sorted(f for f in flags if f == "avx512_bf16" or f.startswith("amx"))


def _cache_path() -> Path:
    from llmtune.storage import cache_dir

    return cache_dir() / "hardware" / "precision.json"


def _read_cache() -> dict:
    try:
        return json.loads(_cache_path().read_text())
    except (OSError, ValueError):
        return {}


def _write_cache(key: str, value: dict) -> None:
    path = _cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    entries = _read_cache()
    entries[key] = value
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".precision-")
    with os.fdopen(fd, "w") as f:
        json.dump(entries, f, indent=2)
    os.replace(tmp, path)


def probe_config(model_config, layers: int = PROBE_LAYERS):
    """A `layers`-deep copy of a model config; the vocabulary shrinks with the depth so the LM head keeps the
    share of the step it has in the full model."""
    import copy

    cfg = copy.deepcopy(model_config)
    full = cfg.num_hidden_layers
    cfg.num_hidden_layers = min(layers, full)
    cfg.vocab_size = max(256, round(cfg.vocab_size * cfg.num_hidden_layers / full))
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if isinstance(getattr(cfg, key, None), int) and getattr(cfg, key) >= cfg.vocab_size:
            setattr(cfg, key, 0)
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = cfg.layer_types[: cfg.num_hidden_layers]
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    return cfg


def probe_lengths(tokens: int) -> list[int]:
    """Packed micro-batch lengths for the probe: four different sizes from a quarter of `tokens` up to all of
    it (training rarely sees one shape twice in a row, and oneDNN builds a bf16 kernel per new shape)."""
    return [max(16, round(tokens * f)) for f in (0.25, 0.5, 0.75, 1.0)]


def time_training_steps(model_config, *, lora_rank: int, tokens: int, repeats: int = 2) -> tuple[float, float]:
    """Seconds (float32, bf16 autocast) for forward + backward + AdamW over the `probe_lengths(tokens)` packed
    rows, on a two-layer copy of the architecture with LoRA on every linear layer and fp32 weights. Each length
    runs in both precisions back to back, `repeats` times, and the fastest of each counts, so a burst of other
    load on the machine hits both sides alike."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    cfg = probe_config(model_config)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="sdpa")
        model.config.use_cache = False
        model = get_peft_model(model, LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, target_modules="all-linear",
                                                  task_type="CAUSAL_LM"))
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        g = torch.Generator().manual_seed(0)

        def step(ids, autocast: bool) -> float:
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return time.perf_counter() - start

        warm = torch.randint(0, cfg.vocab_size, (1, 24), generator=g)  # a length not timed
        step(warm, False), step(warm, True)
        fp32 = bf16 = 0.0
        for n in probe_lengths(tokens):
            ids = torch.randint(0, cfg.vocab_size, (1, n), generator=g)
            times = [(step(ids, False), step(ids, True)) for _ in range(repeats)]
            fp32 += min(t[0] for t in times)
            bf16 += min(t[1] for t in times)
    return fp32, bf16


def _probe_key(model_config, lora_rank: int, tokens: int, threads: int) -> str:
    import torch

    shape = {k: getattr(model_config, k, None) for k in (
        "model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "vocab_size")}
    text = json.dumps({"v": PROBE_VERSION, "cpu": cpu_name(), "flags": cpu_bf16_flags(), "torch": torch.__version__,
                       "threads": threads, "shape": shape, "rank": lora_rank, "tokens": tokens}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def probe_tokens(micro_batch_size: int, max_seq_length: int) -> int:
    """Tokens of the probe's largest packed row: a micro-batch of full rows, capped so the probe stays short."""
    return max(64, min(micro_batch_size * max_seq_length, 1024))


def training_precision(
    model_config, *, lora_rank: int, tokens: int, requested: str = "auto", device: str = "cpu",
    threads: int | None = None, say=None,
) -> PrecisionDecision:
    """Pick plain float32 or bf16 autocast for training on a CPU (`requested`: auto | float32 | bfloat16).

    `auto` measures (`time_training_steps`) unless the CPU lacks native bf16 or a cached answer for this
    machine and shape exists. `say` (a print function) hears about a probe before it runs."""
    import torch

    if device != "cpu":
        return PrecisionDecision(None, "not a CPU: precision follows model.dtype")
    if requested == "float32":
        return PrecisionDecision(None, "training.autocast: float32 in the recipe")
    if requested == "bfloat16":
        why = "" if native_bf16() else " (this CPU has no native bf16: expect it to be far slower)"
        return PrecisionDecision("bfloat16", f"training.autocast: bfloat16 in the recipe{why}")
    if not native_bf16():
        return PrecisionDecision(None, "this CPU has no native bf16 (no AVX512-BF16 or AMX), so bf16 would be emulated")
    threads = threads or torch.get_num_threads()
    key = _probe_key(model_config, lora_rank, tokens, threads)
    if key in _DECIDED:  # train, eval and merge in one process probe once
        return _DECIDED[key]
    cached = _read_cache().get(key)
    if cached is not None:
        return PrecisionDecision(**{**cached, "cached": True})
    if say is not None:
        say(f"  precision probe: timing a {PROBE_LAYERS}-layer LoRA training step of this model's widths in float32 "
            f"and bf16 autocast ({threads} threads, packed rows up to {tokens} tokens; cached unless the machine is busy)")
    load_before = os.getloadavg()[0]
    fp32, bf16 = time_training_steps(model_config, lora_rank=lora_rank, tokens=tokens)
    busy = max(load_before, os.getloadavg()[0]) > BUSY_LOAD * (os.cpu_count() or 1)
    faster = fp32 / bf16
    flags = "/".join(cpu_bf16_flags()) or "native bf16"
    if faster >= BF16_MARGIN:
        decision = PrecisionDecision("bfloat16", f"measured: bf16 autocast {faster:.2f}x float32 on a LoRA step here ({flags})",
                                     fp32, bf16)
    else:
        decision = PrecisionDecision(None, f"measured: bf16 autocast only {faster:.2f}x float32 on a LoRA step here "
                                           f"(needs {BF16_MARGIN:.2f}x), though the CPU has {flags}", fp32, bf16)
    if busy:  # other work skews such timings: decide for this process, measure again next time
        _DECIDED[key] = dataclasses.replace(decision, reason=decision.reason + " (machine busy: not cached)")
        return _DECIDED[key]
    _write_cache(key, {k: v for k, v in asdict(decision).items() if k != "cached"})
    return decision
