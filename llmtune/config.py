"""The recipe schema: one pydantic model per stage section, loaded from YAML with overrides.

A recipe is the single source of truth for a run. Every key here is a recipe key, a
``section.key=value`` override on the command line, and a row in docs/recipes.md.
This module imports nothing heavy so that a bad recipe fails in well under a second.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, field_validator, model_validator

from llmtune.errors import RecipeError
from llmtune.moderation.policy import ModerationConfig
from llmtune.schema import MaxSteps, Output, RecipeFile, Section, load_yaml_model

STAGES = ("prepare", "train", "preference", "eval", "merge", "export")
Stage = Literal["prepare", "train", "preference", "eval", "merge", "export"]


class ModelConfig(Section):
    base: str = Field(
        "embedded:smollm2-135m-instruct",
        description="Base model: an `embedded:` name, a local directory, or a Hugging Face hub id.",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) for hub ids.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Weights/compute dtype. `auto`: float32 weights on CPUs (bf16 autocast on top where it measures "
        "faster: training.autocast), bf16 on GPUs that support it, else float16.",
    )
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = Field(
        "sdpa", description="Attention kernel passed to transformers."
    )
    chat_template: str | None = Field(
        None,
        description="Chat template: null uses the tokenizer's own; `chatml` or a path to a Jinja file overrides it.",
    )


class DataSource(Section):
    path: str | None = Field(
        None,
        description="Conversations: a JSONL/JSON/Parquet file, a card (PNG/JSON), a `datasets` save_to_disk directory "
        "or a directory of chat files; relative to the recipe file or absolute. May be left out when `card` is set.",
    )
    format: Literal["auto", "openai", "sharegpt", "parquet", "hf_dataset", "card", "pippa", "sillytavern"] = Field(
        "auto",
        description="Input format. `auto` picks the container by extension (.parquet, .png card, saved dataset "
        "directory, SillyTavern export by its header) and the row shape (openai/sharegpt/pippa) per row.",
    )
    role_map: dict[str, Literal["system", "user", "assistant"]] = Field(
        default_factory=dict,
        description="Extra role (or SillyTavern speaker) names mapped to system/user/assistant (e.g. `Alice: user`).",
    )
    card: str | None = Field(
        None,
        description="Character card (V1/V2/V3, PNG or JSON). With `path`: the system turn and greeting of every chat "
        "log. Alone: its `<START>` example dialogues become the training conversations.",
    )
    user_name: str = Field(
        "User", min_length=1, description="Name put in for `{{user}}`/`<USER>` in cards and PIPPA definitions."
    )
    greeting: Literal["first", "all"] = Field(
        "first",
        description="Card greetings: `first` opens chat logs with first_mes; `all` also adds one [system, greeting] "
        "conversation per greeting (first_mes and alternates) when the card has no chat logs.",
    )
    weight: float | None = Field(
        None, gt=0, description="Share of this source in the mix: 2.0 uses each conversation twice, 0.5 half of them."
    )
    max_samples: int | None = Field(
        None, gt=0, description="At most this many conversations from this source (after `weight`), chosen by hash."
    )
    origin: str | None = Field(None, description="Where the data came from (carried into the report).")
    license: str | None = Field(None, description="The data's licence (carried into the report).")

    @model_validator(mode="after")
    def _path_or_card(self) -> DataSource:
        if self.path is None and self.card is None:
            raise ValueError("a data source needs `path` (conversations), `card` (a character card), or both")
        if self.path is not None and self.card is not None and self.format == "card":
            raise ValueError("`format: card` reads `path` as the card; with `card:` set, `path` must be chat logs")
        return self


class DataConfig(Section):
    sources: list[DataSource] = Field(description="Input files; at least one.")
    val_fraction: float = Field(
        0.1, ge=0.0, lt=1.0, description="Share of conversations held back for validation, chosen by content hash."
    )
    max_seq_length: int = Field(512, gt=8, description="Tokens per training sequence; longer conversations are truncated at a turn boundary.")
    dedup: Literal["near", "exact", "none"] = Field(
        "near", description="Remove exact duplicates, and with `near` also near-duplicates (MinHash LSH)."
    )
    near_dup_threshold: float = Field(
        0.85, gt=0.0, le=1.0, description="Estimated Jaccard similarity of word 3-shingles that makes a near-duplicate."
    )
    pii: Literal["redact", "quarantine", "off"] = Field(
        "redact",
        description=(
            "Personal data in training rows (emails, phone numbers, street addresses, @handles, payment card numbers, "
            "IBANs): `redact` replaces each with a placeholder such as [EMAIL]; `quarantine` sets the conversation aside "
            "with reason `pii:<kinds>`; `off` leaves rows as they are. Counts go in the data report."
        ),
    )
    mask: Literal["assistant", "all", "last"] = Field(
        "assistant", description="Which turns carry loss: assistant turns, all turns, or the last assistant turn."
    )

    @field_validator("sources")
    @classmethod
    def _at_least_one(cls, v: list[DataSource]) -> list[DataSource]:
        if not v:
            raise ValueError("list at least one data source (`- path: data/roleplay/...jsonl`)")
        return v


class LoraConfig(Section):
    rank: int = Field(16, gt=0, description="LoRA rank r.")
    alpha: float = Field(32, gt=0, description="LoRA alpha (scale = alpha / rank).")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: str | list[str] = Field(
        "all-linear", description="`all-linear` or a list of module names (q_proj, v_proj, ...)."
    )


class QuantizationConfig(Section):
    mode: Literal["none", "nf4"] = Field("none", description="`nf4` loads the base in bitsandbytes 4-bit (QLoRA).")
    double_quant: bool = Field(True, description="Quantize the quantization constants too (saves ~0.4 bit/param).")
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Dtype of the 4-bit matmuls; `auto` follows model.dtype, or bf16 where training autocasts to it "
        "(training.autocast)."
    )


class TrainingConfig(Section):
    max_steps: MaxSteps = Field(-1, description="Optimizer steps; -1 trains for `epochs` instead.")
    epochs: float = Field(1.0, gt=0, description="Passes over the training split when max_steps is -1.")
    micro_batch_size: int = Field(4, gt=0, description="Sequences per device per forward pass.")
    gradient_accumulation_steps: int = Field(1, gt=0, description="Micro-batches per optimizer step.")
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate.")
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = Field(
        "cosine", description="Learning-rate schedule after warmup."
    )
    warmup_ratio: float = Field(0.05, ge=0.0, lt=1.0, description="Share of steps spent warming up.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    optim: str = Field("adamw_torch", description="transformers optimizer name (e.g. `paged_adamw_8bit` on GPUs).")
    gradient_checkpointing: bool | Literal["auto"] = Field(
        "auto",
        description="Recompute activations in backward to save memory (~6-30% slower). `auto`: on only when the memory "
        "estimate (docs/memory.md) of the run without it exceeds 90% of this machine's memory (the GPU's, or the RAM, "
        "shared among local processes); the decision is printed when training starts.",
    )
    packing: bool = Field(
        True,
        description="Pack conversations padding-free into max_seq_length rows, with per-sequence position ids so no "
        "token attends across conversations (turned off with a warning for models that cannot keep them apart). With "
        "`sdpa`, attention runs per conversation, not over the whole packed micro-batch.",
    )
    chunked_loss: bool = Field(
        True,
        description="Score only loss-bearing tokens against the vocabulary, a block of rows at a time, so full "
        "[tokens, vocab] logits never exist (same loss; off: TRL's own LM-head loss). Falls back, with the reason "
        "printed, for trained, adapted or quantized LM heads and logit-scaling models.",
    )
    group_by_length: bool = Field(
        True,
        description="Without packing, batch conversations of similar length together so batches carry less padding.",
    )
    masked_dropout: bool = Field(
        True,
        description="On CPUs, LoRA dropout draws its mask as 16-bit lanes from numpy's PCG64 (seeded from torch) instead "
        "of torch's per-element Bernoulli sampler, ~3x cheaper, the same p to within 1/65536 (llmtune/lora_dropout.py). "
        "false: PEFT's `nn.Dropout`. GPUs always use `nn.Dropout`.",
    )
    seed: int = Field(42, ge=0, description="Seed for data order, LoRA init and sampling.")
    logging_steps: int = Field(5, gt=0, description="Log loss every N steps.")
    eval_steps: int = Field(20, gt=0, description="Evaluate (loss + sample replies) every N steps.")
    save_steps: int = Field(20, gt=0, description="Write an atomic checkpoint every N steps.")
    save_total_limit: int = Field(3, gt=0, description="Checkpoints kept on disk (oldest deleted first).")
    num_threads: int | None = Field(None, gt=0, description="CPU threads for torch; null uses every core.")
    autocast: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description="CPU training arithmetic (with float32 weights, model.dtype `auto`): `bfloat16` runs the matmuls "
        "under bf16 autocast with fp32 LoRA master weights and optimizer states; `float32` never autocasts. `auto`: "
        "bf16 only where a probe measured it at least 1.1x faster than float32 for a LoRA training step of this "
        "model on this machine (cached per machine; the decision and its numbers are printed). GPUs: model.dtype.",
    )


class PreferenceSource(Section):
    path: str = Field(
        description="Preference data: a JSONL/JSON/Parquet file of pairs (`prompt` or `messages`, `chosen`, `rejected`) "
        "or of KTO rows (`prompt`, `completion`, `label`), a `datasets` save_to_disk directory, a SillyTavern chat "
        "export with swipes, or a directory of such files; relative to the recipe file or absolute."
    )
    format: Literal["auto", "pairs", "kto", "sillytavern"] = Field(
        "auto",
        description="`auto` tells the row shape per row (`chosen`/`rejected`: a pair; `completion` + `label`: a KTO row) "
        "and a SillyTavern export by its header; the others insist on one shape (docs/preference.md).",
    )
    role_map: dict[str, Literal["system", "user", "assistant"]] = Field(
        default_factory=dict,
        description="Extra role (or SillyTavern speaker) names mapped to system/user/assistant.",
    )
    card: str | None = Field(
        None,
        description="Character card (PNG/JSON) whose system prompt goes before every prompt of this source that has "
        "none (SillyTavern exports carry no system prompt; the card is what the character ran with).",
    )
    system: str | None = Field(
        None,
        description="System prompt put before every prompt of this source that has none (instead of a `card:`), "
        "e.g. the persona the SFT data opens with.",
    )
    user_name: str = Field("User", min_length=1, description="Name put in for `{{user}}` in the card.")
    origin: str | None = Field(None, description="Where the data came from (carried into the report).")
    license: str | None = Field(None, description="The data's licence (carried into the report).")

    @model_validator(mode="after")
    def _card_or_system(self) -> "PreferenceSource":
        if self.card is not None and self.system is not None:
            raise ValueError("set `card` or `system` on a preference source, not both (the card carries its own system prompt)")
        return self


class PreferenceConfig(Section):
    method: Literal["dpo", "kto", "orpo", "simpo"] = Field(
        "dpo",
        description="`dpo` (TRL DPOTrainer), `kto` (KTOTrainer: pairs and single desirable/undesirable rows), `orpo` "
        "(trl.experimental ORPOTrainer, no reference model) or `simpo` (trl.experimental CPOTrainer with "
        "loss_type=simpo, cpo_alpha=0, no reference model).",
    )
    sources: list[PreferenceSource] = Field(description="Preference data files; at least one.")
    start_from: Literal["sft", "base"] = Field(
        "sft",
        description="`sft`: a new LoRA on top of the run's SFT adapter (train stage), whose model is the DPO/KTO "
        "reference; `base`: a new LoRA on the base model, the reference being the base.",
    )
    val_fraction: float = Field(
        0.2, ge=0.0, lt=1.0,
        description="Share of preference examples held back (by hash of prompt and chosen reply) for preference "
        "accuracy and reward margin.",
    )
    beta: float = Field(0.1, gt=0, description="β: how far the policy may move from the reference (DPO/KTO), or the "
                        "reward scale (ORPO's λ, SimPO's β).")
    dpo_loss: Literal["sigmoid", "ipo", "hinge", "robust", "sigmoid_norm"] = Field(
        "sigmoid", description="DPO loss variant (TRL DPOConfig.loss_type); `sigmoid` is the paper's."
    )
    simpo_gamma: float = Field(0.5, ge=0.0, description="SimPO target reward margin γ (method simpo).")
    desirable_weight: float = Field(1.0, gt=0, description="KTO weight of desirable rows.")
    undesirable_weight: float = Field(1.0, gt=0, description="KTO weight of undesirable rows.")
    precompute_reference: bool = Field(
        False,
        description="Compute the reference log-probs of every example once before training (DPO/KTO): saves the "
        "reference forward pass of every step after the first epoch.",
    )
    max_steps: MaxSteps = Field(-1, description="Optimizer steps; -1 trains for `epochs` instead.")
    epochs: float = Field(1.0, gt=0, description="Passes over the preference training split when max_steps is -1.")
    micro_batch_size: int = Field(2, gt=0, description="Examples (pairs) per device per forward pass.")
    gradient_accumulation_steps: int = Field(1, gt=0, description="Micro-batches per optimizer step.")
    learning_rate: float = Field(5e-5, gt=0, description="Peak learning rate of the preference LoRA.")
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = Field(
        "cosine", description="Learning-rate schedule after warmup."
    )
    warmup_ratio: float = Field(0.1, ge=0.0, lt=1.0, description="Share of steps spent warming up.")
    logging_steps: int = Field(5, gt=0, description="Log loss and rewards every N steps.")
    eval_steps: int = Field(20, gt=0, description="Evaluate on the held-out examples (and sample replies) every N steps.")
    save_steps: int = Field(20, gt=0, description="Write an atomic checkpoint every N steps.")
    save_total_limit: int = Field(2, gt=0, description="Checkpoints kept on disk (oldest deleted first).")

    @field_validator("sources")
    @classmethod
    def _at_least_one(cls, v: list[PreferenceSource]) -> list[PreferenceSource]:
        if not v:
            raise ValueError("list at least one preference source (`- path: data/preference/...jsonl`)")
        return v


class EvalConfig(Section):
    prompts: list[str] = Field(
        default_factory=lambda: ["Hello! Who are you?"],
        description="Fixed user prompts for sample replies, generated at each eval and at the end.",
    )
    system_prompt: str | None = Field(
        None, description="System message put before each sample prompt; null uses the first training conversation's."
    )
    max_new_tokens: int = Field(64, gt=0, description="Token limit of each generated reply.")
    compare_base: bool = Field(True, description="Also evaluate the base model on the same split, prompts and seed.")
    max_conversations: int = Field(
        12, ge=0, description="Held-back conversations replayed turn by turn for the roleplay metrics (0: loss only)."
    )
    temperature: float = Field(0.7, ge=0.0, description="Sampling temperature of eval generations (0: greedy).")
    top_p: float = Field(0.9, gt=0.0, le=1.0, description="Nucleus sampling of eval generations.")
    batch_size: int = Field(8, gt=0, description="Conversations generated at once.")
    over_refusal: bool = Field(True, description="Measure refusals on the shipped allowed adult and general roleplay prompts.")
    red_team: bool = Field(True, description="Screen replies to the shipped red-team prompts with the moderation adapter.")


class ReviewConfig(Section):
    max_conversations: int = Field(
        24, ge=0, description="Held-back conversations (up to their last user turn) shown with two replies in "
        "`llmtune review`, besides `eval.prompts`.",
    )
    max_new_tokens: int = Field(160, gt=0, description="Token limit of each reply generated for review.")
    temperature: float = Field(0.7, ge=0.0, description="Sampling temperature of review replies (0: greedy).")
    top_p: float = Field(0.9, gt=0.0, le=1.0, description="Nucleus sampling of review replies.")
    batch_size: int = Field(8, gt=0, description="Chats generated at once for review.")
    seed: int | None = Field(
        None, ge=0, description="Seed of the review's sampling, pair order and left/right placement; null uses training.seed."
    )


class MergeConfig(Section):
    nf4_roundtrip: bool | None = Field(
        None,
        description="Before merging, pass the base weights through the NF4 quantize-dequantize the adapter was trained "
        "against. null: on for QLoRA runs, off for LoRA runs.",
    )
    max_shard_size: str = Field("2GB", description="Largest safetensors shard in merged/.")
    max_abs_logit_diff: float | None = Field(
        None, gt=0, description="Largest allowed |logit| difference merged vs base + adapter; null: 0.01 in float32, 0.5 in 16-bit."
    )
    min_top1_agreement: float = Field(
        0.98, ge=0.0, le=1.0, description="Smallest allowed share of positions where merged and base + adapter pick the same token."
    )


class ExportConfig(Section):
    sillytavern: bool = Field(True, description="Write SillyTavern instruct and context presets and a connection guide.")
    ollama: bool = Field(True, description="Write an Ollama Modelfile (template and stop tokens from training).")
    character_card: bool = Field(True, description="Write a Character Card V2 JSON when the data came from a card.")
    gguf: bool = Field(
        True,
        description="Write export/NAME-TYPE.gguf files of merged/ for llama.cpp, KoboldCpp and Ollama (needs the merge "
        "stage first), with the training chat template and the end-of-turn token as EOS.",
    )
    gguf_types: list[Literal["f32", "f16", "q8_0", "q4_k_m"]] = Field(
        default_factory=lambda: ["f16", "q8_0", "q4_k_m"],
        min_length=1,
        description="GGUF files to write. `q4_k_m` uses llama.cpp's own quantizer (from llama-cpp-python) and is skipped, "
        "with a note, where that is not installed.",
    )
    gguf_verify: bool = Field(
        True,
        description="Check every GGUF against the merged model: greedy replies and top-1 agreement in llama.cpp "
        "(llama-cpp-python), stopping at end-of-turn through the GGUF's chat template, and a read-back with "
        "transformers' GGUF loader. A file outside the limits is not moved into export/.",
    )
    gguf_greedy_tokens: int = Field(
        32, gt=0, description="Greedy tokens per sample prompt that f32/f16 files must reproduce exactly."
    )
    gguf_min_top1_agreement: float = Field(
        0.9, ge=0.0, le=1.0,
        description="Smallest share of positions where a q8_0 file picks the merged model's top token (q4_k_m: reported only).",
    )
    gguf_threads: int | None = Field(
        None, gt=0,
        description="CPU threads for llama.cpp during verification and quantization; null uses training.num_threads "
        "or every core. Use 1 on a machine whose cores other jobs are using: llama.cpp's threads wait for each other "
        "by spinning, so a contended core slows every step.",
    )


class Recipe(RecipeFile):
    stages: list[Stage] = Field(
        default_factory=lambda: [s for s in STAGES if s != "preference"],
        description="Stages `llmtune run` executes, in order. Left out: every stage, `preference` only when the "
        "recipe has a `preference:` section.",
    )
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig
    lora: LoraConfig = Field(default_factory=LoraConfig)
    quantization: QuantizationConfig = Field(default_factory=QuantizationConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    preference: PreferenceConfig | None = Field(
        None,
        description="Preference tuning (DPO, KTO, ORPO, SimPO) after `train`; null: none. See docs/preference.md.",
    )
    eval: EvalConfig = Field(default_factory=EvalConfig)
    moderation: ModerationConfig = Field(
        default_factory=ModerationConfig,
        description="The screen on every training row (prepare) and, with llmtune serve, on prompts and outputs.",
    )
    review: ReviewConfig = Field(
        default_factory=ReviewConfig, description="`llmtune review`: replies generated for blind side-by-side judging."
    )
    merge: MergeConfig = Field(default_factory=MergeConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    output: Output = Field(default_factory=Output)

    @model_validator(mode="before")
    @classmethod
    def _default_stages(cls, data: Any) -> Any:
        if isinstance(data, dict) and "stages" not in data and data.get("preference") is not None:
            return {**data, "stages": list(STAGES)}
        return data

    @model_validator(mode="after")
    def _stage_order(self) -> "Recipe":
        order = [s for s in STAGES if s in self.stages]
        if order != list(self.stages):
            raise ValueError(f"stages must keep the order {list(STAGES)}; got {self.stages}")
        if "preference" in self.stages and self.preference is None:
            raise ValueError("the `preference` stage needs a `preference:` section (method, sources); see docs/preference.md")
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


# ---------------------------------------------------------------------------------------------
# Loading (the one YAML loader: llmtune.schema)


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe; raise RecipeError naming file, line and key."""
    return load_yaml_model(Recipe, path, "recipe file", RecipeError, overrides,
                           hint="recipes live under recipes/, e.g. recipes/demo-cpu.yaml")


def save_resolved(recipe: Recipe, run_dir: Path) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    out = run_dir / "recipe.yaml"
    header = f"# Fully resolved recipe (defaults and overrides applied) from {recipe.source_path}\n"
    out.write_text(header + recipe.to_yaml(), encoding="utf-8")
    return out
