"""The prepare stage: read every source, validate, dedup, template, mask, split.

Entry point: `prepare(recipe) -> PreparedData`. Nothing is dropped silently: every row
read is kept, quarantined (with file, line and reason) or counted as a duplicate, and
the counts reconcile (read = kept + quarantined + duplicates). With a `preference:` section the
preference sources are prepared too, with the same guarantees (llmtune.data.preference).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field


from rich.progress import track

from llmtune.artifacts import PreparedCounts, PreparedData, RunDir, SourceCounts, reconciliation
from llmtune.console import console
from llmtune.config import Recipe
from llmtune.data.dedup import NearDuplicateIndex
from llmtune.data.formats import apply_source_quota, read_data_source
from llmtune.data.template import (
    IGNORE_INDEX,
    TokenizedConversation,
    end_of_turn_token,
    fit_to_template,
    resolve_chat_template,
    tokenize_conversation,
    tokenize_rendered,
    trained_spans,
)
from llmtune.data.types import Conversation, Message, Rejection
from llmtune.errors import DataError, TemplateError
from llmtune.jsonl import write_rejections
from llmtune.moderation import load_screener
from llmtune.storage import ensure_writable
from llmtune.models import load_tokenizer, resolve_base



TOKENIZE_BATCH = 1024


def split_of(conversation: Conversation, val_fraction: float) -> str:
    """Validation or train, by content hash: adding data never moves existing rows between splits."""
    bucket = int(conversation.content_hash[:12], 16) / 16**12
    return "val" if bucket < val_fraction else "train"


def _truncate_at_turn(
    tokenizer, conv: Conversation, template: str, mask: str, max_len: int
) -> tuple[Conversation, TokenizedConversation] | None:
    """Drop trailing turns until the conversation fits and still ends on an assistant turn."""
    ends = [i for i, m in enumerate(conv.messages) if m.role == "assistant"]
    for last in reversed(ends[:-1]):
        shorter = Conversation(conv.messages[: last + 1], conv.source, conv.line, conv.meta)
        tok = tokenize_conversation(tokenizer, shorter, template, mask)
        if len(tok.input_ids) <= max_len:
            return shorter, tok
    return None


# From this many conversations on, a source's per-conversation work runs in worker processes.
PARALLEL_MIN = 4096
_WORKER: dict = {}  # what the batch functions read (items, tokenizer, template, ...): set before the pool forks


@dataclass
class Kept:
    """A conversation that fits the template, tokenized and masked (maybe truncated at a turn)."""

    index: int  # in the batch
    item: Conversation | None  # None: the batch's item unchanged (workers then send back no text)
    tokenized: TokenizedConversation
    change: str | None  # how fit_to_template reshaped it, if it did
    truncated: bool


@dataclass
class Quarantined:
    """A conversation the template step cannot train on, and why."""

    index: int
    item: Conversation | None
    reason: str
    detail: str


@dataclass
class Facts:
    """What prepare needs to know of a conversation before deciding duplicates and screening."""

    content_hash: str
    signature: object  # MinHash signature; None without near dedup
    needs_screen: bool  # Screener.needs_full_screen


def _template_batch(items: list[Conversation]) -> list[Kept | Quarantined]:
    """Fit to the template, render with trained spans, tokenize, truncate: one outcome per item."""
    tokenizer, template, mask, max_len = _WORKER["tokenizer"], _WORKER["template"], _WORKER["mask"], _WORKER["max_len"]
    outcomes: list[Kept | Quarantined] = []
    rendered: list[tuple[int, Conversation, str | None, tuple[str, list[tuple[int, int]]]]] = []
    for k, item in enumerate(items):
        try:
            messages, change = fit_to_template(tokenizer, item.messages, template)
            if change:
                item = Conversation(messages, item.source, item.line, {**item.meta, "reshaped": change})
            rendered.append((k, item, change, trained_spans(tokenizer, item.messages, template, mask)))
        except TemplateError as exc:
            outcomes.append(Quarantined(k, None, "template_rejects", str(exc)))
    for (k, item, change, _), tok in zip(rendered, tokenize_rendered(tokenizer, [r for *_, r in rendered])):
        truncated = False
        if len(tok.input_ids) > max_len:
            cut = _truncate_at_turn(tokenizer, item, template, mask, max_len)
            if cut is None:
                outcomes.append(Quarantined(k, None if item is items[k] else item, "too_long",
                                            f"{len(tok.input_ids)} tokens; even the first assistant turn exceeds data.max_seq_length={max_len}"))
                continue
            item, tok = cut
            truncated = True
        if tok.trained_tokens == 0:
            outcomes.append(Quarantined(k, None if item is items[k] else item, "no_trainable_tokens",
                                        f"data.mask={mask} leaves no token with loss in this conversation"))
            continue
        outcomes.append(Kept(k, None if item is items[k] else item, tok, change, truncated))
    return outcomes


def template_outcomes(items: list[Conversation], tokenizer, template: str, mask: str, max_len: int):
    """_template_batch over `items` in batches of TOKENIZE_BATCH, in order (in worker processes
    when there are many), with each outcome's item filled in."""
    _WORKER.update(tokenizer=tokenizer, template=template, mask=mask, max_len=max_len)
    for start, outcomes in _in_order(_template_batch, items, "templating and tokenizing"):
        for outcome in outcomes:
            if outcome.item is None:
                outcome.item = items[start + outcome.index]
            yield outcome


