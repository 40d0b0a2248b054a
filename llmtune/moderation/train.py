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
from typing import Literal

import yaml
from pydantic import Field, field_validator

from llmtune.console import console
from llmtune.encoder import EMBEDDED_ENCODER, ENCODER_HUB_ID, mean_pool, resolve_encoder
from llmtune.jsonl import json_objects
from llmtune.moderation.adapter import (
    CONFIG_NAME, HEAD_NAME, TARGET_MODULES, ModerationAdapter, Tokenizer, batch_tensors, native_bf16,
)
from llmtune.moderation.bulk import PREFILTER_NAME, train_prefilter
from llmtune.moderation.errors import ModerationError
from llmtune.moderation.normalize import canonical
from llmtune.moderation.policy import BUILTIN_CATEGORIES, HARD_FLOOR, SIGNALS
from llmtune.schema import MaxSteps, Output, RecipeFile, load_yaml_model
from llmtune.schema import Section as _Section
from llmtune.storage import file_sha256

# Blocking heads, then signal heads, in logit order.
HEADS: tuple[str, ...] = BUILTIN_CATEGORIES + SIGNALS

# ---------------------------------------------------------------------------------------------
# The recipe


class EncoderSection(_Section):
    base: str = Field(EMBEDDED_ENCODER, description="Encoder: `embedded:minilm-l6` or a local BERT-style model directory.")
    max_length: int = Field(128, ge=16, le=512, description="Tokens per window; longer texts are screened as overlapping windows.")
    context_tokens: int = Field(
        48, ge=0, le=256,
        description="Tokens of the conversation's card (its system and developer messages) the classifier reads beside each "
                    "later text, as a second segment; 0 reads every text alone.")


class DataSection(_Section):
    train: list[str] = Field(
        default_factory=lambda: ["data/moderation/train/*.jsonl", "data/moderation/train.jsonl"],
        description=(
            "Training files or globs: text rows {\"text\", \"labels\", \"sexual\", \"minor\", \"real_person\"} "
            "and conversation rows {\"messages\", \"output\", \"labels\", ...} (docs/moderation.md, Training data)."
        ),
    )
    tame: list[str] = Field(
        default_factory=lambda: ["data/moderation/train/tame_rp/*"],
        description="Tame roleplay in any format `prepare` reads: every message is a negative for every blocking head.",
    )
    calibration_fraction: float = Field(
        0.15, gt=0.0, lt=0.5,
        description="Share of every source held out (by a hash of the text) to calibrate thresholds on: positives, adult requests and tame roleplay.",
    )
    dev: str = Field("data/moderation/eval/dev.jsonl", description="The independent dev set (eval format) for `llmtune moderation eval --split dev`.")
    test: str = Field("data/moderation/eval/heldout.jsonl", description="The frozen independent held-out set for `--split heldout`.")
    max_train_rows: int | None = Field(None, gt=0, description="Use only the first N training rows (smoke tests).")


class LoraSection(_Section):
    rank: int = Field(8, gt=0, description="LoRA rank r.")
    alpha: float = Field(16, gt=0, description="LoRA alpha (scale = alpha / rank).")
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: str = Field(TARGET_MODULES, description="Regex (full match) of the encoder's linear layers that get LoRA.")


class TrainingSection(_Section):
    epochs: float = Field(6.0, gt=0, description="Passes over the training split when max_steps is -1.")
    max_steps: MaxSteps = Field(-1, description="Optimizer steps; -1 trains for `epochs`.")
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
    precision: Literal["auto", "float32", "bfloat16"] = Field(
        "float32", description="Encoder arithmetic while training: `bfloat16` (or `auto` where the CPU has native bf16) autocasts the encoder, LoRA weights stay float32; on the 2-core dev CPU it was ~5x slower per step than float32."
    )
    obfuscation: float = Field(0.15, ge=0.0, le=1.0, description="Chance of training on an obfuscated copy of a row (moderation/obfuscate.py), normalised as screening would.")
    card_augment: float = Field(
        0.25, ge=0.0, le=1.0,
        description="Chance of reading a row that has no card beside a card drawn from the allowed conversations "
                    "(one that defines no minor), its labels unchanged: a card beside a request never clears it by itself.")
    max_pos_weight: float = Field(4.0, ge=1.0, description="Cap on the per-category positive weight sqrt(negatives/positives).")
    seed: int = Field(0, ge=0, description="Seed for LoRA init, data order and augmentation.")
    num_threads: int | None = Field(None, gt=0, description="CPU threads for torch; null uses every core.")
    logging_steps: int = Field(10, gt=0, description="Print the loss every N steps.")


