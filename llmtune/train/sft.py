"""The train stage: LoRA / QLoRA supervised fine-tuning with TRL's SFTTrainer and PEFT.

Entry point: `train(recipe, prepared=None, resume=False) -> TrainResult`. Read it top to
bottom: pick device and dtype, `load_model` (the base, 4-bit for QLoRA, wrapped with LoRA),
build the trainer from `sft_config(recipe, ...)` and `callbacks` on the pre-tokenized,
pre-masked splits from `prepare`, train with atomic checkpoints, `save_adapter` (and the loss
curve).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path


from llmtune.console import console
from llmtune.config import Recipe
from llmtune.artifacts import PreparedData, RunDir, sample_prompts
from llmtune.distributed import DistributedError, RankGroup, configure_threads, fsdp_enabled, join_group, local_world_size
from llmtune.storage import ensure_writable
from llmtune.models import load_base_model, load_tokenizer, placement_for, resolve_base



@dataclass
class TrainResult:
    run_dir: Path
    adapter_dir: Path
    metrics: Path
    loss_curve: Path
    global_step: int
    final_eval_loss: float | None
    train_seconds: float


def memory_for_training(device: str) -> int:
    """Bytes this process may plan for: the GPU's memory, or the machine's RAM shared among the
    processes on it (LOCAL_WORLD_SIZE under torchrun / accelerate). Totals, not what is free right
    now, so every rank of a multi-process run makes the same decision."""
    import torch

    if device == "cuda":
        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return total // local_world_size()


def resolve_checkpointing(recipe: Recipe, device: str, group: RankGroup | None = None) -> tuple[bool, str]:
    """training.gradient_checkpointing as a bool, and how it was decided (printed at start). Across
    ranks the smallest memory decides, so every rank (every node, however equipped) decides the same."""
    setting = recipe.training.gradient_checkpointing
    if setting != "auto":
        return bool(setting), "on" if setting else "off"
    from llmtune.estimate.memory import checkpointing_decision

    memory = min((group or RankGroup()).gather(memory_for_training(device)))
    return checkpointing_decision(recipe, "cuda" if device == "cuda" else "cpu", memory)


def trainable_checksum(model) -> str:
    """sha256 over every trainable parameter, in name order: equal on every rank when DDP kept them in sync."""
    import hashlib

    digest = hashlib.sha256()
    for name, p in sorted((n, p) for n, p in model.named_parameters() if p.requires_grad):
        digest.update(name.encode())
        digest.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def check_ranks_in_sync(trainer, group: RankGroup, run_dir: Path) -> None:
    """After training on several ranks: every rank holds the same adapter (DDP, ZeRO-1/2), recorded in
    ranks.json by rank 0; a rank that drifted is an error. Sharded engines hold different shards by design."""
    import json

    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    sharded = trainer.is_fsdp_enabled or (plugin is not None and plugin.zero_stage == 3)
    checksum = None if sharded else trainable_checksum(trainer.model)
    ranks = group.gather({"rank": group.rank, "node": group.node_rank, "host": group.host, "adapter_sha256": checksum})
    identical = None if sharded else len({r["adapter_sha256"] for r in ranks}) == 1
    if group.is_main:
        (run_dir / "ranks.json").write_text(json.dumps(
            {"world_size": group.world_size, "sharded": sharded, "identical": identical, "ranks": ranks}, indent=2))
    if identical is False:
        odd = [f"rank {r['rank']} on node {r['node']} ({r['host']})" for r in ranks
               if r["adapter_sha256"] != ranks[0]["adapter_sha256"]]
        raise DistributedError(f"the trained adapter differs between ranks ({', '.join(odd)} vs rank 0); see {run_dir / 'ranks.json'}")
    if identical:
        console.print(f"  all {group.world_size} ranks hold the same adapter (sha256 {checksum[:12]})")


def packing_is_isolated(model) -> bool:
    """Whether this model keeps packed sequences apart given only per-sequence position ids.

    transformers builds a block-diagonal mask from position ids (when there is no attention
    mask and no KV cache); architectures that bypass that path would attend across sequences.
    Checked on two short sequences: their logits alone and packed must agree."""
    import torch

    device = next(model.parameters()).device
    a = torch.tensor([[5, 6, 7, 8, 9]], device=device)
    b = torch.tensor([[11, 12, 13]], device=device)
    with torch.no_grad():
        alone = model(input_ids=b, use_cache=False).logits.float()
        packed = model(
            input_ids=torch.cat([a, b], 1), position_ids=torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2]], device=device),
            use_cache=False,
        ).logits.float()
    return bool(torch.allclose(packed[:, 5:], alone, atol=1e-2, rtol=1e-2))


def _make_trainer_class(base=None):
    """`base` (TRL's SFTTrainer unless given: the preference stage passes DPO/KTO/ORPO/CPO trainers)
    with atomic checkpoints."""
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints
    from trl import SFTTrainer

    class AtomicCheckpointSFTTrainer(base or SFTTrainer):
        """A TRL trainer whose checkpoints appear complete or not at all.

        The Trainer writes a checkpoint file by file; a kill in between leaves a directory that
        `get_last_checkpoint` would pick up. Here it is written under `.staging/` and renamed
        into place once every file (weights, optimizer, RNG, trainer state) is on disk, from every
        rank on every node: only global rank 0 renames, after all ranks have synced their files.
        """

        _staging: str | None = None

        def _get_output_dir(self, trial):
            return self._staging or super()._get_output_dir(trial)

        def _save_checkpoint(self, model, trial):
            final_parent = self.args.output_dir
            self._staging = os.path.join(final_parent, ".staging")
            if self.args.should_save:
                shutil.rmtree(self._staging, ignore_errors=True)
            self.accelerator.wait_for_everyone()
            try:
                super()._save_checkpoint(model, trial)
            finally:
                staging, self._staging = self._staging, None
            name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            # Every rank flushes what it wrote (its RNG state, FSDP shards) before rank 0 may publish, so on
            # shared storage no node can see a named checkpoint with a file still in flight.
            for root, _, files in os.walk(os.path.join(staging, name)):
                for fname in files:
                    with open(os.path.join(root, fname), "rb") as f:
                        os.fsync(f.fileno())
            self.accelerator.wait_for_everyone()
            if self.args.should_save:
                target = os.path.join(final_parent, name)
                if os.path.exists(target):  # re-saving a step after resume
                    shutil.rmtree(target)
                os.rename(os.path.join(staging, name), target)
                shutil.rmtree(staging, ignore_errors=True)
                rotate_checkpoints(output_dir=final_parent, save_total_limit=self.args.save_total_limit, use_mtime=False)
            self.accelerator.wait_for_everyone()

    return AtomicCheckpointSFTTrainer


def trainer_arguments(section, training, *, output_dir: Path, device: str, dtype, checkpointing: bool,
                      has_val: bool, autocast=None) -> dict:
    """The TrainingArguments every llmtune trainer shares: steps, batches and schedule from `section`
    (recipe.training, or recipe.preference for the preference stage), the optimizer and seed from
    `training`, precision from the device and dtype train decided (`autocast`: torch.bfloat16 where
    llmtune.hardware measured bf16 autocast faster on this CPU, else None)."""
    import torch

    return dict(
        output_dir=str(output_dir),
        max_steps=section.max_steps,
        num_train_epochs=section.epochs,
        per_device_train_batch_size=section.micro_batch_size,
        per_device_eval_batch_size=section.micro_batch_size,
        gradient_accumulation_steps=section.gradient_accumulation_steps,
        learning_rate=section.learning_rate,
        lr_scheduler_type=section.lr_scheduler,
        warmup_steps=section.warmup_ratio,  # transformers reads values < 1 as a ratio of total steps
        weight_decay=training.weight_decay,
        max_grad_norm=training.max_grad_norm,
        optim=training.optim,
        gradient_checkpointing=checkpointing,
        seed=training.seed,
        data_seed=training.seed,
        # On a CPU, bf16=True is torch.autocast over fp32 weights (autocast, measured per machine).
        bf16=(device == "cuda" and dtype == torch.bfloat16) or autocast == torch.bfloat16,
        fp16=device == "cuda" and dtype == torch.float16,
        use_cpu=device == "cpu",
        # NCCL needs GPUs; gloo runs DDP across CPU processes (set only when launched distributed).
        ddp_backend="gloo" if device == "cpu" and int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        ddp_find_unused_parameters=False,
        logging_steps=section.logging_steps,
        eval_strategy="steps" if has_val else "no",
        eval_steps=section.eval_steps,
        save_strategy="steps",
        save_steps=section.save_steps,
        save_total_limit=section.save_total_limit,
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )


def sft_config(recipe: Recipe, *, output_dir: Path, device: str, dtype, checkpointing: bool, packing: bool,
               has_val: bool, autocast=None):
    """TRL's SFTConfig for `recipe`: a pure mapping of recipe keys (plus what train decided: device,
    dtype, checkpointing, packing, whether there is a validation split) to trainer arguments."""
    from trl import SFTConfig

    tcfg = recipe.training
    return SFTConfig(
        **trainer_arguments(tcfg, tcfg, output_dir=output_dir, device=device, dtype=dtype, checkpointing=checkpointing,
                            has_val=has_val, autocast=autocast),
        max_length=recipe.data.max_seq_length,
        packing=packing,
        packing_strategy="bfd",
        # Packing leaves no padding to save; otherwise similar lengths share a batch.
        train_sampling_strategy="group_by_length" if tcfg.group_by_length and not packing else "random",
        remove_unused_columns=True,
    )


@dataclass
class LoadedModel:
    model: object  # the PEFT model, ready to train
    tokenizer: object
    packing: bool  # training.packing, unless this model cannot keep packed sequences apart
    packed_attention: bool
    checkpointing: bool
    checkpointing_why: str


def load_model(recipe: Recipe, prepared: PreparedData, where, group: RankGroup) -> LoadedModel:
    """The base (4-bit NF4 for QLoRA) with the LoRA adapter, and the tokenizer with the template the
    data was rendered with; packing and checkpointing decided for this model and machine."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from llmtune.lora_dropout import use_masked_dropout
    from llmtune.train.packed_attention import use_packed_attention

    cfg = recipe
    tokenizer = load_tokenizer(resolve_base(cfg.model.base, cfg.model.revision), cfg.model.revision)
    tokenizer.chat_template = prepared.chat_template
    model = load_base_model(recipe, where)
    model.config.use_cache = False  # a KV cache in training would also defeat packed-sequence masking
    packing = cfg.training.packing
    if packing and not packing_is_isolated(model):
        console.print("[yellow]warning[/]: this model attends across packed sequences; training without packing")
        packing = False
    # Packed micro-batches arrive as one flattened row; attend within each conversation, not over all of it.
    packed_attention = packing and use_packed_attention(model)
    checkpointing, checkpointing_why = resolve_checkpointing(recipe, where.device, group)
    if where.qlora and fsdp_enabled():
        model.enable_input_require_grads()  # FSDP flattens same-dtype params: no fp32 upcast of norms/embeddings
    elif where.qlora:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing)

    lora = LoraConfig(
        r=cfg.lora.rank,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=cfg.lora.target_modules,
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    if where.device == "cpu" and cfg.training.masked_dropout and use_masked_dropout(model):
        console.print(f"  LoRA dropout {cfg.lora.dropout}: masks drawn as 16-bit lanes (training.masked_dropout)")
    return LoadedModel(model, tokenizer, packing, packed_attention, checkpointing, checkpointing_why)


def callbacks(recipe: Recipe, prepared: PreparedData, tokenizer, metrics: Path, samples: Path, tensorboard_dir: Path,
              label: str | None = None) -> list:
    """metrics.jsonl, sample replies to the recipe's prompts at every eval, the progress bar, TensorBoard."""
    from transformers.integrations import TensorBoardCallback

    from llmtune.train.callbacks import MetricsFile, RichProgress, SampleReplies

    tensorboard = TensorBoardCallback()
    tensorboard.logging_dir = str(tensorboard_dir)  # else it re-opens under checkpoints/runs/ after train
    return [
        MetricsFile(metrics),
        SampleReplies(tokenizer, sample_prompts(recipe, prepared), recipe.eval.max_new_tokens, prepared.end_of_turn, samples),
        RichProgress(**({"label": label} if label else {})),
        tensorboard,
    ]


def save_adapter(trainer, tokenizer, run: RunDir) -> Path:
    """adapter/ (atomic, loads with PeftModel.from_pretrained) with the tokenizer carrying the training
    template, and the loss curve; on the rank that saves."""
    from llmtune.artifacts import read_metrics
    from llmtune.plots import plot_loss_curve

    if trainer.args.should_save:
        staging = run.root / ".adapter-staging"
        shutil.rmtree(staging, ignore_errors=True)
        trainer.model.save_pretrained(str(staging))
        tokenizer.save_pretrained(str(staging))
        shutil.rmtree(run.adapter, ignore_errors=True)
        staging.rename(run.adapter)
        plot_loss_curve(read_metrics(run.metrics), run.loss_curve)
    return run.adapter


def train(recipe: Recipe, prepared: PreparedData | None = None, resume: bool = False) -> TrainResult:
    import torch
    from datasets import load_from_disk
    from transformers import PrinterCallback
    from transformers.trainer_utils import get_last_checkpoint

    from llmtune.train.chunked_loss import chunk_rows_for, use_chunked_loss

    run_dir = recipe.run_dir
    run = RunDir(run_dir)
    prepared = prepared or PreparedData.load(run_dir)
    cfg, tcfg = recipe, recipe.training
    ckpt_dir = run.checkpoints
    metrics_path = run.metrics

    # 1. Device, dtype, threads: bf16 on GPUs that have it; on CPUs fp32 weights, with bf16 autocast where a
    # per-machine probe measured it faster (models.placement_for, llmtune/hardware.py). Launched on several
    # ranks: join them (the Trainer reuses the process group), check they run one recipe, take rank 0's precision.
    threads = configure_threads(tcfg.num_threads)
    where = placement_for(recipe)
    group = join_group(cpu=where.device == "cpu")
    group.check_recipe(recipe)
    if group.distributed:
        where = dataclasses.replace(where, **group.gather({"autocast": where.autocast, "compute_dtype": where.compute_dtype, "precision": where.precision})[0])
    device, dtype, compute_dtype, qlora = where.device, where.dtype, where.compute_dtype, where.qlora
    torch.manual_seed(tcfg.seed)

    # Every rank resumes from the same complete checkpoint, and only rank 0 clears a fresh run's files.
    last_ckpt = group.agree(
        f"the last complete checkpoint in {ckpt_dir}", get_last_checkpoint(str(ckpt_dir)) if ckpt_dir.is_dir() else None,
        hint="output.dir must be on storage that every node shares",
    )
    if resume and last_ckpt is None:
        console.print(f"[yellow]--resume[/]: no complete checkpoint in {ckpt_dir}; starting from step 0")
    if not resume and group.is_main:
        if last_ckpt is not None:
            console.print(f"starting fresh: removing earlier checkpoints in {ckpt_dir} (use --resume to continue from them)")
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        metrics_path.unlink(missing_ok=True)
        run.samples.unlink(missing_ok=True)
    group.barrier()

    # 2. Base model (4-bit NF4 for QLoRA) with the LoRA adapter, and the tokenizer.
    loaded = load_model(recipe, prepared, where, group)
    model, tokenizer, packing = loaded.model, loaded.tokenizer, loaded.packing
    trainable, total = model.get_nb_trainable_parameters()
    # Adapter + AdamW moments in fp32 per checkpoint, kept save_total_limit (+1 while rotating) times.
    ensure_writable(ckpt_dir, (tcfg.save_total_limit + 2) * trainable * 4 * 4 + 2**20, "checkpoints and the adapter")
    if group.distributed:
        console.print(f"[bold]train[/]: {group.name}, {group.world_size} ranks in all")
    console.print(
        f"[bold]train[/]: {cfg.model.base} on {device} ({threads} threads), {str(dtype).removeprefix('torch.')}"
        f"{', QLoRA NF4 base, compute ' + str(compute_dtype).removeprefix('torch.') if qlora else ', LoRA'}; "
        f"trainable {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%)"
    )

    # 3. Data: already tokenized and masked by prepare (labels are -100 off the trained turns).
    train_ds = load_from_disk(str(prepared.train_tokenized))
    val_ds = load_from_disk(str(prepared.val_tokenized)) if prepared.counts.val else None
    console.print(
        f"  data: {len(train_ds)} train / {len(val_ds) if val_ds is not None else 0} val conversations, "
        f"longest {prepared.counts.max_tokens} tokens, max_seq_length {cfg.data.max_seq_length}"
        f"{', packed padding-free' if packing else ''}{', per-conversation attention' if loaded.packed_attention else ''}"
        f"{', length-grouped batches' if not packing and tcfg.group_by_length else ''}"
    )
    console.print(f"  gradient checkpointing: {loaded.checkpointing_why}")
    if where.precision:
        console.print(f"  precision: {where.precision}")

    # 4. Trainer: the recipe's arguments, atomic checkpoints, llmtune's callbacks.
    args = sft_config(recipe, output_dir=ckpt_dir, device=device, dtype=dtype, checkpointing=loaded.checkpointing,
                      packing=packing, has_val=val_ds is not None, autocast=where.autocast)
    trainer = _make_trainer_class()(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=val_ds,
        processing_class=tokenizer,
        callbacks=callbacks(recipe, prepared, tokenizer, run.metrics, run.samples, run.tensorboard),
    )
    trainer.remove_callback(PrinterCallback)  # RichProgress shows the same numbers
    if tcfg.chunked_loss:
        why_not = use_chunked_loss(trainer.model)
        console.print(
            f"  loss: chunked over loss-bearing tokens ({chunk_rows_for(model.get_output_embeddings().weight.shape[0])} rows per block)"
            if why_not is None
            else f"  loss: TRL's LM-head loss (chunked loss off: {why_not})"
        )
    if qlora and (compute_dtype == torch.float32 or where.autocast is not None):
        # TRL casts QLoRA adapter weights to bf16 (the paper's GPU recipe); on a CPU keep them fp32: in fp32
        # compute bf16 would run at a fraction of the speed, and under autocast they are the fp32 master weights.
        for p in trainer.model.parameters():
            if p.requires_grad:
                p.data = p.data.float()

    # 5. Train (from the last complete checkpoint with --resume).
    start = time.time()
    trainer.train(resume_from_checkpoint=last_ckpt if resume else None)
    seconds = time.time() - start
    final_eval = None
    if val_ds is not None:
        evals = [h for h in trainer.state.log_history if "eval_loss" in h]
        at_end = evals and evals[-1]["step"] == trainer.state.global_step
        final_eval = evals[-1]["eval_loss"] if at_end else trainer.evaluate()["eval_loss"]

    # 6. Save: the adapter and the loss curve; on several ranks, check they hold the same adapter.
    adapter_dir = save_adapter(trainer, tokenizer, run)
    if group.distributed:
        check_ranks_in_sync(trainer, group, run_dir)
    console.print(
        f"  trained {trainer.state.global_step} steps in {seconds:.0f}s"
        + (f"; final eval loss {final_eval:.4f}" if final_eval is not None else "")
        + f"; adapter: {adapter_dir}"
    )
    return TrainResult(
        run_dir=run_dir,
        adapter_dir=adapter_dir,
        metrics=metrics_path,
        loss_curve=run.loss_curve,
        global_step=trainer.state.global_step,
        final_eval_loss=final_eval,
        train_seconds=seconds,
    )