def _facts_batch(items: list[Conversation]) -> list[Facts]:
    near, screener = _WORKER["near"], _WORKER["screener"]
    return [
        Facts(c.content_hash, near.signature(c) if near is not None else None,
              screener.needs_full_screen([m.content for m in c.messages if m.content.strip()]))
        for c in items
    ]


def conversation_facts(items: list[Conversation], near: NearDuplicateIndex | None, screener) -> list[Facts]:
    """_facts_batch over `items`, in order (in worker processes when there are many)."""
    _WORKER.update(near=near, screener=screener)
    return [fact for _, facts in _in_order(_facts_batch, items, "hashing and checking") for fact in facts]


def _slice(job: tuple) -> tuple[int, list]:
    fn, start, end = job
    return start, fn(_WORKER["items"][start:end])


def _in_order(fn, items: list, description: str):
    """(start, fn(items[start:start + TOKENIZE_BATCH])) for each batch, in order. With PARALLEL_MIN
    items or more and more than one core, in a pool of forked workers, one per core: they inherit
    `items` and _WORKER, so only batch bounds go out and results come back (the Rust tokenizer then
    runs one thread per worker). A progress bar counts batches when there is more than one."""
    import os

    jobs = [(fn, i, min(i + TOKENIZE_BATCH, len(items))) for i in range(0, len(items), TOKENIZE_BATCH)]
    workers = min(len(os.sched_getaffinity(0)), len(jobs))
    parallel = len(items) >= PARALLEL_MIN and workers > 1

    def shown(results):
        if len(jobs) < 2:
            return results
        label = f"{description} {len(items):,} conversations ({workers if parallel else 1} process{'es' if parallel else ''})"
        return track(results, total=len(jobs), description=label, console=console, transient=True)

    _WORKER["items"] = items
    try:
        if not parallel:
            yield from shown(map(_slice, jobs))
            return
        import multiprocessing

        before = os.environ.get("TOKENIZERS_PARALLELISM")
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one tokenizer thread per worker, and no fork warning
        try:
            with multiprocessing.get_context("fork").Pool(workers) as pool:
                yield from shown(pool.imap(_slice, jobs))
        finally:
            if before is None:
                os.environ.pop("TOKENIZERS_PARALLELISM", None)
            else:
                os.environ["TOKENIZERS_PARALLELISM"] = before
    finally:
        _WORKER.pop("items", None)


def _lap(seconds: dict[str, float], phase: str, since: float) -> float:
    now = time.perf_counter()
    seconds[phase] = seconds.get(phase, 0.0) + now - since
    return now