class CalibrationSection(_Section):
    recall_targets: dict[str, float] = Field(
        default_factory=lambda: {"minor_sexual": 0.97, "real_person_sexual": 0.95, "sexual_violence": 0.9,
                                 "bestiality": 0.9, "illegal_instructions": 0.9,
                                 "sexual": 0.95, "minor": 0.9, "real_person": 0.9},
        description="Classifier-only recall each head's threshold must reach on the calibration slice (when its FPR budget allows).",
    )
    max_fpr: dict[str, float] = Field(
        default_factory=lambda: {"minor_sexual": 0.005, "real_person_sexual": 0.005, "sexual_violence": 0.005,
                                 "bestiality": 0.005, "illegal_instructions": 0.005,
                                 "sexual": 0.05, "minor": 0.01, "real_person": 0.01},
        description=(
            "Share of calibration rows without the label (adult requests, tame roleplay, other categories) the classifier "
            "alone may flag, per head: the over-blocking budget."
        ),
    )
    min_threshold: float = Field(0.05, gt=0.0, lt=1.0, description="Lowest threshold calibration may pick.")
    max_threshold: float = Field(0.95, gt=0.0, le=1.0, description="Highest threshold calibration may pick.")

    @field_validator("recall_targets", "max_fpr")
    @classmethod
    def _known(cls, v: dict[str, float]) -> dict[str, float]:
        unknown = set(v) - set(HEADS)
        if unknown:
            raise ValueError(f"unknown heads {sorted(unknown)}; the classifier has {list(HEADS)}")
        return v


class ModerationRecipe(RecipeFile):
    """recipes/moderation.yaml: the adapter goes to <output.dir>/<name>/adapter."""

    encoder: EncoderSection = Field(default_factory=EncoderSection)
    data: DataSection = Field(default_factory=DataSection)
    lora: LoraSection = Field(default_factory=LoraSection)
    training: TrainingSection = Field(default_factory=TrainingSection)
    calibration: CalibrationSection = Field(default_factory=CalibrationSection)
    output: Output = Field(default_factory=Output)


def load_moderation_recipe(path: str | Path, overrides: list[str] | None = None) -> ModerationRecipe:
    return load_yaml_model(ModerationRecipe, path, "moderation recipe", ModerationError, overrides,
                           hint="the shipped one is recipes/moderation.yaml")


# ---------------------------------------------------------------------------------------------
# Data


@dataclass
class Row:
    """One training text with a target per head: 1.0, 0.0, or None where the row does not say
    (that head's loss is masked for the row)."""

    text: str
    targets: dict[str, float | None]
    source: str
    group: str | None = None
    card: str = ""  # the conversation's card so far, read beside the text (conversation.CARD_ROLES)

    @property
    def labels(self) -> list[str]:
        return [c for c in BUILTIN_CATEGORIES if self.targets.get(c) == 1.0]


def _flag(obj: dict, key: str) -> float | None:
    value = obj.get(key)
    return None if value is None else float(bool(value))


def _derived_signals(labels: list[str], group: str | None) -> dict[str, float | None]:
    """Signal targets for rows written before the signal heads (data/moderation/generate.py)."""
    group = group or ""
    sexual = 1.0 if set(labels) & {"minor_sexual", "real_person_sexual", "sexual_violence", "bestiality"} or group.startswith(
        ("adult_romance", "adult_age")) else (0.0 if group in ("general", "child_nonsexual", "school_nonsexual", "real_nonsexual") else None)
    minor = 1.0 if "minor_sexual" in labels or group in ("child_nonsexual",) else (
        0.0 if group in ("adult_romance", "adult_age_odd", "real_named", "real_generic", "name_collision", "real_nonsexual") else None)
    real = 1.0 if "real_person_sexual" in labels or group == "real_nonsexual" else (
        0.0 if group in ("adult_romance", "adult_age_odd", "name_collision", "child_nonsexual", "minor_age", "minor_child") else None)
    return {"sexual": sexual, "minor": minor, "real_person": real}


