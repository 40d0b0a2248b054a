"""The preference stage: DPO, KTO, ORPO or SimPO with TRL's own trainers, LoRA/QLoRA, after `train`.

Entry point: `train_preference(recipe, prepared=None, resume=False) -> PreferenceResult`. Read it
top to bottom: pick device and dtype, load the base, put the SFT adapter under it (or not), let
TRL add the preference LoRA, train on the pairs `prepare` tokenized, with atomic checkpoints, and
write the run's final adapter.

Where the preference LoRA sits (`preference.start_from`):

- `sft`, LoRA: the SFT adapter is merged into the base in memory, so the model *is* the SFT model;
  TRL puts a fresh LoRA on it. DPO/KTO's reference is that model with the new adapter disabled:
  the same weights, no second copy. The run's adapter/ is then one adapter equal to SFT +
  preference exactly (PEFT's `cat` combination, rank = the two ranks added), so merge, export
  and serve take it as they take any adapter; the SFT adapter moves to sft_adapter/ and the
  preference LoRA alone is in preference/adapter/.
- `sft`, QLoRA: a 4-bit base cannot take the merged SFT adapter without losing it to
  re-quantization, so the SFT adapter itself keeps training; DPO/KTO's reference is TRL's frozen
  copy of it (the `ref` adapter: a few MB, never the base weights).
- `base`: a fresh LoRA on the base; the reference is the base (adapter disabled).

ORPO and SimPO have no reference model.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from llmtune.config import Recipe
from llmtune.console import console
from llmtune.artifacts import ADAPTER_MARKER, PreparedData, PreparedPreference, RunDir, adapter_origin
from llmtune.distributed import configure_threads
from llmtune.errors import LlmtuneError
from llmtune.models import load_base_model, load_tokenizer, placement_for, resolve_base
from llmtune.storage import ensure_writable

@dataclass
class PreferenceResult:
    run_dir: Path
    adapter_dir: Path  # the run's final adapter (what eval, merge, export and serve use)
    preference_adapter_dir: Path  # the preference LoRA alone
    before_adapter_dir: Path | None  # the SFT adapter the stage started from (None: from the base)
    metrics: Path
    curve: Path
    global_step: int
    final_eval: dict
    train_seconds: float


def sft_adapter_dir(recipe: Recipe) -> Path:
    """The SFT adapter the stage builds on: adapter/ as `train` wrote it, kept as sft_adapter/ once the
    preference stage has replaced adapter/ (so a second preference run starts from SFT again)."""
    run_dir = recipe.run_dir
    adapter, kept = RunDir(run_dir).adapter, RunDir(run_dir).sft_adapter
    if adapter_origin(run_dir) is None:
        if not (adapter / "adapter_config.json").exists():
            raise LlmtuneError(
                f"preference.start_from=sft needs the SFT adapter in {adapter}; run the train stage first "
                f"(llmtune train {recipe.source_path}) or set preference.start_from=base"
            )
        staging = run_dir / ".sft_adapter-staging"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(adapter, staging)
        shutil.rmtree(kept, ignore_errors=True)
        staging.rename(kept)
    if not (kept / "adapter_config.json").exists():
        raise LlmtuneError(f"{adapter} was written by the preference stage but the SFT adapter it started from is "
                           f"missing ({kept}); run the train stage again")
    return kept


def _trainer_classes(method: str):
    """(TRL trainer, its config) for `method`, the trainer given llmtune's atomic checkpoints and
    taught to take rows `prepare` already tokenized with the run's template and masks."""
    from llmtune.train.sft import _make_trainer_class

    if method == "dpo":
        from trl import DPOConfig as Config, DPOTrainer as Trainer
    elif method == "kto":
        from trl import KTOConfig as Config, KTOTrainer as Trainer
    elif method == "orpo":
        from trl.experimental.orpo import ORPOConfig as Config, ORPOTrainer as Trainer
    else:
        from trl.experimental.cpo import CPOConfig as Config, CPOTrainer as Trainer

    class PreferenceTrainer(_make_trainer_class(Trainer)):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):  # DPOTrainer, KTOTrainer
            if "prompt_ids" not in dataset.column_names:
                return super()._prepare_dataset(dataset, processing_class, args, dataset_name)
            if getattr(self, "calculate_KL", False):
                # As KTOTrainer._prepare_dataset: the KL term's mismatched completions, each batch's
                # completions rotated by one against its prompts.
                def add_kl(batch):
                    batch["KL_completion_ids"] = [batch["completion_ids"][-1]] + batch["completion_ids"][:-1]
                    return batch

                dataset = dataset.map(add_kl, batched=True, batch_size=args.per_device_train_batch_size)
            return dataset

        def tokenize_row(self, feature, model=None):  # ORPOTrainer, CPOTrainer
            if "prompt_ids" not in feature:
                return super().tokenize_row(feature, model)
            row = {"prompt_input_ids": feature["prompt_ids"], "prompt_attention_mask": [1] * len(feature["prompt_ids"])}
            for side in ("chosen", "rejected"):
                ids = feature["prompt_ids"] + feature[f"{side}_ids"]
                row[f"{side}_input_ids"] = ids
                row[f"{side}_attention_mask"] = [1] * len(ids)
                row[f"{side}_labels"] = [-100] * len(feature["prompt_ids"]) + feature[f"{side}_ids"]
            return row

    return PreferenceTrainer, Config


