"""Replies for a review, generated ahead of time: both sides, batched, seeded, screened.

Entry point: `open_review(run_a, opponent, overrides, fresh) -> Review`. It reads RUN_A's
recipe, builds the chats to judge (the recipe's `eval.prompts` behind the run's system
prompt, then held-back conversations cut after their last user turn), and either reopens
the review file made for exactly these chats, adapters and settings, or generates every
reply for both sides, screens each one in its conversation, and writes a new file.

A side is a run (its base with its adapter, its own tokenizer and end-of-turn token) or
`base` (RUN_A's base without the adapter, with RUN_A's training template, as eval compares).
"""

from __future__ import annotations

import datetime as dt
import gc
import hashlib
import inspect
import json
import random
from dataclasses import dataclass
from pathlib import Path

from llmtune.artifacts import PreparedData, RunDir, sample_prompts, trained_adapter
from llmtune.config import Recipe, load_recipe
from llmtune.console import console
from llmtune.generation import Generator, Sampling, held_back_conversations
from llmtune.review.store import Item, ReviewError, ReviewStore
from llmtune.storage import file_sha256

BASE = "base"


@dataclass(frozen=True)
class Side:
    label: str  # the run's name, or "base"
    recipe: Recipe  # the run whose model (and, for base, whose template) is used
    use_adapter: bool


@dataclass
class Review:
    """An open review: its file, the two sides, and RUN_A's recipe (its report gets the results)."""

    store: ReviewStore
    directory: Path
    recipe_a: Recipe
    label_a: str
    label_b: str
    resumed: bool


def load_run(run_dir: Path, overrides: list[str] | None = None) -> Recipe:
    """A run directory's resolved recipe, re-rooted at that directory wherever it was run from."""
    run_dir = Path(run_dir)
    if not (run_dir / "recipe.yaml").is_file():
        raise ReviewError(f"{run_dir} is not a run directory (no recipe.yaml); pass runs/NAME, made by `llmtune run`")
    recipe = load_recipe(run_dir / "recipe.yaml", overrides or [])
    recipe.output.dir, recipe.output.name = str(run_dir.resolve().parent), run_dir.resolve().name
    return recipe


def prepared_data(recipe: Recipe) -> PreparedData:
    """The run's prepared data with its paths inside this run directory (prepared.json keeps the old cwd's)."""
    run = RunDir(recipe.run_dir)
    path = run.prepared
    if not path.is_file():
        raise ReviewError(f"no prepared data in {path.parent}; run `llmtune prepare {recipe.run_dir / 'recipe.yaml'}` first")
    prepared = PreparedData.load(recipe.run_dir)
    for key in ("train_jsonl", "val_jsonl"):
        setattr(prepared, key, run.data / getattr(prepared, key).name)
    return prepared


def review_chats(recipe: Recipe, prepared: PreparedData) -> list[tuple[str, str, list[dict]]]:
    """(kind, source, chat) to judge; every chat ends with the user turn both sides answer."""
    chats = [("prompt", f"eval.prompts[{i}]", chat) for i, chat in enumerate(sample_prompts(recipe, prepared))]
    split = "val.jsonl" if prepared.counts.val else "train.jsonl"
    held = held_back_conversations(prepared.val_jsonl, prepared.train_jsonl, bool(prepared.counts.val),
                                   recipe.review.max_conversations)
    for line, messages in enumerate(held, start=1):
        last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
        if last_user is not None:  # a greeting-only chat has nothing to answer
            chats.append(("conversation", f"{split}:{line}", messages[: last_user + 1]))
    return chats


def sampling_of(recipe: Recipe) -> Sampling:
    r = recipe.review
    return Sampling(r.max_new_tokens, r.temperature, r.top_p, r.batch_size,
                    r.seed if r.seed is not None else recipe.training.seed)


def _side_identity(side: Side) -> dict:
    if not side.use_adapter:
        return {"base": side.recipe.model.base, "revision": side.recipe.model.revision}
    adapter = trained_adapter(side.recipe)
    weights = sorted(adapter.glob("adapter_model.*"))
    return {"base": side.recipe.model.base, "adapter": {w.name: file_sha256(w) for w in weights}}


def fingerprint(side_a: Side, side_b: Side, chats, sampling: Sampling) -> str:
    doc = {"a": _side_identity(side_a), "b": _side_identity(side_b), "chats": chats, "sampling": sampling.__dict__}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def generate_side(side: Side, chats: list[list[dict]], sampling: Sampling) -> list[str]:
    """Every reply of one side, batched and seeded; the model is freed afterwards."""
    import torch
    from peft import PeftModel

    from llmtune.models import load_base_model, load_tokenizer, placement_for
    from llmtune.distributed import configure_threads

    configure_threads(side.recipe.training.num_threads)
    adapter_dir = trained_adapter(side.recipe)
    tokenizer = load_tokenizer(str(adapter_dir))  # the template the run was trained with
    prepared = prepared_data(side.recipe)
    model = load_base_model(side.recipe, placement_for(side.recipe))
    if side.use_adapter:
        model = PeftModel.from_pretrained(model, str(adapter_dir))
    generate = Generator(model, tokenizer, sampling, [tokenizer.convert_tokens_to_ids(prepared.end_of_turn)])
    with console.status(f"[bold]{side.label}[/]: generating {len(chats)} replies") as status:
        done = 0

        def on_batch(n: int) -> None:
            nonlocal done
            done += n
            status.update(f"[bold]{side.label}[/]: generated {done}/{len(chats)} replies")

        replies = [g.text for g in generate(chats, on_batch)]
    console.print(f"{side.label}: {len(replies)} replies, {generate.tokens} tokens in {generate.seconds:.1f}s "
                  f"({generate.tokens / max(generate.seconds, 1e-9):.1f} tokens/s)")
    del model, generate
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return replies