def _text_row(obj: dict, text: str, where: str) -> Row:
    labels = obj.get("labels", [])
    if not isinstance(labels, list):
        raise ModerationError(f'{where}: "labels" must be a list of categories')
    unknown = [lab for lab in labels if lab not in BUILTIN_CATEGORIES]
    if unknown:
        raise ModerationError(f"{where}: unknown label(s) {unknown}; known: {', '.join(BUILTIN_CATEGORIES)}")
    targets: dict[str, float | None] = {c: float(c in labels) for c in BUILTIN_CATEGORIES}
    if any(k in obj for k in SIGNALS):
        targets.update({k: _flag(obj, k) for k in SIGNALS})
    else:
        targets.update(_derived_signals(labels, obj.get("group")))
    return Row(text, targets, where, obj.get("group"))


def _conversation_rows(obj: dict, where: str) -> list[Row]:
    """A labelled conversation teaches what its texts show, each read with the card so far
    beside it (as screening reads it): in an allowed conversation every message is allowed; its
    last request (or its output) is sexual or not as labelled. A blocked conversation's block
    comes from its context: its last text is a positive where the card holds the evidence (the
    row's group names the card, or the card's own facts show a minor or a real person), and says
    nothing otherwise."""
    messages = obj.get("messages")
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise ModerationError(f'{where}: "messages" must be a list of message objects')
    from llmtune.moderation.conversation import conversation_items

    labels = obj.get("labels") or []
    blocked = bool(labels)
    unknown_signals = dict.fromkeys(SIGNALS)
    items, cards = conversation_items(messages)  # each text with the card it is read with, as screening reads it
    texts = [(text, text_card) for text, _, _, _, text_card in items if text.strip()]
    card = cards[-1] if cards else ""
    if isinstance(obj.get("output"), str) and obj["output"].strip():
        last = (obj["output"], card)
    else:
        last = texts.pop() if texts else None
    rows = []
    group = obj.get("group")
    if not blocked:
        for text, text_card in texts:
            negative = {**dict.fromkeys(BUILTIN_CATEGORIES, 0.0), **unknown_signals}
            rows.append(Row(text, negative, where, group, text_card))
    if last:
        if not blocked:
            base: dict[str, float | None] = dict.fromkeys(BUILTIN_CATEGORIES, 0.0)
        elif last[1] and _card_holds_evidence(last[1], labels, group):
            base = {c: float(c in labels) for c in BUILTIN_CATEGORIES}
        else:
            base = dict.fromkeys(BUILTIN_CATEGORIES, None)
        rows.append(Row(last[0], {**base, **unknown_signals, "sexual": _flag(obj, "sexual")}, where, group, last[1]))
    return rows


def _card_holds_evidence(card: str, labels: list[str], group: str | None) -> bool:
    """Whether a blocked conversation's card alone shows why it is blocked."""
    if "card" in (group or ""):
        return True
    from llmtune.moderation.facts import extract_facts

    facts = extract_facts(card, "card", "system")
    return ("minor_sexual" in labels and bool(facts.minor)) or ("real_person_sexual" in labels and bool(facts.real))


def read_rows(path: Path, limit: int | None = None) -> list[Row]:
    """Text rows and conversation rows; a bad row is an error naming file and line."""
    rows: list[Row] = []
    for _, where, obj in json_objects(path, "moderation data file", ModerationError):
        if isinstance(obj.get("text"), str):
            rows.append(_text_row(obj, obj["text"], where))
        elif "messages" in obj:
            rows += _conversation_rows(obj, where)
        else:
            raise ModerationError(f'{where}: a row needs "text" (a string) or "messages" (a conversation)')
        if limit and len(rows) >= limit:
            break
    if not rows:
        raise ModerationError(f"{path}: no rows")
    return rows


def read_tame(path: Path) -> list[Row]:
    """Every message of every conversation in a roleplay file (any format prepare reads), as a
    negative for every blocking head and for the minor and real-person signals."""
    from llmtune.data.formats import read_source
    from llmtune.data.types import Conversation

    from llmtune.moderation.conversation import with_card

    rows = []
    for item in read_source(path):
        if isinstance(item, Conversation):
            card = ""
            for m in item.messages:
                if m.content.strip():
                    rows.append(Row(m.content, {**dict.fromkeys(BUILTIN_CATEGORIES, 0.0), "sexual": None, "minor": 0.0,
                                                "real_person": 0.0}, f"{path}", "tame_roleplay", card))
                card = with_card(card, m.content, m.role)
    return rows