@dataclass
class Collected:
    """Every row of every source, accounted for: kept (tokenized), quarantined, or duplicate."""

    kept: list[tuple[Conversation, TokenizedConversation]]
    rejections: list[Rejection]
    duplicates: list[dict]
    sources: list[SourceCounts]
    seconds: dict[str, float] = field(default_factory=dict)  # wall time per phase


def handle_pii(conversations: list[Conversation], mode: str, quarantine, counts: "SourceCounts") -> dict[int, Conversation | None]:
    """Personal data per conversation: {id(conversation): its redacted copy, or None when it was
    quarantined} for each conversation that holds any; redaction is the default."""
    from llmtune.data.pii import redact

    if mode == "off":
        return {}
    out: dict[int, Conversation | None] = {}
    for conv in conversations:
        kinds: list[str] = []
        messages = []
        for m in conv.messages:
            text, found = redact(m.content)
            kinds += found
            messages.append(m if not found else Message(m.role, text))
        if not kinds:
            continue
        counts.pii_conversations += 1
        for kind in kinds:
            counts.pii[kind] = counts.pii.get(kind, 0) + 1
        found_kinds = sorted(set(kinds))
        if mode == "quarantine":
            quarantine(conv, "pii:" + "+".join(found_kinds), f"personal data in the conversation: {', '.join(found_kinds)}")
            out[id(conv)] = None
        else:
            out[id(conv)] = Conversation(messages, conv.source, conv.line, {**conv.meta, "pii_redacted": found_kinds})
    return out


def screen_conversations(screener, conversations: list[Conversation], quarantine, counts: "SourceCounts",
                         needs_screen: list[bool]) -> list[Conversation]:
    """Screen every conversation as a whole (facts set in one message hold in the others, as in
    the gateway). Returns the allowed ones; the rest are quarantined with reason
    `moderation:<categories>` and counted per category.

    `needs_screen` is Screener.needs_full_screen per conversation (made in the worker processes
    of conversation_facts): with `moderation.bulk: cascade`, a conversation no rule or fact could
    block and the classifier's first stage clears is allowed without the full screen
    (docs/moderation.md, "Bulk screening")."""
    todo = [i for i, needed in enumerate(needs_screen) if needed]
    decisions = screener.screen_conversations(
        [[{"role": m.role, "content": m.content} for m in conversations[i].messages] for i in todo],
        progress=len(todo) > 500)
    blocked = dict(zip(todo, decisions))
    counts.screened += len(conversations)
    counts.screened_full += len(todo)
    allowed = []
    for i, conv in enumerate(conversations):
        decision = blocked.get(i)
        if decision is None or decision.allowed:
            allowed.append(conv)
            continue
        quarantine(conv, "moderation:" + "+".join(decision.categories),
                   f"blocked by the {decision.layer} layer: " + "; ".join(decision.reasons[:3]))
        for category in decision.categories:
            counts.moderation[category] = counts.moderation.get(category, 0) + 1
    return allowed


