"""The run directory: where each stage leaves its files and where the next stage finds them.

Stages talk to each other only through these files. `RunDir` names every one of them (one typed
path per artifact); `PreparedData` / `PreparedPreference` are what prepare hands to train, eval,
merge, export and review; `trained_adapter`, `adapter_origin` and `sample_prompts` are what the
later stages read back. This module sits below every stage: it imports `llmtune.errors` (and, for
`served_model`, the recipe loader and `models.resolve_base`).

    runs/NAME/
      recipe.yaml               the resolved recipe (config.save_resolved)
      data/prepared.json        PreparedData: splits, tokenized splits, counts per source
      data/data_report.md       prepare's report (token histograms, a rendered sample)
      data/preference/...       PreparedPreference (a recipe with a `preference:` section)
      checkpoints/ metrics.jsonl samples.jsonl loss_curve.png tensorboard/   train
      adapter/                  the run's adapter (train's, or the preference stage's with llmtune.json)
      sft_adapter/              train's adapter, kept once the preference stage replaced adapter/
      preference/               the preference stage's checkpoints, metrics and curve
      eval.json eval_*.png      eval
      merged/                   merge (a full model: config.json, safetensors)
      export/                   export (app presets, GGUF)
      review/vs-*/              blind side-by-side reviews
      report.md                 the run report, written by `llmtune run` / the CLI after each stage
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING

from llmtune.errors import LlmtuneError

if TYPE_CHECKING:
    from llmtune.config import Recipe

# In adapter/ when the preference stage wrote it: what it holds and what came before.
ADAPTER_MARKER = "llmtune.json"


@dataclass(frozen=True)
class RunDir:
    """The layout of one run directory: a path per artifact, nothing created until a stage writes it."""

    root: Path

    @property
    def recipe(self) -> Path:
        return self.root / "recipe.yaml"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def prepared(self) -> Path:
        return self.data / "prepared.json"

    @property
    def data_report(self) -> Path:
        return self.data / "data_report.md"

    @property
    def preference_data(self) -> Path:
        return self.data / "preference"

    @property
    def preference_prepared(self) -> Path:
        return self.preference_data / "prepared.json"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def samples(self) -> Path:
        return self.root / "samples.jsonl"

    @property
    def loss_curve(self) -> Path:
        return self.root / "loss_curve.png"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def adapter(self) -> Path:
        return self.root / "adapter"

    @property
    def sft_adapter(self) -> Path:
        return self.root / "sft_adapter"

    @property
    def preference(self) -> Path:
        return self.root / "preference"

    @property
    def preference_adapter(self) -> Path:
        return self.preference / "adapter"

    @property
    def preference_metrics(self) -> Path:
        return self.preference / "metrics.jsonl"

    @property
    def preference_curve(self) -> Path:
        return self.root / "preference_curve.png"

    @property
    def eval_json(self) -> Path:
        return self.root / "eval.json"

    @property
    def merged(self) -> Path:
        return self.root / "merged"

    @property
    def export(self) -> Path:
        return self.root / "export"

    @property
    def review(self) -> Path:
        return self.root / "review"

    @property
    def ranks(self) -> Path:
        return self.root / "ranks.json"

    @property
    def report(self) -> Path:
        return self.root / "report.md"

    def has_adapter(self) -> bool:
        return (self.adapter / "adapter_config.json").exists()

    def has_merged(self) -> bool:
        return (self.merged / "config.json").exists()


# ---------------------------------------------------------------------------------------------
# prepare -> train, eval, merge, export, review


@dataclass
class Counts:
    """What prepare did with one source's rows; read = kept + quarantined + duplicates (+ sampled out)."""

    path: str
    origin: str | None
    license: str | None
    read: int = 0
    kept: int = 0
    quarantined: int = 0
    duplicates: int = 0
    truncated: int = 0
    reshaped: int = 0
    screened: int = 0  # rows (conversations, examples) the moderation screen saw
    reasons: dict[str, int] = field(default_factory=dict)  # quarantined rows per reason
    formats: dict[str, int] = field(default_factory=dict)  # kept rows per input format
    moderation: dict[str, int] = field(default_factory=dict)  # rows quarantined by the screen, per category


@dataclass
class SourceCounts(Counts):
    sampled_out: int = 0  # left out by the source's max_samples / weight < 1
    copies: int = 0  # extra training rows from weight > 1
    screened_full: int = 0  # of the screened, conversations with a cue, screened by rules and adapter
    pii: dict[str, int] = field(default_factory=dict)  # personal data found per kind (redacted or quarantined)
    pii_conversations: int = 0  # conversations that held any