def expand(patterns: list[str], resolve) -> list[Path]:
    """Files named by paths or globs (relative ones resolved like the recipe's other paths)."""
    import glob

    out: list[Path] = []
    for pattern in patterns:
        base = resolve(pattern)
        matches = sorted(Path(p) for p in glob.glob(str(base))) if any(c in pattern for c in "*?[") else [base]
        out += [p for p in matches if p.is_file() and p not in out]
    return out


def in_calibration(text: str, fraction: float) -> bool:
    """Stable split: the same text always lands on the same side."""
    return int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:8], 16) / 0xFFFFFFFF < fraction


def load_training_data(recipe: "ModerationRecipe") -> tuple[list[Row], list[Row], list[Path]]:
    """(train rows, calibration rows, files read) from every training and tame source."""
    d = recipe.data
    files = expand(d.train, recipe.resolve_path)
    tame_files = expand(d.tame, recipe.resolve_path)
    if not files:
        raise ModerationError(f"data.train: no file matches {d.train}")
    rows: list[Row] = []
    for path in files:
        rows += read_rows(path)
    for path in tame_files:
        rows += read_tame(path)
    seen: set[tuple[str, str]] = set()
    unique = []
    for r in rows:
        if (r.text, r.card) not in seen:
            seen.add((r.text, r.card))
            unique.append(r)
    train = [r for r in unique if not in_calibration(r.text, d.calibration_fraction)]
    cal = [r for r in unique if in_calibration(r.text, d.calibration_fraction)]
    if d.max_train_rows:
        train = train[: d.max_train_rows]
    return train, cal, files + tame_files


# ---------------------------------------------------------------------------------------------
# Calibration


def calibrate(scores: list[list[float]], rows: list[Row], heads: list[str], cal: CalibrationSection) -> dict:
    """One threshold per head from scores on the calibration slice.

    t_recall: the highest threshold at which the classifier alone reaches the head's recall target.
    t_fpr: the lowest threshold at which it flags at most max_fpr of the rows whose target is 0
    (adult requests, tame roleplay, other categories: a realistic mix of allowed traffic).
    The threshold is max(t_recall, t_fpr): reach the target alone when that fits the over-blocking
    budget; otherwise spend the whole budget and let the rules and facts carry the rest.
    Rows whose target for a head is unknown do not count for that head.
    """
    out = {}
    for j, head in enumerate(heads):
        target = cal.recall_targets.get(head, 0.9)
        budget = cal.max_fpr.get(head, 0.005)
        pos = sorted((s[j] for s, r in zip(scores, rows) if r.targets.get(head) == 1.0), reverse=True)
        neg = sorted((s[j] for s, r in zip(scores, rows) if r.targets.get(head) == 0.0), reverse=True)
        t_recall = pos[max(1, math.ceil(target * len(pos))) - 1] if pos else 0.5
        # the (k+1)-th highest allowed score, nudged up, blocks at most k allowed rows
        k = int(budget * len(neg))
        t_fpr = (neg[k] + 1e-6) if k < len(neg) else 0.0
        threshold = float(min(max(t_recall, t_fpr, cal.min_threshold), cal.max_threshold))
        recall = sum(p >= threshold for p in pos) / len(pos) if pos else float("nan")
        fpr = sum(n >= threshold for n in neg) / len(neg) if neg else 0.0
        out[head] = {"threshold": round(threshold, 6), "target_recall": target, "max_fpr": budget,
                     "t_recall": round(float(t_recall), 6), "t_fpr": round(float(t_fpr), 6),
                     "recall": round(recall, 4), "fpr": round(fpr, 4), "positives": len(pos), "negatives": len(neg)}
    return out


# ---------------------------------------------------------------------------------------------
# Training


@dataclass
class ModerationTrainResult:
    run_dir: Path
    adapter_dir: Path
    calibration: dict
    train_seconds: float