def _method_args(recipe: Recipe) -> dict:
    p = recipe.preference
    if p.method == "dpo":
        return {"beta": p.beta, "loss_type": [p.dpo_loss], "precompute_ref_log_probs": p.precompute_reference,
                "max_length": recipe.data.max_seq_length}
    if p.method == "kto":
        return {"beta": p.beta, "desirable_weight": p.desirable_weight, "undesirable_weight": p.undesirable_weight,
                "precompute_ref_log_probs": p.precompute_reference, "max_length": recipe.data.max_seq_length}
    if p.method == "orpo":
        return {"beta": p.beta, "max_length": recipe.data.max_seq_length}
    # SimPO = CPO with loss_type simpo and no behaviour-cloning term (TRL's AlphaPO/SimPO recipe).
    return {"beta": p.beta, "loss_type": "simpo", "cpo_alpha": 0.0, "simpo_gamma": p.simpo_gamma,
            "max_length": recipe.data.max_seq_length}


def resolve_checkpointing(recipe: Recipe, device: str) -> tuple[bool, str]:
    """training.gradient_checkpointing for this stage's batches (chosen + rejected, padded)."""
    from llmtune.estimate.memory import checkpointing_decision
    from llmtune.train.sft import memory_for_training

    setting = recipe.training.gradient_checkpointing
    if setting != "auto":
        return bool(setting), "on" if setting else "off"
    return checkpointing_decision(recipe, "cuda" if device == "cuda" else "cpu", memory_for_training(device), "preference")


def combine_adapters(model, sft_dir: Path, out: Path) -> None:
    """Write one adapter equal to the SFT adapter plus the preference LoRA trained on top of it.

    The preference LoRA was trained on W + ΔW_sft (merged), so W + ΔW_sft + ΔW_pref is the model;
    PEFT's `cat` combination stacks both adapters' A and B matrices (rank r_sft + r_pref), which
    computes exactly that sum."""
    model.load_adapter(str(sft_dir), adapter_name="sft")
    model.add_weighted_adapter(["sft", "default"], [1.0, 1.0], "combined", combination_type="cat")
    model.save_pretrained(str(out), selected_adapters=["combined"])
    nested = out / "combined"  # PEFT writes a non-default adapter into a subfolder
    for f in nested.iterdir():
        f.rename(out / f.name)
    nested.rmdir()
    model.delete_adapter("combined")
    model.delete_adapter("sft")
    model.set_adapter("default")