@dataclass
class Totals:
    """Totals over every source of one prepare; read = kept + quarantined + duplicates (+ sampled out)."""

    read: int = 0
    kept: int = 0
    quarantined: int = 0
    duplicates: int = 0
    truncated: int = 0  # cut at a turn boundary to fit data.max_seq_length
    reshaped: int = 0  # turns merged or reordered to fit the chat template
    screened: int = 0  # rows the moderation screen saw
    moderation: dict[str, int] = field(default_factory=dict)  # rows quarantined by the screen, per category
    train: int = 0  # rows in each split
    val: int = 0
    max_tokens: int = 0  # the longest row, in tokens

    @classmethod
    def over(cls, sources: list, **split) -> Totals:
        """Every field the sources count too, summed over them (per-key counts merged key by key);
        `split` gives the rest (the splits' sizes, token totals)."""
        summed: dict = {}
        for f in fields(cls):
            if f.name in split or not sources or not hasattr(sources[0], f.name):
                continue
            values = [getattr(s, f.name) for s in sources]
            summed[f.name] = ({k: sum(v.get(k, 0) for v in values) for k in sorted({k for v in values for k in v})}
                              if isinstance(values[0], dict) else sum(values))
        return cls(**summed, **split)

    @classmethod
    def from_json(cls, doc: dict) -> Totals:
        """From prepared.json; keys another llmtune version wrote and this one lacks are ignored."""
        return cls(**{k: v for k, v in doc.items() if k in cls.__dataclass_fields__})


@dataclass
class PreparedCounts(Totals):
    """`PreparedData.counts`: what prepare did with the SFT sources, in all."""

    sampled_out: int = 0
    copies: int = 0
    screened_full: int = 0  # of the screened, conversations with a cue, screened by rules and adapter
    pii: dict[str, int] = field(default_factory=dict)
    pii_conversations: int = 0
    pii_mode: str = "redact"
    train_tokens: int = 0
    trained_tokens: int = 0  # the tokens that carry loss


@dataclass
class PreferenceCounts(Totals):
    """`PreparedPreference.counts`: what prepare did with the preference sources, in all."""

    pairs: int = 0
    desirable: int = 0
    undesirable: int = 0
    rejected_blocked: dict[str, int] = field(default_factory=dict)  # rejected replies dropped, per category
    val_pairs: int = 0
    train_rows: int = 0  # rows in the method's training shape


def _save_json(obj, path: Path) -> None:
    d = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(obj).items()}
    path.write_text(json.dumps(d, indent=2, ensure_ascii=False))


def _load_json(path: Path, paths: tuple[str, ...], source_type, counts_type: type[Totals]) -> dict:
    meta = json.loads(path.read_text())
    meta["counts"] = counts_type.from_json(meta["counts"])
    meta["sources"] = [source_type(**s) for s in meta["sources"]]
    for key in paths:
        meta[key] = Path(meta[key])
    return meta