def _length_grouped(lengths: list[int], batch_size: int, rng: random.Random) -> list[int]:
    """One epoch's order: shuffled, then sorted by length within chunks of 50 batches, and the
    batches shuffled, so a batch pads little and the epoch stays random."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    chunk = batch_size * 50
    batches = []
    for start in range(0, len(order), chunk):
        part = sorted(order[start:start + chunk], key=lengths.__getitem__)
        batches += [part[i:i + batch_size] for i in range(0, len(part), batch_size)]
    rng.shuffle(batches)
    return [i for b in batches for i in b]


def _frame_and_word_dropout(text: str, rng: random.Random, frame_dropout: float, word_dropout: float) -> str:
    """Drop the opening request frame ("asks for ...") sometimes, and a few random words, so the
    head keys on what is asked for rather than on how a writer phrases the asking."""
    words = text.split()
    if len(words) > 6 and rng.random() < frame_dropout:
        words = words[rng.randint(1, 4):]
    if len(words) > 6 and word_dropout > 0 and rng.random() < 0.5:
        words = [w for w in words if rng.random() >= word_dropout] or words
    return " ".join(words)


def augment(raw: str, canonical_text: str, rng: random.Random, t: "TrainingSection") -> str:
    """The text the classifier trains on this step: now and then an obfuscated copy of the raw
    text, normalised as screening would (so the head learns what normalisation leaves of tricks),
    else the canonical text with frame and word dropout."""
    if t.obfuscation > 0 and rng.random() < t.obfuscation:
        from llmtune.moderation.obfuscate import obfuscate

        return canonical(obfuscate(raw, rng))
    return _frame_and_word_dropout(canonical_text, rng, t.frame_dropout, t.word_dropout)


def _might_block(scores: list[float], row: Row, thresholds: dict[str, float]) -> float:
    return float(bool(row.labels) or any(scores[j] >= 0.5 * thresholds[c] for j, c in enumerate(BUILTIN_CATEGORIES)))


def _train_prefilter(adapter, train_rows, train_text, cal_rows, cal_scores, thresholds):
    console.print("  first stage for bulk screening: scoring the training texts with the classifier ...")
    train_scores = adapter.scores(train_text)
    targets = [_might_block(sc, r, thresholds) for sc, r in zip(train_scores, train_rows)]
    cal_targets = [_might_block(sc, r, thresholds) for sc, r in zip(cal_scores, cal_rows)]
    prefilter = train_prefilter(train_text, targets, [canonical(r.text) for r in cal_rows], cal_targets)
    console.print(f"  first stage: passes {prefilter.meta['calibration_blocked']} of {prefilter.meta['calibration_blocked']} "
                  f"calibration texts the classifier might block, and {prefilter.meta['allowed_passed_share']:.0%} of the rest")
    return prefilter


@dataclass
class Targets:
    """The training rows as the classifier sees them: normalised text, 0/1 targets per head, which
    targets are known (a head learns only from rows that say), and BCE's positive weights."""

    text: list[str]
    card: list[str]  # each row's card, normalised ("" for none)
    cards: list[str]  # the pool a card-less row may draw one from (training.card_augment)
    targets: object  # torch.Tensor [rows, heads]
    known: object  # torch.Tensor [rows, heads]
    positives: object
    negatives: object
    pos_weight: object


def training_targets(train_rows: list, heads: list[str], max_pos_weight: float) -> Targets:
    import torch

    text = [canonical(r.text) for r in train_rows]  # normalised exactly as screening normalises it
    normalised = {c: canonical(c) for c in {r.card for r in train_rows if r.card}}
    card = [normalised.get(r.card, "") for r in train_rows]
    targets = torch.tensor([[r.targets[h] if r.targets.get(h) is not None else 0.0 for h in heads] for r in train_rows])
    known = torch.tensor([[float(r.targets.get(h) is not None) for h in heads] for r in train_rows])
    positives = (targets * known).sum(0)
    negatives = ((1 - targets) * known).sum(0)
    pos_weight = (negatives / positives.clamp(min=1)).sqrt().clamp(1.0, max_pos_weight)
    return Targets(text, card, card_pool(train_rows, normalised), targets, known, positives, negatives, pos_weight)


def card_pool(rows: list[Row], normalised: dict[str, str]) -> list[str]:
    """Cards of allowed conversations that define no minor and cast no real person (by their own
    facts): what a card-less row may be read beside, its labels unchanged."""
    from llmtune.moderation.facts import extract_facts

    allowed = sorted({r.card for r in rows if r.card and all(r.targets.get(c) == 0.0 for c in BUILTIN_CATEGORIES)})
    pool = []
    for card in allowed:
        facts = extract_facts(card, "card", "system")
        if not facts.minor and not facts.real:
            pool.append(normalised[card])
    return pool