def collect(recipe: Recipe, tokenizer, template: str) -> Collected:
    """Read, validate, dedup, weight, fit to the template, tokenize, mask and truncate every source.

    Per source, three passes: rows -> unique conversations (bad rows to quarantine, repeats to
    duplicates), then the source's quota (weight / max_samples), then templating and tokenizing
    in batches. Counts reconcile: read = kept + quarantined + duplicates + sampled_out."""
    cfg = recipe.data
    kept: list[tuple[Conversation, TokenizedConversation]] = []
    rejections: list[Rejection] = []
    duplicates: list[dict] = []
    seen: dict[str, str] = {}
    near = NearDuplicateIndex(cfg.near_dup_threshold) if cfg.dedup == "near" else None
    per_source: list[SourceCounts] = []
    # Always screened: with moderation.enabled false the screener still enforces the hard floor.
    screener = load_screener(recipe.moderation)

    seconds: dict[str, float] = {}
    clock = time.perf_counter()
    for src in cfg.sources:
        counts = SourceCounts(path=src.path or src.card, origin=src.origin, license=src.license)
        per_source.append(counts)
        reasons: Counter[str] = Counter()

        def quarantine(item, reason: str, detail: str) -> None:
            if isinstance(item, Conversation) and "copy" in item.meta:
                return  # a weighted copy shares its original's fate, which is already counted
            rejections.append(item if isinstance(item, Rejection) else Rejection(item.source, item.line, reason, detail, ""))
            reasons[reason] += 1

        # 1. Rows -> unique, valid conversations. Hashes, MinHash signatures and the screen's
        #    quick check are computed for all conversations first (in workers when there are many);
        #    duplicates are then decided in file order.
        items = list(track(read_data_source(src, recipe.resolve_path), description=f"reading {counts.path}",
                           console=console, transient=True))
        counts.read += len(items)
        convs = [item for item in items if isinstance(item, Conversation)]
        replaced = handle_pii(convs, cfg.pii, quarantine, counts)
        if replaced:
            items = [it for it in (replaced.get(id(it), it) for it in items) if it is not None]
            convs = [item for item in items if isinstance(item, Conversation)]
        facts = dict(zip(map(id, convs), conversation_facts(convs, near if cfg.dedup == "near" else None, screener)))
        unique: list[Conversation] = []
        needs_screen: list[bool] = []
        for item in items:
            if isinstance(item, Rejection):
                quarantine(item, item.reason, item.detail)
                continue
            fact = facts[id(item)]
            h, signature, cue = fact.content_hash, fact.signature, fact.needs_screen
            if cfg.dedup != "none":
                where = f"{item.source}:{item.line}"
                first = seen.get(h) or (near.check_and_add(where, item, signature) if near else None)
                if first is not None:
                    counts.duplicates += 1
                    duplicates.append({"source": item.source, "line": item.line, "duplicate_of": first,
                                       "kind": "exact" if h in seen else "near"})
                    continue
                seen[h] = where
            unique.append(item)
            needs_screen.append(cue)

        # 2. The moderation screen: blocked conversations go to quarantine with their categories.
        clock = _lap(seconds, "read+validate+dedup", clock)
        unique = screen_conversations(screener, unique, quarantine, counts, needs_screen)
        clock = _lap(seconds, "screen", clock)

        # 3. The source's share of the mix.
        if src.weight is not None or src.max_samples is not None:
            chosen, left_out = apply_source_quota(unique, src.weight, src.max_samples, recipe.training.seed)
            counts.sampled_out = len(left_out)
        else:
            chosen = unique

        # 4. Template, mask and tokenize in batches (in worker processes when there are many);
        #    truncate at a turn boundary or quarantine. Results come back in order.
        for outcome in template_outcomes(chosen, tokenizer, template, cfg.mask, cfg.max_seq_length):
            item = outcome.item
            if isinstance(outcome, Quarantined):
                quarantine(item, outcome.reason, outcome.detail)
                continue
            counts.reshaped += bool(outcome.change)
            counts.truncated += outcome.truncated
            kept.append((item, outcome.tokenized))
            if "copy" in item.meta:
                counts.copies += 1
                continue
            counts.kept += 1
            fmt = item.meta.get("format", src.format)
            counts.formats[fmt] = counts.formats.get(fmt, 0) + 1
        counts.quarantined = sum(reasons.values())
        counts.reasons = dict(reasons)
        clock = _lap(seconds, "template+tokenize", clock)
    return Collected(kept, rejections, duplicates, per_source, seconds)


def load_template(recipe: Recipe):
    """The base tokenizer and the chat template text the recipe trains with."""
    tokenizer = load_tokenizer(resolve_base(recipe.model.base, recipe.model.revision), recipe.model.revision)
    recipe_dir = recipe.source_path.parent if recipe.source_path else None
    return tokenizer, resolve_chat_template(tokenizer, recipe.model.chat_template, recipe_dir)