@dataclass
class PreparedData:
    """Paths and counts the later stages read. Everything lives under run_dir/data."""

    data_dir: Path
    train_jsonl: Path
    val_jsonl: Path
    train_tokenized: Path
    val_tokenized: Path
    quarantine: Path
    report: Path
    chat_template: str
    end_of_turn: str
    counts: PreparedCounts
    sources: list[SourceCounts]
    seconds: dict[str, float] = field(default_factory=dict)  # wall time per phase, for benchmarks

    _PATHS = ("data_dir", "train_jsonl", "val_jsonl", "train_tokenized", "val_tokenized", "quarantine", "report")

    @classmethod
    def load(cls, run_dir: Path) -> PreparedData:
        return cls(**_load_json(RunDir(run_dir).prepared, cls._PATHS, SourceCounts, PreparedCounts))

    def persona(self) -> str | None:
        """The system turn of the first training conversation: the persona the run learned."""
        if not self.train_jsonl.exists():
            return None
        with self.train_jsonl.open(encoding="utf-8") as f:
            messages = json.loads(f.readline() or "{}").get("messages", [])
        return messages[0]["content"] if messages and messages[0]["role"] == "system" else None

    def fingerprint(self) -> str:
        """sha256 of what training reads (both splits and the template): equal on every node that sees
        the same prepared data."""
        import hashlib

        digest = hashlib.sha256(self.chat_template.encode())
        for path in (self.train_jsonl, self.val_jsonl):
            with path.open("rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
        return digest.hexdigest()[:16]

    def fixed_conversations(self, limit: int = 4) -> list[list[dict]]:
        """A few of the run's own conversations (validation first): fixed inputs for merge's and
        export's checks."""
        source = self.val_jsonl if self.counts.val else self.train_jsonl
        return [json.loads(line)["messages"] for line in source.read_text(encoding="utf-8").splitlines()[:limit]]

    def save(self) -> None:
        _save_json(self, self.data_dir / "prepared.json")


def reconciliation(c: Totals) -> str:
    """`read N = kept K + quarantined Q + duplicates D` (+ sampled out, + weighted copies when used)."""
    text = f"read {c.read} = kept {c.kept} + quarantined {c.quarantined} + duplicates {c.duplicates}"
    if getattr(c, "sampled_out", 0):
        text += f" + sampled out {c.sampled_out}"
    if getattr(c, "copies", 0):
        text += f"; {c.copies} weighted copies added"
    return text


@dataclass
class PreferenceSourceCounts(Counts):
    pairs: int = 0  # kept examples with both replies
    desirable: int = 0  # kept single rows (KTO only)
    undesirable: int = 0
    rejected_blocked: dict[str, int] = field(default_factory=dict)  # rejected replies dropped, per category


@dataclass
class PreparedPreference:
    """Paths and counts the preference stage and eval read; everything under run_dir/data/preference."""

    data_dir: Path
    method: str
    train_jsonl: Path
    val_jsonl: Path
    train_tokenized: Path  # the method's shape: pairs, or KTO rows (prompt_ids, completion_ids, label)
    val_tokenized: Path
    val_pairs_tokenized: Path  # held-out pairs (any method): preference accuracy and reward margin
    quarantine: Path
    counts: PreferenceCounts
    sources: list[PreferenceSourceCounts]

    _PATHS = ("data_dir", "train_jsonl", "val_jsonl", "train_tokenized", "val_tokenized", "val_pairs_tokenized",
              "quarantine")

    @classmethod
    def load(cls, run_dir: Path) -> PreparedPreference:
        from llmtune.errors import DataError

        path = RunDir(run_dir).preference_prepared
        if not path.exists():
            raise DataError(f"no prepared preference data in {path.parent}; run `llmtune prepare` with a "
                            "`preference:` section in the recipe first")
        return cls(**_load_json(path, cls._PATHS, PreferenceSourceCounts, PreferenceCounts))

    def save(self) -> None:
        _save_json(self, self.data_dir / "prepared.json")


def preference_reconciliation(c: PreferenceCounts) -> str:
    return reconciliation(c)


# ---------------------------------------------------------------------------------------------
# train -> eval, merge, export, review, serve


def trained_adapter(recipe: Recipe) -> Path:
    """The run's adapter directory, or an error saying to train first (eval and merge need it)."""
    run = RunDir(recipe.run_dir)
    if not run.has_adapter():
        raise LlmtuneError(f"no trained adapter in {run.adapter}; run the train stage first (llmtune train {recipe.source_path})")
    return run.adapter


def adapter_origin(run_dir: Path) -> dict | None:
    """What the preference stage recorded in adapter/ (None when adapter/ is the train stage's)."""
    marker = RunDir(run_dir).adapter / ADAPTER_MARKER
    return json.loads(marker.read_text()) if marker.exists() else None


def sample_prompts(recipe: Recipe, prepared: PreparedData) -> list[list[dict]]:
    """The recipe's fixed prompts as chats, behind the recipe's or the data's system prompt."""
    system = recipe.eval.system_prompt if recipe.eval.system_prompt is not None else prepared.persona()
    head = [{"role": "system", "content": system}] if system else []
    return [head + [{"role": "user", "content": p}] for p in recipe.eval.prompts]


def read_metrics(path: Path) -> list[dict]:
    """The trainer's log records (metrics.jsonl): loss, lr, eval_loss... each with its step."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@dataclass
class ServedModel:
    """What `llmtune serve TARGET` loads for a run or model directory."""

    model: str  # a model directory or hub id vLLM loads
    served_name: str
    adapters: dict[str, str]  # LoRA adapters by model name
    recipe: Recipe | None = None


def served_model(target: Path, name: str | None = None, adapters: dict[str, str] | None = None) -> ServedModel:
    """A run directory serves its merged model when there is one, else its base with the adapter; a
    model directory serves as is."""
    from llmtune.config import load_recipe
    from llmtune.models import resolve_base

    target, adapters = Path(target), dict(adapters or {})
    run = RunDir(target)
    if run.recipe.exists():
        recipe = load_recipe(run.recipe)
        name = name or recipe.name
        if run.has_merged():
            return ServedModel(str(run.merged), name, adapters, recipe)
        if run.has_adapter():
            adapters.setdefault(name, str(run.adapter))
            return ServedModel(resolve_base(recipe.model.base, recipe.model.revision), f"{name}-base", adapters, recipe)
        raise LlmtuneError(f"{target} has neither merged/ nor adapter/; train (and merge) first")
    if (target / "config.json").exists():
        return ServedModel(str(target), name or target.name, adapters)
    raise LlmtuneError(f"{target} is neither a run directory (recipe.yaml) nor a model directory (config.json)")
