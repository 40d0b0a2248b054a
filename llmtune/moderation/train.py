"""Train the moderation adapter: LoRA on the embedded MiniLM encoder + a multi-label head.

Entry point: `train_moderation(recipe) -> ModerationTrainResult`, behind
`llmtune moderation train recipes/moderation.yaml [section.key=value ...]`. Read it top to
bottom: read and check the splits, normalise every text exactly as screening does, wrap the
encoder with LoRA, train with BCE (positives up-weighted per category), save the adapter,
score the dev split through the same fast path the screener uses, calibrate one threshold per
category to reach its recall target, and freeze the thresholds into moderation.json.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import Field, ValidationError, field_validator

from llmtune.config import Section as _Section
from llmtune.config import apply_overrides
from llmtune.console import console
from llmtune.moderation.adapter import (
    CONFIG_NAME,
    EMBEDDED_ENCODER,
    ENCODER_HUB_ID,
    HEAD_NAME,
    NAMES_NAME,
    TARGET_MODULES,
    ModerationAdapter,
    Tokenizer,
    mean_pool,
    resolve_encoder,
)
from llmtune.moderation.errors import ModerationError
from llmtune.moderation.normalize import canonical
from llmtune.moderation.policy import BUILTIN_CATEGORIES, HARD_FLOOR

# ---------------------------------------------------------------------------------------------
# The recipe


class EncoderSection(_Section):
    base: str = Field(EMBEDDED_ENCODER, description="Encoder: `embedded:minilm-l6` or a local BERT-style model directory.")
    max_length: int = Field(128, ge=16, le=512, description="Tokens per window; longer texts are screened as overlapping windows.")


class DataSection(_Section):
    train: str = Field("data/moderation/train.jsonl", description="Training rows: {\"text\", \"labels\": [categories]}.")
    dev: str = Field("data/moderation/dev.jsonl", description="Calibration rows (thresholds are fitted here).")
    test: str = Field("data/moderation/test.jsonl", description="Held-out rows for `llmtune moderation eval`.")
    max_train_rows: int | None = Field(None, gt=0, description="Use only the first N training rows (smoke tests).")
    names_file: str = Field("data/moderation/real_people.txt", description="Name list shipped with the adapter.")


class LoraSection(_Section):
    rank: int = Field(8, gt=0, description="LoRA rank r.")
    alpha: float = Field(16, gt=0, description="LoRA alpha (scale = alpha / rank).")
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: str = Field(TARGET_MODULES, description="Regex (full match) of the encoder's linear layers that get LoRA.")


class TrainingSection(_Section):
    epochs: float = Field(6.0, gt=0, description="Passes over the training split when max_steps is -1.")
    max_steps: int = Field(-1, description="Optimizer steps; -1 trains for `epochs`.")
    batch_size: int = Field(32, gt=0, description="Rows per step.")
    learning_rate: float = Field(5e-4, gt=0, description="Peak learning rate of the LoRA weights.")
    head_learning_rate: float = Field(3e-3, gt=0, description="Peak learning rate of the classification head.")
    weight_decay: float = Field(0.01, ge=0.0, description="AdamW weight decay.")
    warmup_ratio: float = Field(0.06, ge=0.0, lt=1.0, description="Share of steps spent warming up (then linear decay).")
    frame_dropout: float = Field(
        0.25, ge=0.0, le=1.0,
        description="Chance of dropping the first 1-4 words of a row (\"asks for ...\") so the head learns content, not request frames.",
    )
    word_dropout: float = Field(0.1, ge=0.0, lt=0.5, description="Chance of dropping each word of half the rows (augmentation).")
    max_pos_weight: float = Field(4.0, ge=1.0, description="Cap on the per-category positive weight sqrt(negatives/positives).")
    seed: int = Field(0, description="Seed for LoRA init, data order and augmentation.")
    num_threads: int | None = Field(None, gt=0, description="CPU threads for torch; null uses every core.")
    logging_steps: int = Field(10, gt=0, description="Print the loss every N steps.")


class CalibrationSection(_Section):
    recall_targets: dict[str, float] = Field(
        default_factory=lambda: {"minor_sexual": 0.99, "real_person_sexual": 0.98, "sexual_violence": 0.95,
                                 "bestiality": 0.95, "illegal_instructions": 0.95},
        description="Adapter-only recall each category's threshold must reach on the dev split.",
    )
    max_fpr: dict[str, float] = Field(
        default_factory=lambda: {"minor_sexual": 0.01, "real_person_sexual": 0.01, "sexual_violence": 0.005,
                                 "bestiality": 0.005, "illegal_instructions": 0.005},
        description="Share of dev rows without the label that the adapter alone may flag, per category (the over-blocking budget).",
    )
    min_threshold: float = Field(0.05, gt=0.0, lt=1.0, description="Lowest threshold calibration may pick.")
    max_threshold: float = Field(0.9, gt=0.0, le=1.0, description="Highest threshold calibration may pick.")

    @field_validator("recall_targets")
    @classmethod
    def _known(cls, v: dict[str, float]) -> dict[str, float]:
        unknown = set(v) - set(BUILTIN_CATEGORIES)
        if unknown:
            raise ValueError(f"unknown categories {sorted(unknown)}; the adapter has {list(BUILTIN_CATEGORIES)}")
        return v


class OutputSection(_Section):
    dir: str = Field("runs", description="Parent directory of run directories.")
    name: str | None = Field(None, description="Run directory name; null uses the recipe's name. The adapter goes to <run>/adapter.")


class ModerationRecipe(_Section):
    name: str = Field(description="Recipe name; also the default run directory name.")
    description: str | None = Field(None, description="One line on what this recipe is for.")
    encoder: EncoderSection = Field(default_factory=EncoderSection)
    data: DataSection = Field(default_factory=DataSection)
    lora: LoraSection = Field(default_factory=LoraSection)
    training: TrainingSection = Field(default_factory=TrainingSection)
    calibration: CalibrationSection = Field(default_factory=CalibrationSection)
    output: OutputSection = Field(default_factory=OutputSection)
    source_path: Path | None = Field(None, exclude=True)

    @property
    def run_dir(self) -> Path:
        return Path(self.output.dir) / (self.output.name or self.name)

    def resolve_path(self, path: str) -> Path:
        """Absolute as is; else beside the recipe if it exists there; else relative to the working directory."""
        p = Path(path).expanduser()
        if not p.is_absolute() and self.source_path is not None and (self.source_path.parent / p).exists():
            return (self.source_path.parent / p).resolve()
        return p.resolve()


def load_moderation_recipe(path: str | Path, overrides: list[str] | None = None) -> ModerationRecipe:
    path = Path(path)
    if not path.is_file():
        raise ModerationError(f"moderation recipe not found: {path} (the shipped one is recipes/moderation.yaml)")
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ModerationError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(doc, dict):
        raise ModerationError(f"{path}: a moderation recipe is a mapping of sections (encoder:, data:, lora:, ...)")
    doc = apply_overrides(doc, overrides or [])
    try:
        recipe = ModerationRecipe.model_validate(doc)
    except ValidationError as err:
        lines = []
        for e in err.errors():
            key = ".".join(str(p) for p in e["loc"])
            lines.append(f"{path}: `{key}`: {e['msg']}")
        raise ModerationError("\n".join(lines)) from None
    recipe.source_path = path.resolve()
    return recipe


# ---------------------------------------------------------------------------------------------
# Data


@dataclass
class Row:
    text: str
    labels: list[str]
    group: str | None = None
    obfuscation: str | None = None


def read_rows(path: Path, limit: int | None = None) -> list[Row]:
    """Rows of {"text": str, "labels": [categories]}; a bad row is an error naming file and line."""
    if not path.is_file():
        raise ModerationError(f"moderation data file not found: {path} (generate it with `python data/moderation/generate.py`)")
    rows = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ModerationError(f"{path}:{n}: not valid JSON ({exc.msg})") from None
            text, labels = obj.get("text") if isinstance(obj, dict) else None, obj.get("labels", []) if isinstance(obj, dict) else None
            if not isinstance(text, str) or not isinstance(labels, list):
                raise ModerationError(f'{path}:{n}: a row needs "text" (string) and "labels" (list of categories)')
            unknown = [lab for lab in labels if lab not in BUILTIN_CATEGORIES]
            if unknown:
                raise ModerationError(f"{path}:{n}: unknown label(s) {unknown}; known: {', '.join(BUILTIN_CATEGORIES)}")
            rows.append(Row(text, labels, obj.get("group"), obj.get("obfuscation")))
            if limit and len(rows) >= limit:
                break
    if not rows:
        raise ModerationError(f"{path}: no rows")
    return rows


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Calibration


def calibrate(scores: list[list[float]], rows: list[Row], categories: list[str], cal: CalibrationSection) -> dict:
    """One threshold per category from dev scores.

    t_recall: the highest threshold at which the adapter alone reaches the category's recall target.
    t_fpr: the lowest threshold at which the adapter flags at most max_fpr of the dev rows without this label.
    The threshold is max(t_recall, t_fpr): reach the target alone when that fits the over-blocking
    budget; otherwise spend the whole budget and let the rules carry the rest of the recall.
    """
    out = {}
    for j, cat in enumerate(categories):
        target = cal.recall_targets.get(cat, 0.95)
        budget = cal.max_fpr.get(cat, 0.005)
        pos = sorted((s[j] for s, r in zip(scores, rows) if cat in r.labels), reverse=True)
        # every row without this label counts: an assault scene flagged as "minor" is a false positive too
        neg = sorted((s[j] for s, r in zip(scores, rows) if cat not in r.labels), reverse=True)
        t_recall = pos[max(1, math.ceil(target * len(pos))) - 1] if pos else 0.5
        # the (k+1)-th highest allowed score, nudged up, blocks at most k allowed rows
        k = int(budget * len(neg))
        t_fpr = (neg[k] + 1e-6) if k < len(neg) else 0.0
        threshold = float(min(max(t_recall, t_fpr, cal.min_threshold), cal.max_threshold))
        recall = sum(p >= threshold for p in pos) / len(pos) if pos else float("nan")
        fpr = sum(n >= threshold for n in neg) / len(neg) if neg else 0.0
        out[cat] = {"threshold": round(threshold, 6), "target_recall": target, "max_fpr": budget,
                    "t_recall": round(float(t_recall), 6), "t_fpr": round(float(t_fpr), 6),
                    "dev_recall": round(recall, 4), "dev_fpr": round(fpr, 4),
                    "dev_positives": len(pos), "dev_negatives": len(neg)}
    return out


# ---------------------------------------------------------------------------------------------
# Training


@dataclass
class ModerationTrainResult:
    run_dir: Path
    adapter_dir: Path
    calibration: dict
    train_seconds: float


def _augment(text: str, rng: random.Random, frame_dropout: float, word_dropout: float) -> str:
    """Drop the opening request frame ("asks for ...") sometimes, and a few random words, so the
    head keys on what is asked for rather than on how our templates phrase the asking."""
    words = text.split()
    if len(words) > 6 and rng.random() < frame_dropout:
        words = words[rng.randint(1, 4):]
    if len(words) > 6 and word_dropout > 0 and rng.random() < 0.5:
        words = [w for w in words if rng.random() >= word_dropout] or words
    return " ".join(words)


def train_moderation(recipe: ModerationRecipe) -> ModerationTrainResult:
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file
    from transformers import AutoModel

    from llmtune.moderation.screener import configure_threads

    t = recipe.training
    threads = configure_threads(t.num_threads)
    torch.manual_seed(t.seed)
    rng = random.Random(t.seed)
    categories = list(BUILTIN_CATEGORIES)
    run_dir = recipe.run_dir
    adapter_dir = run_dir / "adapter"
    run_dir.mkdir(parents=True, exist_ok=True)

    # 1. Data, normalised exactly as screening normalises it.
    train_path, dev_path = recipe.resolve_path(recipe.data.train), recipe.resolve_path(recipe.data.dev)
    train_rows = read_rows(train_path, recipe.data.max_train_rows)
    dev_rows = read_rows(dev_path)
    train_text = [canonical(r.text) for r in train_rows]
    targets = torch.tensor([[float(c in r.labels) for c in categories] for r in train_rows])
    positives = targets.sum(0)
    pos_weight = ((len(train_rows) - positives) / positives.clamp(min=1)).sqrt().clamp(1.0, t.max_pos_weight)
    console.print(
        f"moderation train: {len(train_rows)} rows ({int((targets.sum(1) > 0).sum())} blocked) from {train_path}; "
        f"dev {len(dev_rows)} rows; {threads} threads"
    )
    console.print("  positives per category: " + ", ".join(f"{c}={int(p)}" for c, p in zip(categories, positives)))

    # 2. Encoder + LoRA + head.
    encoder_dir = resolve_encoder(recipe.encoder.base)
    tokenizer = Tokenizer(encoder_dir, recipe.encoder.max_length)
    base = AutoModel.from_pretrained(str(encoder_dir), dtype=torch.float32)
    lora = LoraConfig(r=recipe.lora.rank, lora_alpha=recipe.lora.alpha, lora_dropout=recipe.lora.dropout,
                      target_modules=recipe.lora.target_modules, bias="none")
    model = get_peft_model(base, lora)
    head = torch.nn.Linear(base.config.hidden_size, len(categories))
    torch.nn.init.normal_(head.weight, std=0.02)
    torch.nn.init.zeros_(head.bias)
    lora_params = [p for p in model.parameters() if p.requires_grad]
    n_lora = sum(p.numel() for p in lora_params)
    console.print(f"  encoder {encoder_dir.name}: LoRA r={recipe.lora.rank} on {n_lora:,} params + head {head.weight.numel() + len(categories):,}")

    steps_per_epoch = math.ceil(len(train_rows) / t.batch_size)
    total_steps = t.max_steps if t.max_steps > 0 else max(1, int(steps_per_epoch * t.epochs))
    optimizer = torch.optim.AdamW(
        [{"params": lora_params, "lr": t.learning_rate}, {"params": head.parameters(), "lr": t.head_learning_rate}],
        weight_decay=t.weight_decay,
    )
    warmup = int(total_steps * t.warmup_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / max(1, warmup) if s < warmup else max(0.0, (total_steps - s) / max(1, total_steps - warmup))
    )
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=pos_weight)

    # 3. Train.
    model.train()
    head.train()
    start = time.time()
    metrics = (run_dir / "metrics.jsonl").open("w", encoding="utf-8")
    order: list[int] = []
    running = 0.0
    for step in range(1, total_steps + 1):
        if len(order) < t.batch_size:
            fresh = list(range(len(train_rows)))
            rng.shuffle(fresh)
            order += fresh
        batch, order = order[: t.batch_size], order[t.batch_size:]
        texts = [_augment(train_text[i], rng, t.frame_dropout, t.word_dropout) for i in batch]
        windows = tokenizer.truncated(texts)
        longest = max(len(w) for w in windows)
        ids = torch.zeros((len(windows), longest), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, w in enumerate(windows):
            ids[row, : len(w)] = torch.tensor(w)
            mask[row, : len(w)] = 1
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
        logits = head(torch.nn.functional.dropout(mean_pool(hidden, mask), 0.1, training=True))
        loss = loss_fn(logits, targets[batch])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lora_params + list(head.parameters()), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        running += loss.item()
        if step % t.logging_steps == 0 or step == total_steps:
            avg = running / (t.logging_steps if step % t.logging_steps == 0 else step % t.logging_steps)
            running = 0.0
            metrics.write(json.dumps({"step": step, "loss": round(avg, 5), "lr": scheduler.get_last_lr()[0]}) + "\n")
            console.print(f"  step {step}/{total_steps}  loss {avg:.4f}  ({time.time() - start:.0f}s)")
    metrics.close()
    train_seconds = time.time() - start

    # 4. Save: PEFT adapter (loads with PeftModel.from_pretrained), head, provisional config.
    tmp = run_dir / ".adapter-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    # Name the hub id, not this machine's path, as the base (offline users pass the local MiniLM dir).
    peft_cfg = json.loads((tmp / "adapter_config.json").read_text())
    peft_cfg["base_model_name_or_path"] = ENCODER_HUB_ID
    (tmp / "adapter_config.json").write_text(json.dumps(peft_cfg, indent=2))
    save_file({"weight": head.weight.detach().contiguous(), "bias": head.bias.detach().contiguous()}, str(tmp / HEAD_NAME))
    names = recipe.resolve_path(recipe.data.names_file)
    if names.is_file():
        shutil.copyfile(names, tmp / NAMES_NAME)
    meta = {
        "format_version": 1,
        "encoder": recipe.encoder.base if recipe.encoder.base == EMBEDDED_ENCODER else str(encoder_dir),
        "encoder_hub_id": ENCODER_HUB_ID,
        "categories": categories,
        "hard_floor": list(HARD_FLOOR),
        "thresholds": dict.fromkeys(categories, 0.5),
        "max_length": recipe.encoder.max_length,
        "pooling": "mean",
        "normalisation": "llmtune.moderation.normalize.canonical",
    }
    (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2))

    # 5. Calibrate on dev through the same fast path the screener uses, then freeze the thresholds.
    adapter = ModerationAdapter(tmp, precision="float32")  # thresholds are calibrated in float32
    dev_scores = adapter.scores([canonical(r.text) for r in dev_rows])
    cal = calibrate(dev_scores, dev_rows, categories, recipe.calibration)
    meta["thresholds"] = {c: cal[c]["threshold"] for c in categories}
    meta["calibration"] = {"split": str(recipe.data.dev), "split_sha256": _sha256(dev_path), "per_category": cal}
    meta["training"] = {
        "recipe": recipe.name, "train": str(recipe.data.train), "train_sha256": _sha256(train_path), "rows": len(train_rows),
        "steps": total_steps, "batch_size": t.batch_size, "seed": t.seed, "lora_rank": recipe.lora.rank,
        "lora_alpha": recipe.lora.alpha, "seconds": round(train_seconds, 1),
    }
    (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2))
    shutil.rmtree(adapter_dir, ignore_errors=True)
    tmp.rename(adapter_dir)
    (run_dir / "recipe.yaml").write_text(
        f"# Fully resolved moderation recipe from {recipe.source_path}\n"
        + yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
    )

    console.print("  calibrated thresholds (dev, adapter alone):")
    for c in categories:
        k = cal[c]
        console.print(f"    {c:22s} t={k['threshold']:.3f}  recall {k['dev_recall']:.3f} (target {k['target_recall']})  "
                      f"FPR {k['dev_fpr']:.3f} (budget {k['max_fpr']})")
    size = sum(f.stat().st_size for f in adapter_dir.iterdir()) / 1e6
    console.print(f"done: adapter {adapter_dir} ({size:.1f} MB) in {train_seconds:.0f}s")
    return ModerationTrainResult(run_dir, adapter_dir, cal, train_seconds)
