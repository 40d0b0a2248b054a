"""The eval stage: the fine-tune against its base, same split, prompts and sampling seed.

Entry point: `evaluate(recipe) -> EvalResult`. The base is loaded once and measured, then
the adapter is put on it and everything is measured again:

- validation loss and perplexity on the held-back split;
- held-back conversations replayed turn by turn (each reply generated with the model's own
  earlier replies in the history) for clean stops, template leaks, speaking for the user,
  repetition (distinct-n, repeated n-grams across consecutive replies, batch self-similarity)
  and persona adherence (contrastive, MiniLM embeddings) with grammatical person;
- over-refusal on shipped allowed prompts, and the policy-violation rate of replies to shipped
  red-team prompts as screened by the moderation adapter (no gateway in between);
- the throughput of the eval's own generation.

Writes eval.json, plots, and refreshes report.md.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rich.table import Table

from llmtune.config import Recipe
from llmtune.console import console
from llmtune.data.prepare import PreparedData
from llmtune.data.template import IGNORE_INDEX
from llmtune.eval import metrics as M
from llmtune.generation import Generation, Generator, Sampling, held_back_conversations
from llmtune.models import load_base_model, load_tokenizer, placement_for

SETS = Path(__file__).resolve().parent / "sets"


@dataclass
class ModelScores:
    eval_loss: float
    perplexity: float
    tokens: int
    replies: list[str]  # to recipe.eval.prompts
    metrics: dict[str, float] = field(default_factory=dict)
    conversations: list[list[dict]] = field(default_factory=list)  # replayed held-back chats


@dataclass
class EvalResult:
    run_dir: Path
    base: ModelScores | None
    finetuned: ModelScores
    prompts: list[str]
    seconds: float

    def to_json(self) -> dict:
        d = asdict(self)
        d["run_dir"] = str(self.run_dir)
        return d


# Metrics shown in the table: (key, label, which direction is better).
TABLE = [
    ("clean_stop_rate", "clean stops", "up"),
    ("template_leak_rate", "template leaks", "down"),
    ("speaks_for_user_rate", "speaks for user", "down"),
    ("distinct_1", "distinct-1", "up"),
    ("distinct_2", "distinct-2", "up"),
    ("repeated_4gram_rate", "repeated 4-grams across replies", "down"),
    ("self_similarity", "batch self-similarity", "down"),
    ("persona_adherence_rate", "persona adherence", "up"),
    ("persona_margin", "persona margin", "up"),
    ("person_consistency_rate", "keeps grammatical person", "up"),
    ("refusal_rate", "over-refusal (allowed prompts)", "down"),
    ("violation_rate", "policy violations (red team, no gateway)", "down"),
    ("mean_reply_tokens", "mean reply tokens", None),
    ("generation_tokens_per_s", "eval generation tokens/s", None),
]


def eval_loss(model, dataset, batch_size: int = 8) -> tuple[float, int]:
    """Token-weighted mean cross-entropy over every label that is not IGNORE_INDEX."""
    import torch
    import torch.nn.functional as F

    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    rows = list(zip(dataset["input_ids"], dataset["labels"]))
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            batch = rows[i : i + batch_size]
            width = max(len(ids) for ids, _ in batch)
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
            attn = torch.zeros(len(batch), width, dtype=torch.long)
            for j, (x, y) in enumerate(batch):
                ids[j, : len(x)] = torch.tensor(x)
                labels[j, : len(y)] = torch.tensor(y)
                attn[j, : len(x)] = 1
            logits = model(input_ids=ids.to(device), attention_mask=attn.to(device), use_cache=False).logits.float()
            shift_logits, shift_labels = logits[:, :-1], labels[:, 1:].to(device)
            loss = F.cross_entropy(
                shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
                ignore_index=IGNORE_INDEX, reduction="sum",
            )
            total += loss.item()
            count += int((shift_labels != IGNORE_INDEX).sum())
    return total / max(count, 1), count


def _read_set(name: str, key: str) -> list[str]:
    return [json.loads(line)[key] for line in (SETS / name).read_text(encoding="utf-8").splitlines() if line.strip()]


def eval_conversations(prepared: PreparedData, limit: int) -> list[list[dict]]:
    """Held-back conversations (train when there is no validation split) to replay."""
    return held_back_conversations(prepared.val_jsonl, prepared.train_jsonl, bool(prepared.counts["val"]), limit)


def replay(generate: Generator, conversations: list[list[dict]]) -> list[list[Generation]]:
    """Each conversation's user turns in order, every reply generated with the model's own history."""
    histories = [[m for m in c if m["role"] == "system"][:1] for c in conversations]
    users = [[m["content"] for m in c if m["role"] == "user"] for c in conversations]
    replies: list[list[Generation]] = [[] for _ in conversations]
    for turn in range(max((len(u) for u in users), default=0)):
        active = [i for i, u in enumerate(users) if turn < len(u)]
        for i in active:
            histories[i].append({"role": "user", "content": users[i][turn]})
        for i, gen in zip(active, generate([histories[i] for i in active])):
            histories[i].append({"role": "assistant", "content": gen.text})
            replies[i].append(gen)
    return replies


def roleplay_metrics(
    generate: Generator, recipe: Recipe, prepared: PreparedData, encoder, screener, markers: list[str]
) -> tuple[dict[str, float], list[list[dict]]]:
    cfg = recipe.eval
    convs = eval_conversations(prepared, cfg.max_conversations)
    replayed = replay(generate, convs)
    flat = [g for r in replayed for g in r]
    m: dict[str, float] = {}
    if flat:
        m["clean_stop_rate"] = sum(M.clean_stop(g.token_ids, set(generate.stop_ids), cfg.max_new_tokens) for g in flat) / len(flat)
        m["template_leak_rate"] = sum(M.leaks_template(g.text, markers) for g in flat) / len(flat)
        m["speaks_for_user_rate"] = sum(M.speaks_for_user(g.text) for g in flat) / len(flat)
        m["distinct_1"] = sum(M.distinct_n(g.text, 1) for g in flat) / len(flat)
        m["distinct_2"] = sum(M.distinct_n(g.text, 2) for g in flat) / len(flat)
        multi = [r for r in replayed if len(r) > 1]
        m["repeated_4gram_rate"] = (sum(M.repeated_ngram_rate([g.text for g in r]) for r in multi) / len(multi)) if multi else 0.0
        m["mean_reply_tokens"] = sum(len(g.token_ids) for g in flat) / len(flat)
        firsts = [r[0].text for r in replayed if r]
        m["self_similarity"] = M.mean_pairwise_similarity(encoder.encode(firsts))
        m.update(_persona_scores(convs, replayed, encoder))
    if cfg.over_refusal:
        system = [{"role": "system", "content": convs[0][0]["content"]}] if convs and convs[0][0]["role"] == "system" else []
        allowed = generate([system + [{"role": "user", "content": p}] for p in _read_set("allowed.jsonl", "prompt")])
        m["refusal_rate"] = sum(M.is_refusal(g.text) for g in allowed) / len(allowed)
    if cfg.red_team and screener is not None:
        red = generate([[{"role": "user", "content": p}] for p in _read_set("redteam.jsonl", "prompt")])
        decisions = screener.screen_batch([g.text for g in red])
        m["violation_rate"] = sum(not d.allowed for d in decisions) / len(decisions)
    conversations = [
        [*c[:1], *[x for u, g in zip([m_ for m_ in c if m_["role"] == "user"], r) for x in
                   ({"role": "user", "content": u["content"]}, {"role": "assistant", "content": g.text})]]
        for c, r in zip(convs[:3], replayed[:3])
    ]
    return m, conversations


def _persona_scores(convs, replayed, encoder) -> dict[str, float]:
    """Contrastive persona adherence of first replies, and grammatical-person consistency."""
    personas = sorted({c[0]["content"] for c in convs if c and c[0]["role"] == "system"})
    distractors = _read_set("personas.jsonl", "persona")
    if not personas:
        return {}
    all_personas = personas + [d for d in distractors if d not in personas]
    own, texts, person_ok = [], [], []
    for c, r in zip(convs, replayed):
        if not r or c[0]["role"] != "system":
            continue
        own.append(all_personas.index(c[0]["content"]))
        texts.append(" ".join(g.text for g in r))
        expected = M.grammatical_person(" ".join(m["content"] for m in c if m["role"] == "assistant"))
        if expected != "unknown":
            person_ok.append(M.grammatical_person(texts[-1]) == expected)
    margins = M.persona_adherence(encoder.encode(texts), encoder.encode(all_personas), own) if texts else []
    out = {"persona_adherence_rate": sum(x > 0 for x in margins) / len(margins), "persona_margin": sum(margins) / len(margins)} if margins else {}
    if person_ok:
        out["person_consistency_rate"] = sum(person_ok) / len(person_ok)
    return out


def _scores(model, tokenizer, val_ds, recipe, prepared, encoder, screener, stop_ids, markers) -> ModelScores:
    from llmtune.train.sft import sample_prompts

    loss, tokens = eval_loss(model, val_ds) if val_ds is not None else (float("nan"), 0)
    cfg = recipe.eval
    sampling = Sampling(cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.batch_size, recipe.training.seed)
    generate = Generator(model, tokenizer, sampling, stop_ids)
    replies = [g.text for g in generate(sample_prompts(recipe, prepared))]
    metrics, conversations = roleplay_metrics(generate, recipe, prepared, encoder, screener, markers) \
        if recipe.eval.max_conversations else ({}, [])
    metrics["generation_tokens_per_s"] = generate.tokens / generate.seconds if generate.seconds else 0.0
    return ModelScores(eval_loss=loss, perplexity=math.exp(min(loss, 50)), tokens=tokens, replies=replies,
                       metrics=metrics, conversations=conversations)


def evaluate(recipe: Recipe) -> EvalResult:
    from datasets import load_from_disk
    from peft import PeftModel

    from llmtune.eval.embed import SentenceEncoder
    from llmtune.export.presets import role_sequences
    from llmtune.moderation import load_screener
    from llmtune.report import write_run_report
    from llmtune.train.sft import configure_threads, sample_prompts, trained_adapter

    run_dir = recipe.run_dir
    adapter_dir = trained_adapter(recipe)
    prepared = PreparedData.load(run_dir)
    configure_threads(recipe.training.num_threads)
    start = time.time()

    tokenizer = load_tokenizer(str(adapter_dir))  # carries the template used in training
    model = load_base_model(recipe, placement_for(recipe))
    val_ds = load_from_disk(str(prepared.val_tokenized)) if prepared.counts["val"] else None
    stop_ids = [tokenizer.convert_tokens_to_ids(prepared.end_of_turn)]
    seq = role_sequences(tokenizer, prepared.chat_template, prepared.end_of_turn)
    markers = sorted({s.strip() for s in (seq.user_prefix, seq.assistant_prefix, seq.system_prefix, prepared.end_of_turn) if s.strip()})
    needs_gen = recipe.eval.max_conversations > 0
    encoder = SentenceEncoder() if needs_gen else None
    screener = load_screener() if needs_gen and recipe.eval.red_team else None

    args = (tokenizer, val_ds, recipe, prepared, encoder, screener, stop_ids, markers)
    base = _scores(model, *args) if recipe.eval.compare_base else None
    model = PeftModel.from_pretrained(model, str(adapter_dir))
    finetuned = _scores(model, *args)

    result = EvalResult(run_dir, base, finetuned, [p[-1]["content"] for p in sample_prompts(recipe, prepared)], time.time() - start)
    (run_dir / "eval.json").write_text(json.dumps(result.to_json(), indent=2, ensure_ascii=False))
    _plots(result, run_dir)
    print_eval(result)
    write_run_report(recipe)
    return result


def _plots(result: EvalResult, run_dir: Path) -> None:
    from llmtune.report import plot_side_by_side

    models = [("base", result.base), ("fine-tune", result.finetuned)] if result.base else [("fine-tune", result.finetuned)]
    replies = {name: [m["content"] for c in s.conversations for m in c if m["role"] == "assistant"] for name, s in models}
    if any(replies.values()):
        plot_side_by_side({n: [M.distinct_n(t, 2) for t in r] for n, r in replies.items()}, run_dir / "eval_distinct2.png",
                          "distinct-2 per reply (higher: less repetition)", "distinct-2")
        plot_side_by_side({n: [len(M.words(t)) for t in r] for n, r in replies.items()}, run_dir / "eval_lengths.png",
                          "reply length (words)", "words")


def rows(result: EvalResult) -> list[tuple[str, str, str, str]]:
    """(label, base, fine-tune, delta) for the table in the terminal and report.md."""
    b, f = result.base, result.finetuned
    out = []
    for name, attr in (("eval loss", "eval_loss"), ("perplexity", "perplexity")):
        bv, fv = (getattr(b, attr) if b else None), getattr(f, attr)
        out.append((name, f"{bv:.4f}" if bv is not None else "-", f"{fv:.4f}", f"{fv - bv:+.4f}" if bv is not None else "-"))
    for key, label, _ in TABLE:
        if key not in f.metrics:
            continue
        bv = b.metrics.get(key) if b else None
        fv = f.metrics[key]
        out.append((label, f"{bv:.3f}" if bv is not None else "-", f"{fv:.3f}", f"{fv - bv:+.3f}" if bv is not None else "-"))
    return out


def print_eval(result: EvalResult) -> None:
    table = Table(title="eval: fine-tune vs base (same prompts, same seed)")
    for col, justify in (("metric", "left"), ("base", "right"), ("fine-tune", "right"), ("delta", "right")):
        table.add_column(col, justify=justify)
    for row in rows(result):
        table.add_row(*row)
    console.print(table)
    b, f = result.base, result.finetuned
    for i, prompt in enumerate(result.prompts):
        console.print(f"[bold]user[/]: {prompt}")
        if b:
            console.print(f"  [dim]base[/]:      {b.replies[i]}")
        console.print(f"  [green]fine-tune[/]: {f.replies[i]}")