def train_preference(recipe: Recipe, prepared: PreparedPreference | None = None, resume: bool = False) -> PreferenceResult:
    import torch
    from datasets import load_from_disk
    from peft import LoraConfig, PeftModel, prepare_model_for_kbit_training
    from transformers import PrinterCallback
    from transformers.trainer_utils import get_last_checkpoint

    from llmtune.artifacts import read_metrics
    from llmtune.lora_dropout import use_masked_dropout
    from llmtune.plots import plot_preference_curve
    from llmtune.train.chunked_loss import chunk_rows_for, use_chunked_loss
    from llmtune.train.sft import callbacks, trainer_arguments

    pcfg, tcfg = recipe.preference, recipe.training
    if pcfg is None:
        raise LlmtuneError(f"{recipe.source_path}: the preference stage needs a `preference:` section (docs/preference.md)")
    run_dir = recipe.run_dir
    prepared = prepared or PreparedPreference.load(run_dir)
    if prepared.method != pcfg.method:
        raise LlmtuneError(f"the preference data in {prepared.data_dir} was prepared for method {prepared.method}, the "
                           f"recipe says {pcfg.method}; run `llmtune prepare {recipe.source_path}` again")
    sft_data = PreparedData.load(run_dir)
    run = RunDir(run_dir)
    stage_dir = run.preference
    ckpt_dir, metrics_path = stage_dir / "checkpoints", run.preference_metrics

    last_ckpt = get_last_checkpoint(str(ckpt_dir)) if ckpt_dir.is_dir() else None
    if resume and last_ckpt is None:
        console.print(f"[yellow]--resume[/]: no complete checkpoint in {ckpt_dir}; starting from step 0")
    if not resume:
        if last_ckpt is not None:
            console.print(f"starting fresh: removing earlier checkpoints in {ckpt_dir} (use --resume to continue from them)")
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        metrics_path.unlink(missing_ok=True)
        (stage_dir / "samples.jsonl").unlink(missing_ok=True)
    stage_dir.mkdir(parents=True, exist_ok=True)

    # 1. Device, dtype, threads: the same choices as `train` (models.placement_for).
    threads = configure_threads(tcfg.num_threads)
    where = placement_for(recipe)
    device, dtype, compute_dtype, qlora = where.device, where.dtype, where.compute_dtype, where.qlora
    torch.manual_seed(tcfg.seed)

    # 2. Base model and tokenizer with the template the data was rendered with; the SFT adapter under it.
    tokenizer = load_tokenizer(resolve_base(recipe.model.base, recipe.model.revision), recipe.model.revision)
    tokenizer.chat_template = sft_data.chat_template
    model = load_base_model(recipe, where)
    model.config.use_cache = False
    checkpointing, checkpointing_why = resolve_checkpointing(recipe, device)
    if qlora:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing)
    lora = LoraConfig(r=recipe.lora.rank, lora_alpha=recipe.lora.alpha, lora_dropout=recipe.lora.dropout,
                      target_modules=recipe.lora.target_modules, bias="none", task_type="CAUSAL_LM")
    sft_dir = sft_adapter_dir(recipe) if pcfg.start_from == "sft" else None
    peft_config = lora
    if sft_dir is not None and not qlora:
        model = PeftModel.from_pretrained(model, str(sft_dir)).merge_and_unload()
        where_lora = f"a new LoRA on the SFT model ({sft_dir.name} merged in memory)"
    elif sft_dir is not None:
        model = PeftModel.from_pretrained(model, str(sft_dir), is_trainable=True)
        peft_config = None  # the SFT adapter keeps training; TRL adds its frozen `ref` copy for DPO/KTO
        where_lora = f"the SFT adapter ({sft_dir.name}) trained further on the 4-bit base"
    else:
        where_lora = "a new LoRA on the base model"
    reference = ("none (reference-free)" if pcfg.method not in ("dpo", "kto")
                 else "a frozen copy of the SFT adapter" if peft_config is None else
                 "the same weights with the preference adapter disabled")

    # 3. Data: tokenized, masked and truncated by prepare.
    train_ds = load_from_disk(str(prepared.train_tokenized))
    val_ds = load_from_disk(str(prepared.val_tokenized)) if prepared.counts.val else None
    c = prepared.counts
    console.print(
        f"[bold]preference[/] ({pcfg.method}, beta {pcfg.beta}): {recipe.model.base} on {device} ({threads} threads), "
        f"{str(dtype).removeprefix('torch.')}{', QLoRA NF4 base' if qlora else ''}; {where_lora}; reference: {reference}"
    )
    if where.precision:
        console.print(f"  precision: {where.precision}")
    console.print(f"  data: {len(train_ds)} training rows from {c.train} examples ({c.pairs} pairs in all), "
                  f"{len(val_ds) if val_ds is not None else 0} held out; longest {c.max_tokens} tokens; "
                  f"gradient checkpointing: {checkpointing_why}")

    # 4. Trainer: TRL's, with the run's hyper-parameters.
    trainer_cls, config_cls = _trainer_classes(pcfg.method)
    args = config_cls(
        **trainer_arguments(pcfg, tcfg, output_dir=ckpt_dir, device=device, dtype=dtype, checkpointing=checkpointing,
                            has_val=val_ds is not None, autocast=where.autocast),
        remove_unused_columns=False,  # the rows hold exactly what the trainer reads, plus `length`
        # Pairs of similar length share a batch (less padding); KTO keeps TRL's order for its KL pairs.
        **({"train_sampling_strategy": "group_by_length"} if pcfg.method != "kto" else {}),
        **_method_args(recipe),
    )
    trainer = trainer_cls(model=model, args=args, train_dataset=train_ds, eval_dataset=val_ds, processing_class=tokenizer,
                          callbacks=callbacks(recipe, sft_data, tokenizer, metrics_path, stage_dir / "samples.jsonl",
                                              run.tensorboard / "preference", label=pcfg.method),
                          peft_config=peft_config)
    trainer.remove_callback(PrinterCallback)
    if device == "cpu" and tcfg.masked_dropout:
        use_masked_dropout(trainer.model)  # TRL wrapped the model in the preference LoRA just now
    if tcfg.chunked_loss and pcfg.method in ("dpo", "kto"):
        # Policy and reference log-probs of the reply tokens only, a block of rows at a time (TRL's CPU
        # path scores every position); ORPO/CPO compute full logits their own way.
        why_not = use_chunked_loss(trainer.model)
        console.print(f"  log-probs: chunked over reply tokens ({chunk_rows_for(model.get_output_embeddings().weight.shape[0])} "
                      "rows per block)" if why_not is None else f"  log-probs: TRL's LM head (chunked loss off: {why_not})")
    if qlora and (compute_dtype == torch.float32 or where.autocast is not None):
        # TRL casts QLoRA adapters to bf16 (the paper's GPU recipe); on CPUs that runs at a fraction of fp32.
        # An SFT adapter trained further gets its exact fp32 weights back from TRL's frozen `ref` copy of it.
        for name, p in trainer.model.named_parameters():
            if p.requires_grad:
                ref = name.replace(".default.", ".ref.")
                p.data = (trainer.model.get_parameter(ref).data.clone() if ref != name and "ref" in
                          getattr(trainer.model, "peft_config", {}) else p.data).float()
    trainable, total = trainer.model.get_nb_trainable_parameters()
    console.print(f"  trainable {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%)")
    # Adapter + AdamW moments in fp32 per checkpoint, kept save_total_limit (+1 while rotating) times, and adapters.
    ensure_writable(ckpt_dir, (pcfg.save_total_limit + 4) * trainable * 4 * 4 + 2**20, "preference checkpoints and the adapters")

    # 5. Train (from the last complete checkpoint with --resume).
    start = time.time()
    trainer.train(resume_from_checkpoint=last_ckpt if resume else None)
    seconds = time.time() - start
    final_eval: dict = {}
    if val_ds is not None:
        evals = [h for h in trainer.state.log_history if "eval_loss" in h]
        at_end = evals and evals[-1]["step"] == trainer.state.global_step
        final_eval = evals[-1] if at_end else trainer.evaluate()

    # 6. Adapters: the preference LoRA alone, and the run's adapter/ (atomic, with the training template).
    pref_dir = run.preference_adapter
    adapter_dir = run.adapter
    if trainer.args.should_save:
        peft_model = trainer.model
        staging = run_dir / ".preference-adapter-staging"
        shutil.rmtree(staging, ignore_errors=True)
        peft_model.save_pretrained(str(staging), selected_adapters=["default"])
        tokenizer.save_pretrained(str(staging))
        shutil.rmtree(pref_dir, ignore_errors=True)
        staging.rename(pref_dir)

        staging = run_dir / ".adapter-staging"
        shutil.rmtree(staging, ignore_errors=True)
        if sft_dir is not None and peft_config is not None:
            combine_adapters(peft_model, sft_dir, staging)
        else:
            shutil.copytree(pref_dir, staging)
        tokenizer.save_pretrained(str(staging))
        marker = {"stage": "preference", "method": pcfg.method, "start_from": pcfg.start_from,
                  "before": sft_dir.name if sft_dir is not None else None,
                  "preference_adapter": str(pref_dir.relative_to(run_dir)),
                  "combined": sft_dir is not None and peft_config is not None}
        (staging / ADAPTER_MARKER).write_text(json.dumps(marker, indent=2))
        shutil.rmtree(adapter_dir, ignore_errors=True)
        staging.rename(adapter_dir)
    curve = plot_preference_curve(read_metrics(metrics_path), run.preference_curve, pcfg.method)
    shown = {k.removeprefix("eval_"): v for k, v in final_eval.items()
             if k in ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins")}
    console.print(f"  trained {trainer.state.global_step} steps in {seconds:.0f}s"
                  + "".join(f"; held-out {k} {v:.4f}" for k, v in shown.items()) + f"; adapter: {adapter_dir}")
    return PreferenceResult(run_dir=run_dir, adapter_dir=adapter_dir, preference_adapter_dir=pref_dir,
                            before_adapter_dir=sft_dir, metrics=metrics_path, curve=curve,
                            global_step=trainer.state.global_step, final_eval=final_eval, train_seconds=seconds)
