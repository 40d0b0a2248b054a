"""`llmtune data inspect FILE...`: what prepare would make of some files, without a recipe or a run."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from rich.text import Text

from llmtune.config import DataConfig, DataSource, ModelConfig, PreferenceConfig, PreferenceSource, Recipe
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
    pairs: int = 0  # preference pairs the files yield (pair rows, SillyTavern swipes), as prepare keeps them
    preference: dict = field(default_factory=dict)  # the preference reading's counts (read, kept, ..., reasons)

    def to_json(self) -> dict:
        return {"read": self.read, "kept": self.kept, "quarantined": self.quarantined,
                "duplicates": self.duplicates, "formats": self.formats, "reasons": self.reasons,
                "pairs": self.pairs, "preference": self.preference}


def inspect_files(
    paths: list[Path], base: str = "embedded:smollm2-135m-instruct", chat_template: str | None = None,
    mask: str = "assistant", max_seq_length: int = 4096,
) -> tuple[Inspection, object]:
    """Detect, validate, dedup and template `paths` as prepare would. Returns the counts and the tokenizer."""
    recipe = Recipe(
        name="inspect",
        model=ModelConfig(base=base, chat_template=chat_template),
        data=DataConfig(sources=[DataSource(path=str(p)) for p in paths], mask=mask, max_seq_length=max_seq_length),
        # method kto keeps single desirable/undesirable rows too, so every judgment is counted.
        preference=PreferenceConfig(method="kto", sources=[PreferenceSource(path=str(p)) for p in paths]),
    )
    tokenizer, template = load_template(recipe)
    found = collect(recipe, tokenizer, template)
    from llmtune.data.preference import collect_preference

    pref = collect_preference(recipe, tokenizer, template)
    pref_reasons: Counter[str] = Counter()
    for s in pref.sources:
        pref_reasons.update(s.reasons)
    preference = {k: sum(getattr(s, k) for s in pref.sources)
                  for k in ("read", "kept", "quarantined", "duplicates", "pairs", "desirable", "undesirable", "truncated")}
    preference["rejected_blocked"] = sum(sum(s.rejected_blocked.values()) for s in pref.sources)
    preference["reasons"] = dict(pref_reasons)
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
        pairs=preference["pairs"],
        preference=preference,
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
    p = result.preference
    if p.get("kept"):
        console.print(f"preference: {result.pairs} pairs, {p['desirable']} desirable and {p['undesirable']} undesirable "
                      f"rows (read {p['read']} = kept {p['kept']} + quarantined {p['quarantined']} + duplicates "
                      f"{p['duplicates']})")
        for reason, n in sorted(p["reasons"].items()):
            console.print(f"  preference quarantined {reason}: {n}")
    if result.sample is not None:
        console.print("sample (trained tokens in bold green):")
        console.print(highlighted(tokenizer, result.sample))