def screen_reply(screener, messages: list[dict], reply: str):
    """The screen's decision on a reply in its conversation."""
    if "reply" in inspect.signature(screener.screen_conversation).parameters:
        return screener.screen_conversation(messages, reply=reply)
    # Screeners without per-reply screening judge the conversation with the reply appended.
    return screener.screen_conversation([*messages, {"role": "assistant", "content": reply}])


def build_items(chats, replies_a: list[str], replies_b: list[str], screener, seed: int) -> list[Item]:
    """Screened pairs in a seeded random order, each with a seeded random left/right placement.
    A blocked reply is not kept: only that it was withheld and why."""
    rng = random.Random(seed)
    order = list(range(len(chats)))
    rng.shuffle(order)
    items = []
    for position, k in enumerate(order, start=1):
        kind, source, messages = chats[k]
        replies, withheld = [], []
        for reply in (replies_a[k], replies_b[k]):
            decision = screen_reply(screener, messages, reply)
            replies.append(reply if decision.allowed else None)
            withheld.append(None if decision.allowed else f"blocked ({', '.join(decision.categories)}) by {decision.layer}")
        items.append(Item(position, kind, source, messages, replies[0], replies[1], withheld[0], withheld[1],
                          a_on_left=rng.random() < 0.5))
    return items


def open_review(run_a: Path, opponent: str = BASE, overrides: list[str] | None = None, fresh: bool = False) -> Review:
    """Reopen the review of RUN_A against `opponent` (a run directory or `base`), or generate it."""
    recipe_a = load_run(run_a, overrides)
    side_a = Side(recipe_a.run_dir.name, recipe_a, use_adapter=True)
    if opponent == BASE:
        side_b = Side(BASE, recipe_a, use_adapter=False)
    else:
        recipe_b = load_run(Path(opponent))
        if recipe_b.run_dir == recipe_a.run_dir:
            raise ReviewError(f"RUN_A and RUN_B are the same run ({recipe_a.run_dir}); compare two runs, or a run with `base`")
        if recipe_b.run_dir.name == BASE:
            raise ReviewError(f"{recipe_b.run_dir}: a run named `base` reads as the base model here; rename the run directory")
        side_b = Side(recipe_b.run_dir.name, recipe_b, use_adapter=True)
    directory = recipe_a.run_dir / "review" / f"vs-{side_b.label}"
    chats = review_chats(recipe_a, prepared_data(recipe_a))
    if not chats:
        raise ReviewError(f"{recipe_a.run_dir}: nothing to review; set eval.prompts or keep review.max_conversations above 0")
    sampling = sampling_of(recipe_a)
    stamp = fingerprint(side_a, side_b, chats, sampling)
    path = directory / "review.sqlite"
    if path.exists():
        store = ReviewStore.open(path)
        if store.meta().get("fingerprint") == stamp:
            p = store.progress()
            console.print(f"resuming {path}: {p['judged']} of {p['to_judge']} pairs judged")
            return Review(store, directory, recipe_a, side_a.label, side_b.label, resumed=True)
        if not fresh:
            raise ReviewError(
                f"{path} holds replies generated from other adapters, chats or review settings; its judgments are about "
                "those replies. Pass --fresh to generate new ones (the old file is kept beside it)")
        kept = path.with_name(f"review-{dt.datetime.now():%Y%m%d-%H%M%S}.sqlite")
        path.rename(kept)
        console.print(f"kept the previous review as {kept}")

    from llmtune.moderation import load_screener

    console.print(f"[bold]llmtune review[/] {side_a.label} vs {side_b.label}: {len(chats)} chats, "
                  f"{sampling.max_new_tokens} new tokens, temperature {sampling.temperature}, seed {sampling.seed}")
    only = [c for _, _, c in chats]
    replies_a = generate_side(side_a, only, sampling)
    replies_b = generate_side(side_b, only, sampling)
    screener = load_screener(recipe_a.moderation)
    items = build_items(chats, replies_a, replies_b, screener, sampling.seed)
    withheld = sum(not i.shown for i in items)
    meta = {"fingerprint": stamp, "label_a": side_a.label, "label_b": side_b.label,
            "run_a": str(recipe_a.run_dir), "run_b": str(side_b.recipe.run_dir) if side_b.use_adapter else BASE,
            "sampling": json.dumps(sampling.__dict__), "created": dt.datetime.now(dt.UTC).isoformat()}
    store = ReviewStore.create(path, meta, items)
    console.print(f"{len(items)} pairs in {path}" + (f"; {withheld} withheld (a reply blocked by the screen)" if withheld else ""))
    return Review(store, directory, recipe_a, side_a.label, side_b.label, resumed=False)


def find_review(run_a: Path, opponent: str | None) -> Path:
    """The review file of RUN_A against `opponent`; without one, RUN_A's only review."""
    recipe_a = load_run(run_a)
    root = recipe_a.run_dir / "review"
    if opponent:
        label = BASE if opponent == BASE else load_run(Path(opponent)).run_dir.name
        return root / f"vs-{label}" / "review.sqlite"
    found = sorted(root.glob("vs-*/review.sqlite"))
    if len(found) == 1:
        return found[0]
    if not found:
        raise ReviewError(f"{recipe_a.run_dir} has no review yet; start one with `llmtune review {run_a}`")
    names = ", ".join(p.parent.name.removeprefix("vs-") for p in found)
    raise ReviewError(f"{recipe_a.run_dir} has reviews against {names}; name one: `llmtune review export {run_a} NAME`")
