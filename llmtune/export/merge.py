"""The merge stage: fold the LoRA adapter into a full-precision copy of the base, and prove it.

Entry point: `merge(recipe) -> MergeResult`. Never merges into 4-bit weights (that silently
rounds the LoRA delta away). For QLoRA runs the base is reloaded in 16/32-bit; with
`merge.nf4_roundtrip` (default for QLoRA) each weight the adapter was trained against is
first replaced by its NF4 quantize-dequantize, read from the very 4-bit layers training
used, so the merged model computes what the trained model computed. Then:

- merged/ gets sharded safetensors, the tokenizer with the training chat template, the
  end-of-turn token as EOS and stop token, a generation_config, and a model card;
- the merged model's logits are compared with base + adapter on fixed prompts (max abs
  diff, top-1 agreement) and a merge outside tolerance fails loudly.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from llmtune.config import Recipe
from llmtune.console import console
from llmtune.artifacts import PreparedData, RunDir, sample_prompts, trained_adapter
from llmtune.distributed import configure_threads
from llmtune.errors import LlmtuneError
from llmtune.models import Placement, load_base_model, load_tokenizer, placement_for, resolve_base
from llmtune.storage import ensure_writable, model_bytes


class MergeError(LlmtuneError):
    """The merged model does not reproduce base + adapter within tolerance."""


@dataclass
class Agreement:
    reference: str
    max_abs_logit_diff: float
    top1_agreement: float
    positions: int


@dataclass
class MergeResult:
    merged_dir: Path
    dtype: str
    nf4_roundtrip: bool
    checks: list[Agreement]
    tolerance: dict
    seconds: float

    def to_json(self) -> dict:
        d = asdict(self)
        d["merged_dir"] = str(self.merged_dir)
        return d


def _prompt_batches(tokenizer, recipe: Recipe, prepared: PreparedData, limit: int = 4) -> list:
    """Fixed inputs for the logit check: the sample prompts and a few validation conversations."""
    chats = sample_prompts(recipe, prepared) + prepared.fixed_conversations(limit)
    return [tokenizer.apply_chat_template(c, return_tensors="pt", return_dict=True)["input_ids"] for c in chats]


def _logits(model, batches) -> list:
    import torch

    device = next(model.parameters()).device
    model.eval()
    with torch.no_grad():
        return [model(input_ids=ids.to(device), use_cache=False).logits.float().cpu()[0] for ids in batches]


def compare(reference: list, candidate: list, name: str) -> Agreement:
    diff = max(float((a - b).abs().max()) for a, b in zip(reference, candidate))
    same = sum(int((a.argmax(-1) == b.argmax(-1)).sum()) for a, b in zip(reference, candidate))
    total = sum(a.shape[0] for a in reference)
    return Agreement(reference=name, max_abs_logit_diff=diff, top1_agreement=same / total, positions=total)


def dequantized_nf4_weights(recipe: Recipe, where: Placement) -> dict:
    """name -> the weight as the 4-bit layers of training saw it (NF4 quantize-dequantize)."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    q_model = load_base_model(recipe, Placement(where.device, where.dtype, where.compute_dtype, qlora=True))
    weights = {
        f"{name}.weight": F.dequantize_4bit(module.weight.data, module.weight.quant_state).to(where.dtype).cpu()
        for name, module in q_model.named_modules()
        if isinstance(module, bnb.nn.Linear4bit)
    }
    del q_model
    return weights


def _write_generation_files(merged_dir: Path, model, tokenizer, eot: str) -> None:
    eot_id = tokenizer.convert_tokens_to_ids(eot)
    eos_ids = [eot_id] + ([tokenizer.eos_token_id] if tokenizer.eos_token_id not in (None, eot_id) else [])
    model.generation_config.eos_token_id = eos_ids if len(eos_ids) > 1 else eot_id
    if tokenizer.pad_token_id is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = eot_id
    tokenizer.eos_token = eot  # vLLM and llama.cpp stop at the tokenizer's EOS


