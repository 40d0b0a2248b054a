"""Preference data for the preference stage: read, validate, dedup, screen both sides, template,
mask, truncate at turn boundaries, split. Called by `prepare` when the recipe has `preference:`.

Entry point: `prepare_preference(recipe, tokenizer, template) -> PreparedPreference`. The same
guarantees as conversations: every item read (a pair, a KTO row, one swipe against its kept
message, or a row that could not be read) is kept, quarantined with file, line and reason, or a
duplicate, and the counts reconcile (read = kept + quarantined + duplicates).

Screening covers both sides: prompt + chosen reply and prompt + rejected reply are each screened
as a conversation. A blocked chosen side quarantines the example; a blocked rejected reply is
dropped from the pair and counted (`rejected_blocked`), and what is left is a desirable-only row
(KTO trains on it; pair methods quarantine it as `unpaired`).

Tokens follow the run's chat template and masks: the prompt is everything the template renders
before the reply, the reply is its content plus the end-of-turn token (never the newline some
templates write after it), as in the SFT masks. A prompt too long for data.max_seq_length loses
its oldest exchanges (the system prompt stays) until the longest reply fits; if even the last
turn does not fit, the example is quarantined as `too_long`.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass

from rich.progress import track

from llmtune.artifacts import (
    PreferenceCounts,
    PreferenceSourceCounts,
    PreparedPreference,
    RunDir,
    preference_reconciliation,
)
from llmtune.config import Recipe
from llmtune.console import console
from llmtune.data.dedup import NearDuplicateIndex
from llmtune.data.pairs import read_preference_source
from llmtune.data.template import IGNORE_INDEX, fit_to_template, tokenize_rendered, trained_spans
from llmtune.data.types import Conversation, Message, PreferenceExample, Rejection
from llmtune.errors import DataError, TemplateError
from llmtune.jsonl import write_rejections

PAIR_METHODS = ("dpo", "orpo", "simpo")


@dataclass
class TokenizedExample:
    prompt_ids: list[int]
    chosen_ids: list[int] | None
    rejected_ids: list[int] | None


@dataclass
class CollectedPreference:
    kept: list[tuple[PreferenceExample, TokenizedExample]]
    rejections: list[Rejection]
    duplicates: list[dict]
    sources: list[PreferenceSourceCounts]


# ---------------------------------------------------------------------------------------------
# Templating, masks and truncation


def _without_oldest_exchange(prompt: list[Message]) -> list[Message] | None:
    """The prompt without its oldest exchange (up to the next user turn), system prompt kept; None
    when only the last turn is left."""
    head = prompt[:1] if prompt and prompt[0].role == "system" else []
    rest = prompt[len(head):]
    j = 1
    while j < len(rest) and rest[j].role != "user":
        j += 1
    return head + rest[j:] if j < len(rest) else None


def _tokenize_sides(tokenizer, template: str, prompt: list[Message], replies: list[str]
                    ) -> tuple[list[int], list[list[int]], str | None]:
    """(prompt ids, reply ids per reply, reshape note) under the template and the SFT masks."""
    rendered, change = [], None
    for reply in replies:
        messages, change = fit_to_template(tokenizer, [*prompt, Message("assistant", reply)], template)
        if messages[-1] != Message("assistant", reply):
            raise TemplateError("the chat template merges the reply into the turn before it (the prompt ends with an "
                                "assistant turn it will not render next to another); set model.chat_template to one "
                                "that does")
        rendered.append(trained_spans(tokenizer, messages, template, "last"))
    prompts, outs = [], []
    for tok in tokenize_rendered(tokenizer, rendered):
        trained = [i for i, label in enumerate(tok.labels) if label != IGNORE_INDEX]
        if not trained:
            raise TemplateError("the reply has no token with loss under this chat template")
        prompts.append(tok.input_ids[: trained[0]])
        outs.append(tok.input_ids[trained[0]: trained[-1] + 1])
    if any(p != prompts[0] for p in prompts):
        raise TemplateError("the prompt tokenizes differently before the chosen and the rejected reply")
    return prompts[0], outs, change


def tokenize_example(tokenizer, template: str, example: PreferenceExample, max_len: int
                     ) -> tuple[PreferenceExample, TokenizedExample, bool, str | None]:
    """The example's tokens, its oldest exchanges dropped until prompt + longest reply fit `max_len`.
    Returns (example, tokens, truncated, reshape note); raises TemplateError or ValueError (too long)."""
    replies = [r for r in (example.chosen, example.rejected) if r is not None]
    prompt, truncated = example.prompt, False
    while True:
        prompt_ids, outs, change = _tokenize_sides(tokenizer, template, prompt, replies)
        longest = max(len(o) for o in outs)
        if len(prompt_ids) + longest <= max_len:
            break
        shorter = _without_oldest_exchange(prompt)
        if shorter is None:
            raise ValueError(f"{len(prompt_ids) + longest} tokens with only the last turn left in the prompt; "
                             f"exceeds data.max_seq_length={max_len}")
        prompt, truncated = shorter, True
    if truncated:
        example = PreferenceExample(prompt, example.chosen, example.rejected, example.source, example.line,
                                    {**example.meta, "truncated": True})
    it = iter(outs)
    tokens = TokenizedExample(prompt_ids, next(it) if example.chosen is not None else None,
                              next(it) if example.rejected is not None else None)
    return example, tokens, truncated, change


# ---------------------------------------------------------------------------------------------
# Screening both sides


def screen_sides(screener, sides: list[list[str]]) -> list:
    """One Decision per side: the prompt's messages and the reply, screened as one conversation
    (what one message establishes, a minor's age or a real person, holds for the others). Bulk
    cascade (Screener.screen_conversations with `fast`): a side no rule or fact could block and
    whose texts the classifier's first stage clears is allowed without the full screen. Texts
    shared between sides (a prompt screened for both replies) hit the screener's text cache."""
    conversations = []
    for parts in sides:
        parts = [p for p in parts if p.strip()]
        conversations.append([{"role": "assistant" if i == len(parts) - 1 and i else "user", "content": p}
                              for i, p in enumerate(parts)])
    return screener.screen_conversations(conversations, progress=len(conversations) > 2000, fast=True)


# ---------------------------------------------------------------------------------------------
# Collect


def _side_conversation(example: PreferenceExample, reply: str) -> Conversation:
    """What near-duplicate detection compares on one side: the last prompt turn and the reply."""
    return Conversation([*example.prompt[-1:], Message("assistant", reply)])


def collect_preference(recipe: Recipe, tokenizer, template: str) -> CollectedPreference:
    """Read, validate, dedup, screen, fit to the method, template, mask and truncate every
    preference source. Counts reconcile per source: read = kept + quarantined + duplicates."""
    from llmtune.moderation import load_screener

    pcfg, dcfg = recipe.preference, recipe.data
    assert pcfg is not None
    screener = load_screener(recipe.moderation)  # the hard floor holds even with moderation.enabled false
    near = {kind: NearDuplicateIndex(dcfg.near_dup_threshold) for kind in ("chosen", "rejected")} \
        if dcfg.dedup == "near" else None
    seen: dict[str, str] = {}
    kept: list[tuple[PreferenceExample, TokenizedExample]] = []
    rejections: list[Rejection] = []
    duplicates: list[dict] = []
    per_source: list[PreferenceSourceCounts] = []

    for src in pcfg.sources:
        counts = PreferenceSourceCounts(path=src.path, origin=src.origin, license=src.license)
        per_source.append(counts)
        reasons: Counter[str] = Counter()

        def quarantine(item: PreferenceExample | Rejection, reason: str, detail: str) -> None:
            if isinstance(item, PreferenceExample):
                item = Rejection(item.source, item.line, reason, detail, json.dumps(item.to_trl(), ensure_ascii=False)[:300])
            rejections.append(item)
            reasons[reason] += 1

        items = list(track(read_preference_source(src, recipe.resolve_path), description=f"reading {src.path}",
                           console=console, transient=True))
        counts.read = len(items)

        # 1. Exact and near duplicates (near: both sides near-duplicates of one earlier example).
        unique: list[PreferenceExample] = []
        for item in items:
            if isinstance(item, Rejection):
                quarantine(item, item.reason, item.detail)
                continue
            where = f"{item.source}:{item.line}"
            first = seen.get(item.content_hash)
            kind = "exact"
            if first is None and near is not None:
                sides = {side: near[side].signature(_side_conversation(item, reply))
                         for side, reply in (("chosen", item.chosen), ("rejected", item.rejected)) if reply is not None}
                hits = set.intersection(*(near[side].matches(sig) for side, sig in sides.items()))
                hits = {h for h in hits if h.split("\0")[1] == item.kind}  # a pair never repeats a single row
                if hits:
                    first, kind = sorted(hits)[0].split("\0")[0], "near"
                else:
                    for side, sig in sides.items():
                        near[side].add(f"{where}#{len(seen)}\0{item.kind}", sig)
            if first is not None:
                counts.duplicates += 1
                duplicates.append({"source": item.source, "line": item.line, "duplicate_of": first.split("#")[0],
                                   "kind": kind})
                continue
            seen[item.content_hash] = where
            unique.append(item)

        # 2. The screen, on prompt + chosen and prompt + rejected.
        sides, owners = [], []
        for n, ex in enumerate(unique):
            for side, reply in (("chosen", ex.chosen), ("rejected", ex.rejected)):
                if reply is not None:
                    sides.append([m.content for m in ex.prompt] + [reply])
                    owners.append((n, side))
        decisions = screen_sides(screener, sides)
        counts.screened = len(unique)
        blocked: dict[int, dict[str, object]] = {}
        for (n, side), decision in zip(owners, decisions):
            if not decision.allowed:
                blocked.setdefault(n, {})[side] = decision
        screened: list[PreferenceExample] = []
        for n, ex in enumerate(unique):
            hit = blocked.get(n, {})
            if "chosen" in hit or (ex.kind == "undesirable" and "rejected" in hit):
                decision = hit.get("chosen") or hit["rejected"]
                what = "prompt + chosen reply" if "chosen" in hit else "prompt + undesirable completion"
                quarantine(ex, "moderation:" + "+".join(decision.categories),
                           f"{what} blocked by the {decision.layer} layer: " + "; ".join(decision.reasons[:3]))
                for category in decision.categories:
                    counts.moderation[category] = counts.moderation.get(category, 0) + 1
                continue
            if "rejected" in hit:
                decision = hit["rejected"]
                for category in decision.categories:
                    counts.rejected_blocked[category] = counts.rejected_blocked.get(category, 0) + 1
                ex = PreferenceExample(ex.prompt, ex.chosen, None, ex.source, ex.line,
                                       {**ex.meta, "rejected_blocked": list(decision.categories)})
            screened.append(ex)

        # 3. Fit to the method, then template, mask and truncate.
        for ex in screened:
            if pcfg.method in PAIR_METHODS and ex.kind != "pair":
                why = (f"its rejected reply was blocked by moderation ({', '.join(ex.meta['rejected_blocked'])})"
                       if "rejected_blocked" in ex.meta else f"it is a KTO row with one {ex.kind} reply")
                quarantine(ex, "unpaired", f"method {pcfg.method} trains on chosen/rejected pairs and {why}; "
                                           "method: kto trains on single rows too")
                continue
            try:
                ex, tokens, truncated, change = tokenize_example(tokenizer, template, ex, dcfg.max_seq_length)
            except TemplateError as exc:
                quarantine(ex, "template_rejects", str(exc))
                continue
            except ValueError as exc:
                quarantine(ex, "too_long", str(exc))
                continue
            counts.truncated += truncated
            counts.reshaped += bool(change)
            counts.kept += 1
            counts.pairs += ex.kind == "pair"
            counts.desirable += ex.kind == "desirable"
            counts.undesirable += ex.kind == "undesirable"
            fmt = ex.meta.get("format", "pair")
            counts.formats[fmt] = counts.formats.get(fmt, 0) + 1
            kept.append((ex, tokens))
        counts.quarantined = sum(reasons.values())
        counts.reasons = dict(reasons)
        if counts.read != counts.kept + counts.quarantined + counts.duplicates:
            raise RuntimeError(f"bug: preference counts do not reconcile for {src.path}: {counts}")
    return CollectedPreference(kept, rejections, duplicates, per_source)


# ---------------------------------------------------------------------------------------------
# Split and write


def split_of(example: PreferenceExample, val_fraction: float) -> str:
    bucket = int(example.split_hash[:12], 16) / 16**12
    return "val" if bucket < val_fraction else "train"


def training_rows(method: str, rows: list[tuple[PreferenceExample, TokenizedExample]]) -> dict[str, list]:
    """Columns of the trainer's dataset: pairs (prompt_ids, chosen_ids, rejected_ids) or, for KTO, one
    row per reply (prompt_ids, completion_ids, label). `length` drives length-grouped batches."""
    if method != "kto":
        return {"prompt_ids": [t.prompt_ids for _, t in rows], "chosen_ids": [t.chosen_ids for _, t in rows],
                "rejected_ids": [t.rejected_ids for _, t in rows],
                "length": [len(t.prompt_ids) + max(len(t.chosen_ids), len(t.rejected_ids)) for _, t in rows]}
    cols: dict[str, list] = {"prompt_ids": [], "completion_ids": [], "label": [], "length": []}
    for _, t in rows:
        for ids, label in ((t.chosen_ids, True), (t.rejected_ids, False)):
            if ids is not None:
                cols["prompt_ids"].append(t.prompt_ids)
                cols["completion_ids"].append(ids)
                cols["label"].append(label)
                cols["length"].append(len(t.prompt_ids) + len(ids))
    return cols


def prepare_preference(recipe: Recipe, tokenizer, template: str) -> PreparedPreference:
    from datasets import Dataset

    pcfg = recipe.preference
    assert pcfg is not None
    data_dir = RunDir(recipe.run_dir).preference_data
    data_dir.mkdir(parents=True, exist_ok=True)
    found = collect_preference(recipe, tokenizer, template)

    splits: dict[str, list[tuple[PreferenceExample, TokenizedExample]]] = {"train": [], "val": []}
    for ex, tok in found.kept:
        splits[split_of(ex, pcfg.val_fraction)].append((ex, tok))
    if pcfg.val_fraction > 0 and not splits["val"] and len({ex.split_hash for ex, _ in splits["train"]}) >= 2:
        # Tiny sets can hash everything into train: hold back the group (one prompt and kept reply) closest to the cut.
        first = min(ex.split_hash for ex, _ in splits["train"])
        splits["val"] = [et for et in splits["train"] if et[0].split_hash == first]
        splits["train"] = [et for et in splits["train"] if et[0].split_hash != first]

    quarantine = write_rejections(data_dir, found.rejections, found.duplicates)
    if not splits["train"]:
        raise DataError(
            f"no preference examples to train on: {len(found.rejections)} quarantined (reasons in {quarantine}), "
            f"{len(found.duplicates)} duplicates" + ("; method kto needs at least one example in the train split"
                                                     if pcfg.method == "kto" else "")
        )
    for split, rows in splits.items():
        with (data_dir / f"{split}.jsonl").open("w", encoding="utf-8") as f:
            for ex, _ in rows:
                f.write(json.dumps({**ex.to_trl(), "source": ex.source, "line": ex.line}, ensure_ascii=False) + "\n")
        Dataset.from_dict(training_rows(pcfg.method, rows)).save_to_disk(str(data_dir / "tokenized" / split))
    val_pairs = [(ex, t) for ex, t in splits["val"] if ex.kind == "pair"]
    Dataset.from_dict(training_rows("dpo", val_pairs)).save_to_disk(str(data_dir / "tokenized" / "val_pairs"))

    per = found.sources
    counts = PreferenceCounts.over(
        found.sources, train=len(splits["train"]), val=len(splits["val"]), val_pairs=len(val_pairs),
        train_rows=len(training_rows(pcfg.method, splits["train"])["prompt_ids"]),
        max_tokens=max(len(t.prompt_ids) + max(len(t.chosen_ids or []), len(t.rejected_ids or [])) for _, t in found.kept))
    prepared = PreparedPreference(
        data_dir=data_dir, method=pcfg.method, train_jsonl=data_dir / "train.jsonl", val_jsonl=data_dir / "val.jsonl",
        train_tokenized=data_dir / "tokenized" / "train", val_tokenized=data_dir / "tokenized" / "val",
        val_pairs_tokenized=data_dir / "tokenized" / "val_pairs", quarantine=quarantine, counts=counts, sources=per,
    )
    prepared.save()
    _print_summary(prepared)
    return prepared


def report_section(p: PreparedPreference) -> list[str]:
    """The preference part of data_report.md."""
    c = p.counts
    dropped = ", ".join(f"{k} {v}" for k, v in c.rejected_blocked.items()) or "none"
    blocked = ", ".join(f"{k} {v}" for k, v in c.moderation.items()) or "none"
    lines = [
        "## Preference data",
        "",
        f"Method `{p.method}`. {preference_reconciliation(c)}: {c.pairs} pairs, {c.desirable} desirable and "
        f"{c.undesirable} undesirable single rows; {c.truncated} prompts truncated at a turn boundary, "
        f"{c.reshaped} reshaped to fit the chat template.",
        f"Split: {c.train} train / {c.val} held-out examples ({c.val_pairs} held-out pairs); "
        f"{c.train_rows} training rows; longest {c.max_tokens} tokens.",
        f"Moderation: {c.screened} examples screened on both sides; quarantined (prompt + chosen blocked) per "
        f"category: {blocked}; rejected replies dropped from their pair: {dropped}.",
        "",
        "| source | origin | licence | read | kept | quarantined | duplicates | pairs | truncated | reasons |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in p.sources:
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(s.reasons.items())) or "-"
        lines.append(f"| {s.path} | {s.origin or '-'} | {s.license or '**none declared**'} | {s.read} | {s.kept} "
                     f"| {s.quarantined} | {s.duplicates} | {s.pairs} | {s.truncated} | {reasons} |")
    lines += ["", "Files: `preference/train.jsonl` and `preference/val.jsonl` (TRL's conversational preference "
                  "format), `preference/quarantine.jsonl`, `preference/duplicates.jsonl`.", ""]
    return lines


def _print_summary(p: PreparedPreference) -> None:
    c = p.counts
    console.print(f"[bold]prepare[/] (preference, {p.method}): {preference_reconciliation(c)}; {c.pairs} pairs; "
                  f"train {c.train} / held out {c.val}"
                  + (f"; rejected replies dropped by moderation: {sum(c.rejected_blocked.values())}"
                     if c.rejected_blocked else ""))
    if c.quarantined:
        console.print(f"  quarantined preference rows and reasons: {p.quarantine}")
    for s in p.sources:
        if not s.license:
            console.print(f"  [yellow]warning[/]: preference source {s.path} declares no licence (preference.sources[].license)")