def prepare(recipe: Recipe) -> PreparedData:
    data_dir = RunDir(recipe.run_dir).data
    inputs = sum(recipe.resolve_path(s.path).stat().st_size for s in recipe.data.sources
                 if s.path and recipe.resolve_path(s.path).is_file())
    # Splits (JSONL + tokenized Arrow) take a few times the input; checked before reading anything.
    ensure_writable(data_dir, 4 * inputs + 2**20, "the prepared data")
    cfg = recipe.data
    clock = time.perf_counter()
    tokenizer, template = load_template(recipe)
    eot = end_of_turn_token(tokenizer, template)
    loaded = time.perf_counter() - clock

    found = collect(recipe, tokenizer, template)
    found.seconds = {"load tokenizer": loaded, **found.seconds}
    clock = time.perf_counter()
    kept: dict[str, list[tuple[Conversation, TokenizedConversation]]] = {"train": [], "val": []}
    for conv, tok in found.kept:
        kept[split_of(conv, cfg.val_fraction)].append((conv, tok))
    if cfg.val_fraction > 0 and not kept["val"] and len(kept["train"]) >= 2:
        # Tiny sets can hash every row into train; hold back the row closest to the cut.
        kept["train"].sort(key=lambda ct: ct[0].content_hash)
        kept["val"].append(kept["train"].pop(0))

    quarantine = write_rejections(data_dir, found.rejections, found.duplicates)
    found.seconds["split"] = time.perf_counter() - clock
    if not any(t.trained_tokens for split in kept.values() for _, t in split):
        raise DataError(
            f"no trainable tokens: with data.mask={cfg.mask} and the chat template of {recipe.model.base} "
            f"(model.chat_template={recipe.model.chat_template or 'tokenizer default'}), no conversation has a token with loss"
            + (f"; {len(found.rejections)} rows were quarantined (reasons in {quarantine})" if found.rejections else "")
        )

    clock = time.perf_counter()
    prepared = _write(recipe, data_dir, kept, found, template, eot, tokenizer)
    found.seconds["write+report"] = time.perf_counter() - clock
    prepared.seconds = found.seconds
    _print_summary(prepared)
    if recipe.preference is not None:
        from llmtune.data.preference import prepare_preference, report_section

        preference = prepare_preference(recipe, tokenizer, template)
        with prepared.report.open("a", encoding="utf-8") as f:
            f.write("\n".join(report_section(preference)))
    return prepared


def _write(recipe, data_dir, kept, found: Collected, template, eot, tokenizer) -> PreparedData:
    per_source = found.sources
    from datasets import Dataset

    paths = {}
    for split, rows in kept.items():
        jsonl = data_dir / f"{split}.jsonl"
        with jsonl.open("w", encoding="utf-8") as f:
            for conv, _ in rows:
                f.write(json.dumps({**conv.to_openai(), "source": conv.source, "line": conv.line}, ensure_ascii=False) + "\n")
        tokenized = data_dir / "tokenized" / split
        Dataset.from_dict(
            {"input_ids": [t.input_ids for _, t in rows], "labels": [t.labels for _, t in rows]}
        ).save_to_disk(str(tokenized))
        paths[split] = (jsonl, tokenized)

    quarantine = data_dir / "quarantine.jsonl"
    lengths = {s: [len(t.input_ids) for _, t in rows] for s, rows in kept.items()}
    counts = PreparedCounts.over(
        per_source, pii_mode=recipe.data.pii, train=len(kept["train"]), val=len(kept["val"]),
        train_tokens=sum(lengths["train"]), trained_tokens=sum(t.trained_tokens for _, t in kept["train"]),
        max_tokens=max(lengths["train"] + lengths["val"]),
    )
    if counts.read != counts.kept + counts.quarantined + counts.duplicates + counts.sampled_out:
        raise RuntimeError(f"bug: prepare's counts do not reconcile: {counts}")

    sample = kept["train"][0][1] if kept["train"] else kept["val"][0][1]
    report = RunDir(recipe.run_dir).data_report
    prepared = PreparedData(
        data_dir=data_dir,
        train_jsonl=paths["train"][0],
        val_jsonl=paths["val"][0],
        train_tokenized=paths["train"][1],
        val_tokenized=paths["val"][1],
        quarantine=quarantine,
        report=report,
        chat_template=template,
        end_of_turn=eot,
        counts=counts,
        sources=per_source,
    )
    _write_report(prepared, lengths, render_masked(tokenizer, sample))
    prepared.save()
    return prepared


