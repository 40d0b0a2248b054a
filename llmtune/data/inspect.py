"""`llmtune data inspect FILE...`: what prepare would make of some files, without a recipe or a run."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from rich.text import Text

from llmtune.config import DataConfig, DataSource, ModelConfig, Recipe
from llmtune.console import console
from llmtune.data.prepare import collect, load_template
from llmtune.data.template import IGNORE_INDEX, TokenizedConversation


@dataclass
class Inspection:
    read: int
    kept: int
    quarantined: int
    duplicates: int
    formats: dict[str, int]
    reasons: dict[str, int]
    sample: TokenizedConversation | None

    def to_json(self) -> dict:
        return {"read": self.read, "kept": self.kept, "quarantined": self.quarantined,
                "duplicates": self.duplicates, "formats": self.formats, "reasons": self.reasons}


def inspect_files(
    paths: list[Path], base: str = "embedded:smollm2-135m-instruct", chat_template: str | None = None,
    mask: str = "assistant", max_seq_length: int = 4096,
) -> tuple[Inspection, object]:
    """Detect, validate, dedup and template `paths` as prepare would. Returns the counts and the tokenizer."""
    recipe = Recipe(
        name="inspect",
        model=ModelConfig(base=base, chat_template=chat_template),
        data=DataConfig(sources=[DataSource(path=str(p)) for p in paths], mask=mask, max_seq_length=max_seq_length),
    )
    tokenizer, template = load_template(recipe)
    found = collect(recipe, tokenizer, template)
    formats: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    for s in found.sources:
        formats.update(s.formats)
        reasons.update(s.reasons)
    result = Inspection(
        read=sum(s.read for s in found.sources),
        kept=sum(s.kept for s in found.sources),
        quarantined=sum(s.quarantined for s in found.sources),
        duplicates=sum(s.duplicates for s in found.sources),
        formats=dict(formats),
        reasons=dict(reasons),
        sample=found.kept[0][1] if found.kept else None,
    )
    return result, tokenizer


def highlighted(tokenizer, tok: TokenizedConversation) -> Text:
    """The rendered conversation with the tokens that carry loss in bold green."""
    text = Text()
    for token_id, label in zip(tok.input_ids, tok.labels):
        text.append(tokenizer.decode([token_id]), style="bold green" if label != IGNORE_INDEX else "dim")
    return text


def print_inspection(result: Inspection, tokenizer) -> None:
    console.print(
        f"read {result.read} = kept {result.kept} + quarantined {result.quarantined} + duplicates {result.duplicates}"
    )
    console.print("formats: " + (", ".join(f"{k} {v}" for k, v in sorted(result.formats.items())) or "-"))
    for reason, n in sorted(result.reasons.items()):
        console.print(f"  quarantined {reason}: {n}")
    if result.sample is not None:
        console.print("sample (trained tokens in bold green):")
        console.print(highlighted(tokenizer, result.sample))