def merge(recipe: Recipe) -> MergeResult:
    import torch
    from peft import PeftModel

    from llmtune.export.model_card import write_model_card

    run_dir = recipe.run_dir
    adapter_dir = trained_adapter(recipe)
    prepared = PreparedData.load(run_dir)
    configure_threads(recipe.training.num_threads)
    start = time.time()

    trained = placement_for(recipe)
    # Merge in the training dtype when that is 16/32-bit; never in 4-bit.
    full = Placement(trained.device, trained.dtype, trained.compute_dtype, qlora=False)
    roundtrip = recipe.merge.nf4_roundtrip if recipe.merge.nf4_roundtrip is not None else trained.qlora
    tokenizer = load_tokenizer(str(adapter_dir))
    base_bytes = model_bytes(resolve_base(recipe.model.base, recipe.model.revision))
    # The merged copy can be up to twice the base on disk (a bf16 checkpoint merged in fp32 on CPU).
    ensure_writable(run_dir, 2 * base_bytes + 2**20, "the merged model")
    batches = _prompt_batches(tokenizer, recipe, prepared)
    console.print(
        f"[bold]merge[/]: {recipe.model.base} + adapter in {str(full.dtype).removeprefix('torch.')}"
        f"{' after the NF4 round trip' if roundtrip else ''} ({'QLoRA' if trained.qlora else 'LoRA'} run)"
    )

    checks: list[Agreement] = []
    if trained.qlora:
        q_ref = PeftModel.from_pretrained(load_base_model(recipe, trained), str(adapter_dir))
        trained_logits = _logits(q_ref, batches)
        del q_ref

    base = load_base_model(recipe, full)
    if roundtrip:
        nf4 = dequantized_nf4_weights(recipe, full)
        with torch.no_grad():
            params = dict(base.named_parameters())
            for name, weight in nf4.items():
                params[name].copy_(weight)
    model = PeftModel.from_pretrained(base, str(adapter_dir))
    unmerged_logits = _logits(model, batches)
    model = model.merge_and_unload()
    merged_logits = _logits(model, batches)

    checks.append(compare(unmerged_logits, merged_logits, "same weights + adapter, unmerged"))
    if trained.qlora:
        checks.append(compare(trained_logits, merged_logits, "trained model (NF4 base + adapter)"))

    fp32 = full.dtype == torch.float32
    tol = {
        "max_abs_logit_diff": recipe.merge.max_abs_logit_diff or (1e-2 if fp32 else 0.5),
        "min_top1_agreement": recipe.merge.min_top1_agreement,
    }
    # The claim a merge must meet: it computes what base + adapter computes. For QLoRA with
    # the round trip, that is also the trained model; without it, the gap is reported only.
    binding = [c for c in checks if c.reference.startswith("same") or (roundtrip and c.reference.startswith("trained"))]
    for c in checks:
        console.print(
            f"  vs {c.reference}: max |logit diff| {c.max_abs_logit_diff:.2e}, top-1 agreement {c.top1_agreement:.4f}"
            f" over {c.positions} positions{'' if c in binding else ' (informational)'}"
        )

    merged_dir = RunDir(run_dir).merged
    staging = run_dir / ".merged-staging"
    shutil.rmtree(staging, ignore_errors=True)
    _write_generation_files(staging, model, tokenizer, prepared.end_of_turn)
    model.save_pretrained(str(staging), safe_serialization=True, max_shard_size=recipe.merge.max_shard_size)
    tokenizer.chat_template = prepared.chat_template
    tokenizer.save_pretrained(str(staging))
    result = MergeResult(
        merged_dir=merged_dir, dtype=str(full.dtype).removeprefix("torch."), nf4_roundtrip=roundtrip,
        checks=checks, tolerance=tol, seconds=time.time() - start,
    )
    (staging / "merge_report.json").write_text(json.dumps(result.to_json(), indent=2))
    failed = [c for c in binding if c.max_abs_logit_diff > tol["max_abs_logit_diff"] or c.top1_agreement < tol["min_top1_agreement"]]
    if failed:
        bad = failed[0]
        raise MergeError(
            f"the merged model disagrees with {bad.reference}: max |logit diff| {bad.max_abs_logit_diff:.3g} "
            f"(limit {tol['max_abs_logit_diff']}), top-1 agreement {bad.top1_agreement:.4f} (limit "
            f"{tol['min_top1_agreement']}); merged/ was not written (inspect {staging}); serve the adapter instead, "
            "or loosen merge.max_abs_logit_diff / merge.min_top1_agreement if 16-bit rounding explains it"
        )
    shutil.rmtree(merged_dir, ignore_errors=True)
    staging.rename(merged_dir)
    write_model_card(recipe, merged_dir, result)
    console.print(f"  merged model: {merged_dir} ({result.seconds:.0f}s)")
    return result