def render_masked(tokenizer, tok: TokenizedConversation) -> str:
    """The rendered sample with trained tokens in [[double brackets]]."""
    out, run, inside = [], [], False
    for token_id, label in zip(tok.input_ids, tok.labels):
        trained = label != IGNORE_INDEX
        if trained != inside and run:
            text = tokenizer.decode(run)
            out.append(f"[[{text}]]" if inside else text)
            run = []
        inside = trained
        run.append(token_id)
    if run:
        text = tokenizer.decode(run)
        out.append(f"[[{text}]]" if inside else text)
    return "".join(out)


def _write_report(prepared: PreparedData, lengths: dict[str, list[int]], sample: str) -> None:
    from llmtune.plots import plot_histogram

    c = prepared.counts
    hist = plot_histogram(
        lengths["train"] + lengths["val"], prepared.data_dir / "token_lengths.png", "Tokens per conversation"
    )
    lines = [
        "# Data report",
        "",
        f"{reconciliation(c)}; {c.truncated} truncated at a turn boundary, "
        f"{c.reshaped} reshaped to fit the chat template.",
        f"Split: {c.train} train / {c.val} validation conversations; "
        f"{c.train_tokens:,} train tokens, {c.trained_tokens:,} of them carry loss; longest {c.max_tokens} tokens.",
        "",
        "| source | origin | licence | read | kept | quarantined | duplicates | sampled out | copies | truncated | reasons |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in prepared.sources:
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(s.reasons.items())) or "-"
        lic = s.license or "**none declared**"
        lines.append(
            f"| {s.path} | {s.origin or '-'} | {lic} | {s.read} | {s.kept} | {s.quarantined} | {s.duplicates} "
            f"| {s.sampled_out} | {s.copies} | {s.truncated} | {reasons} |"
        )
    lines += [
        "",
        f"Moderation: {c.screened} conversations screened ({c.screened_full} had a cue for a rule or "
        "the adapter and went through both; the rest could only be allowed); blocked per category: "
        + (", ".join(f"{k} {v}" for k, v in c.moderation.items()) or "none") + " (in quarantine.jsonl as `moderation:...`).",
        "",
        f"Personal data ({c.pii_mode}): {c.pii_conversations} conversations held some; "
        + (", ".join(f"{k} {v}" for k, v in c.pii.items()) or "none found")
        + (" (replaced by placeholders such as [EMAIL])." if c.pii_mode == "redact" else "."),
        "",
        f"End-of-turn token (trained, and the stop token when serving): `{prepared.end_of_turn}`",
        "",
        f"![token lengths]({hist.name})",
        "",
        "## Rendered sample (trained tokens in [[double brackets]])",
        "",
        "```",
        sample,
        "```",
        "",
    ]
    prepared.report.write_text("\n".join(lines), encoding="utf-8")


def _print_summary(p: PreparedData) -> None:
    c = p.counts
    console.print(
        f"[bold]prepare[/]: {reconciliation(c)} ({c.truncated} truncated); "
        f"train {c.train} / val {c.val}; {c.trained_tokens:,} trained tokens"
    )
    if c.quarantined:
        console.print(f"  quarantined rows and reasons: {p.quarantine}")
    for s in p.sources:
        if not s.license:
            console.print(f"  [yellow]warning[/]: source {s.path} declares no licence (data.sources[].license)")
    console.print(f"  report: {p.report}")