@dataclass
class Classifier:
    encoder_dir: Path
    tokenizer: Tokenizer
    model: object  # the PEFT-wrapped encoder
    head: object  # torch.nn.Linear [hidden, heads]
    lora_params: list


def _shown(path: Path) -> str:
    """A training file as the adapter records it: relative to the working directory when inside it (no machine's paths)."""
    return str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else str(path)


def build_classifier(recipe: ModerationRecipe, n_heads: int) -> Classifier:
    """The encoder with LoRA, and a fresh multi-label head."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    from llmtune.lora_dropout import use_masked_dropout

    encoder_dir = resolve_encoder(recipe.encoder.base)
    tokenizer = Tokenizer(encoder_dir, recipe.encoder.max_length, recipe.encoder.context_tokens)
    base = AutoModel.from_pretrained(str(encoder_dir), dtype=torch.float32)
    lora = LoraConfig(r=recipe.lora.rank, lora_alpha=recipe.lora.alpha, lora_dropout=recipe.lora.dropout,
                      target_modules=recipe.lora.target_modules, bias="none")
    model = get_peft_model(base, lora)
    use_masked_dropout(model)  # a CPU classifier: LoRA dropout masks as 16-bit lanes (llmtune/lora_dropout.py)
    head = torch.nn.Linear(base.config.hidden_size, n_heads)
    torch.nn.init.normal_(head.weight, std=0.02)
    torch.nn.init.zeros_(head.bias)
    lora_params = [p for p in model.parameters() if p.requires_grad]
    return Classifier(encoder_dir, tokenizer, model, head, lora_params)


def fit(recipe: ModerationRecipe, clf: Classifier, train_rows: list, data: Targets, rng: random.Random,
        metrics_path: Path) -> tuple[int, float]:
    """The training loop, with a masked loss (a head learns only from rows that say what its target
    is); returns (steps, seconds). Every `logging_steps` a line goes to metrics.jsonl."""
    import torch
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    t = recipe.training
    model, head, tokenizer = clf.model, clf.head, clf.tokenizer
    steps_per_epoch = math.ceil(len(train_rows) / t.batch_size)
    total_steps = t.max_steps if t.max_steps > 0 else max(1, int(steps_per_epoch * t.epochs))
    optimizer = torch.optim.AdamW(
        [{"params": clf.lora_params, "lr": t.learning_rate}, {"params": head.parameters(), "lr": t.head_learning_rate}],
        weight_decay=t.weight_decay,
    )
    warmup = int(total_steps * t.warmup_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / max(1, warmup) if s < warmup else max(0.0, (total_steps - s) / max(1, total_steps - warmup))
    )
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=data.pos_weight, reduction="none")

    model.train()
    head.train()
    bf16 = t.precision == "bfloat16" or (t.precision == "auto" and native_bf16())
    lengths = [len(x) for x in tokenizer.truncated(data.text, data.card)]
    console.print(f"  training in {'bfloat16 autocast (native on this CPU)' if bf16 else 'float32'}; batches grouped by length; "
                  f"{sum(map(bool, data.card))} rows read beside their card, {len(data.cards)} cards to draw from")
    start = time.time()
    order: list[int] = []
    running = 0.0
    with metrics_path.open("w", encoding="utf-8") as metrics, Progress(
        "training", BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[loss]}"), TimeRemainingColumn(), console=console,
    ) as bar:
        task = bar.add_task("train", total=total_steps, loss="")
        for step in range(1, total_steps + 1):
            if len(order) < t.batch_size:
                order += _length_grouped(lengths, t.batch_size, rng)
            batch, order = order[: t.batch_size], order[t.batch_size:]
            texts = [augment(train_rows[i].text, data.text[i], rng, t) for i in batch]
            cards = [data.card[i] or (rng.choice(data.cards) if data.cards and rng.random() < t.card_augment else "")
                     for i in batch]
            ids, mask, types, pool = batch_tensors(tokenizer.truncated(texts, cards))
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):  # LoRA and head weights stay float32
                hidden = model(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
            logits = head(torch.nn.functional.dropout(mean_pool(hidden.float(), pool), 0.1, training=True))
            m = data.known[batch]
            loss = (loss_fn(logits, data.targets[batch]) * m).sum() / m.sum().clamp(min=1)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(clf.lora_params + list(head.parameters()), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            running += loss.item()
            if step % t.logging_steps == 0 or step == total_steps:
                avg = running / (t.logging_steps if step % t.logging_steps == 0 else step % t.logging_steps)
                running = 0.0
                metrics.write(json.dumps({"step": step, "loss": round(avg, 5), "lr": scheduler.get_last_lr()[0]}) + "\n")
                metrics.flush()
                bar.update(task, loss=f"loss {avg:.4f}")
            bar.advance(task)
    return total_steps, time.time() - start


def save_provisional(recipe: ModerationRecipe, clf: Classifier, heads: list[str], tmp: Path) -> dict:
    """PEFT adapter (loads with PeftModel.from_pretrained), head, and a config with placeholder
    thresholds, in `tmp`; returns the config to finish after calibration."""
    from safetensors.torch import save_file

    shutil.rmtree(tmp, ignore_errors=True)
    clf.model.save_pretrained(str(tmp))
    # Name the hub id, not this machine's path, as the base (offline users pass the local MiniLM dir).
    peft_cfg = json.loads((tmp / "adapter_config.json").read_text())
    peft_cfg["base_model_name_or_path"] = ENCODER_HUB_ID
    (tmp / "adapter_config.json").write_text(json.dumps(peft_cfg, indent=2))
    head = clf.head
    save_file({"weight": head.weight.detach().contiguous(), "bias": head.bias.detach().contiguous()}, str(tmp / HEAD_NAME))
    meta = {
        "format_version": 2,
        "encoder": recipe.encoder.base if recipe.encoder.base == EMBEDDED_ENCODER else str(clf.encoder_dir),
        "encoder_hub_id": ENCODER_HUB_ID,
        "categories": heads,
        "hard_floor": list(HARD_FLOOR),
        "signals": list(SIGNALS),
        "thresholds": dict.fromkeys(BUILTIN_CATEGORIES, 0.5),
        "signal_thresholds": dict.fromkeys(SIGNALS, 0.5),
        "max_length": recipe.encoder.max_length,
        "context_tokens": recipe.encoder.context_tokens,
        "pooling": "mean",
        "normalisation": "llmtune.moderation.normalize.canonical",
    }
    (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2))
    return meta


def _calibrate_and_freeze(recipe: ModerationRecipe, adapter_dir: Path, meta: dict, train_rows: list[Row],
                          cal_rows: list[Row], train_text: list[str]) -> dict:
    """Thresholds from the calibration slice, read through the same fast path the screener uses
    (each text with its card), then the bulk first stage distilled from the classifier: its target
    is "the classifier might block this" (any blocking head at half its threshold or more, or a
    blocking label), and its threshold lets every such calibration text through. Writes
    moderation.json and prefilter.npz into `adapter_dir`; returns the per-head calibration."""
    adapter = ModerationAdapter(adapter_dir, precision="float32")  # thresholds are calibrated in float32
    cal_cards = [canonical(r.card) if r.card else "" for r in cal_rows]
    cal_scores = adapter.scores([canonical(r.text) for r in cal_rows], contexts=cal_cards)
    cal = calibrate(cal_scores, cal_rows, HEADS, recipe.calibration)
    meta["thresholds"] = {c: cal[c]["threshold"] for c in BUILTIN_CATEGORIES}
    meta["signal_thresholds"] = {c: cal[c]["threshold"] for c in SIGNALS}
    meta["calibration"] = {"rows": len(cal_rows), "fraction": recipe.data.calibration_fraction, "per_head": cal}
    prefilter = _train_prefilter(adapter, train_rows, train_text, cal_rows, cal_scores, meta["thresholds"])
    prefilter.save(adapter_dir / PREFILTER_NAME)
    meta["prefilter"] = prefilter.meta
    (adapter_dir / CONFIG_NAME).write_text(json.dumps(meta, indent=2))
    console.print("  calibrated thresholds (calibration slice, classifier alone):")
    for c in HEADS:
        k = cal[c]
        console.print(f"    {c:22s} t={k['threshold']:.3f}  recall {k['recall']:.3f} (target {k['target_recall']})  "
                      f"FPR {k['fpr']:.3f} (budget {k['max_fpr']})  [{k['positives']}+/{k['negatives']}-]")
    return cal


def recalibrate_moderation(recipe: ModerationRecipe, adapter_dir: Path) -> dict:
    """A trained adapter's thresholds again, under the recipe's `calibration` section (other
    budgets or recall targets), on the same slice of the recipe's data; no retraining. The
    adapter must have been trained on that data (its moderation.json names the files)."""
    from llmtune.distributed import configure_threads

    configure_threads(recipe.training.num_threads)
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / CONFIG_NAME).is_file():
        raise ModerationError(f"{adapter_dir}: no {CONFIG_NAME}; pass the adapter directory (runs/NAME/adapter)")
    meta = json.loads((adapter_dir / CONFIG_NAME).read_text(encoding="utf-8"))
    train_rows, cal_rows, files = load_training_data(recipe)
    trained_on = meta.get("training", {}).get("files", {})
    now = {_shown(p): file_sha256(p)[:16] for p in files}
    if trained_on and trained_on != now:
        changed = sorted(set(trained_on.items()) ^ set(now.items()))
        raise ModerationError(f"{adapter_dir}: trained on other data than recipe {recipe.source_path} reads "
                              f"({', '.join(sorted({k for k, _ in changed}))} differ); calibrate with the recipe it was trained with")
    console.print(f"moderation calibrate: {adapter_dir} on a calibration slice of {len(cal_rows)} rows")
    return _calibrate_and_freeze(recipe, adapter_dir, meta, train_rows, cal_rows, [canonical(r.text) for r in train_rows])


def train_moderation(recipe: ModerationRecipe) -> ModerationTrainResult:
    """Data, classifier, fit, save, calibrate, distil the bulk prefilter, freeze: in that order."""
    import torch

    from llmtune.distributed import configure_threads

    t = recipe.training
    threads = configure_threads(t.num_threads)
    torch.manual_seed(t.seed)
    rng = random.Random(t.seed)
    heads = list(HEADS)
    run_dir = recipe.run_dir
    adapter_dir = run_dir / "adapter"
    run_dir.mkdir(parents=True, exist_ok=True)

    # 1. Data, normalised exactly as screening normalises it; a calibration slice held out.
    train_rows, cal_rows, files = load_training_data(recipe)
    data = training_targets(train_rows, heads, t.max_pos_weight)
    console.print(
        f"moderation train: {len(train_rows)} texts ({int(((data.targets[:, :len(BUILTIN_CATEGORIES)]).sum(1) > 0).sum())} blocked) "
        f"from {len(files)} files; calibration slice {len(cal_rows)}; {threads} threads"
    )
    console.print("  positives/negatives per head: "
                  + ", ".join(f"{h}={int(p)}/{int(n)}" for h, p, n in zip(heads, data.positives, data.negatives)))

    # 2. Encoder + LoRA + head.
    clf = build_classifier(recipe, len(heads))
    n_lora = sum(p.numel() for p in clf.lora_params)
    console.print(f"  encoder {clf.encoder_dir.name}: LoRA r={recipe.lora.rank} on {n_lora:,} params "
                  f"+ head {clf.head.weight.numel() + len(heads):,}")

    # 3. Train.
    total_steps, train_seconds = fit(recipe, clf, train_rows, data, rng, run_dir / "metrics.jsonl")

    # 4. Save: PEFT adapter, head, provisional config.
    tmp = run_dir / ".adapter-tmp"
    meta = save_provisional(recipe, clf, heads, tmp)

    # 5-6. Calibrate on the held-out slice, distil the bulk first stage, freeze.
    meta["training"] = {
        "recipe": recipe.name, "files": {_shown(p): file_sha256(p)[:16] for p in files}, "rows": len(train_rows),
        "steps": total_steps, "batch_size": t.batch_size, "seed": t.seed, "lora_rank": recipe.lora.rank,
        "lora_alpha": recipe.lora.alpha, "seconds": round(train_seconds, 1),
    }
    cal = _calibrate_and_freeze(recipe, tmp, meta, train_rows, cal_rows, data.text)
    shutil.rmtree(adapter_dir, ignore_errors=True)
    tmp.rename(adapter_dir)
    (run_dir / "recipe.yaml").write_text(
        f"# Fully resolved moderation recipe from {recipe.source_path}\n"
        + yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
    )
    size = sum(f.stat().st_size for f in adapter_dir.iterdir()) / 1e6
    console.print(f"done: adapter {adapter_dir} ({size:.1f} MB) in {train_seconds:.0f}s")
    return ModerationTrainResult(run_dir, adapter_dir, cal, train_seconds)
