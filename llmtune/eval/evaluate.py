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
- the throughput of the eval's own generation;
- slop: stock phrases per 1,000 words of replies (sets/slop_phrases.txt) and word 4-grams
  repeated across replies;
- with preference data in the run: on the held-out pairs, preference accuracy (does the model
  give the chosen reply a higher mean per-token log-probability than the rejected one) and the
  implicit reward margin against the model before (DPO's β·log-ratio difference).

After a preference stage, the model before it (the SFT adapter) is measured too, so the table
reads base | before preference | after preference.

Writes eval.json and plots; `llmtune run` and `llmtune eval` then rewrite report.md from them.
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
from llmtune.artifacts import PreparedData, RunDir, adapter_origin, sample_prompts, trained_adapter
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
    finetuned: ModelScores  # the run's adapter (after the preference stage when there was one)
    prompts: list[str]
    seconds: float
    sft: ModelScores | None = None  # the SFT adapter the preference stage started from

    def columns(self) -> list[tuple[str, ModelScores]]:
        """(header, scores) left to right: base, before preference, the run's model."""
        cols = [("base", self.base)] if self.base else []
        if self.sft:
            cols.append(("before preference", self.sft))
        cols.append(("after preference" if self.sft else "fine-tune", self.finetuned))
        return cols

    def to_json(self) -> dict:
        d = asdict(self)
        d["run_dir"] = str(self.run_dir)
        return d

    @classmethod
    def load(cls, run_dir: Path) -> "EvalResult":
        """eval.json as the eval stage wrote it."""
        e = json.loads(RunDir(run_dir).eval_json.read_text())

        def scores(d: dict | None) -> ModelScores | None:
            return ModelScores(**d) if d else None

        return cls(run_dir, scores(e["base"]), scores(e["finetuned"]), e["prompts"], e["seconds"], scores(e.get("sft")))


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
    ("slop_per_1k_words", "slop: stock phrases per 1,000 words", "down"),
    ("cross_reply_4gram_rate", "slop: 4-grams repeated across replies", "down"),
    ("preference_accuracy", "preference accuracy (held-out pairs)", "up"),
    ("reward_accuracy", "reward accuracy vs the model before", "up"),
    ("reward_margin", "reward margin vs the model before", "up"),
    ("mean_reply_tokens", "mean reply tokens", None),
    ("generation_tokens_per_s", "eval generation tokens/s", None),
]


def eval_loss(model, dataset, batch_size: int = 8, autocast=None) -> tuple[float, int]:
    """Token-weighted mean cross-entropy over every label that is not IGNORE_INDEX; under CPU autocast to
    `autocast` (a torch dtype) when training ran that way (models.Placement.autocast)."""
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
            with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
                logits = model(input_ids=ids.to(device), attention_mask=attn.to(device), use_cache=False).logits.float()
            shift_logits, shift_labels = logits[:, :-1], labels[:, 1:].to(device)
            loss = F.cross_entropy(
                shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
                ignore_index=IGNORE_INDEX, reduction="sum",
            )
            total += loss.item()
            count += int((shift_labels != IGNORE_INDEX).sum())
    return total / max(count, 1), count


def pair_logps(model, dataset, batch_size: int = 4, autocast=None) -> list[tuple[float, int, float, int]]:
    """(sum log p(chosen), chosen tokens, sum log p(rejected), rejected tokens) per held-out pair, each
    reply scored after its prompt (the tokens prepare made: the run's template and masks); under CPU
    autocast like `eval_loss`."""
    import torch

    model.eval()
    device = next(model.parameters()).device
    out = []
    rows = list(zip(dataset["prompt_ids"], dataset["chosen_ids"], dataset["rejected_ids"]))
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            seqs = [(p, r) for p, c, rj in rows[i: i + batch_size] for r in (c, rj)]
            width = max(len(p) + len(r) for p, r in seqs)
            ids = torch.zeros(len(seqs), width, dtype=torch.long)
            attn = torch.zeros(len(seqs), width, dtype=torch.long)
            for j, (p, r) in enumerate(seqs):
                ids[j, : len(p) + len(r)] = torch.tensor(p + r)
                attn[j, : len(p) + len(r)] = 1
            with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
                logits = model(input_ids=ids.to(device), attention_mask=attn.to(device), use_cache=False).logits.float()
            logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:].to(device).unsqueeze(-1)).squeeze(-1)
            sums = []
            for j, (p, r) in enumerate(seqs):
                sums.append((float(logp[j, len(p) - 1: len(p) + len(r) - 1].sum()), len(r)))
            for k in range(0, len(sums), 2):
                out.append((*sums[k], *sums[k + 1]))
    return out


def preference_scores(logps, reference, beta: float) -> dict[str, float]:
    """Preference accuracy (mean per-token log-prob of chosen above rejected: no reference, no length
    bias) and, against `reference` (the model before), DPO's implicit reward accuracy and margin,
    β·[(log π(c) − log π_ref(c)) − (log π(r) − log π_ref(r))]."""
    if not logps:
        return {}
    out = {"preference_accuracy": sum(c / nc > r / nr for c, nc, r, nr in logps) / len(logps)}
    if reference is logps:  # the reference against itself: no margin, by definition
        out.update(reward_accuracy=0.0, reward_margin=0.0)
    elif reference is not None:
        margins = [beta * ((c - rc) - (r - rr)) for (c, _, r, _), (rc, _, rr, _) in zip(logps, reference)]
        out["reward_accuracy"] = sum(x > 0 for x in margins) / len(margins)
        out["reward_margin"] = sum(margins) / len(margins)
    return out


def _read_set(name: str, key: str) -> list[str]:
    return [json.loads(line)[key] for line in (SETS / name).read_text(encoding="utf-8").splitlines() if line.strip()]


def eval_conversations(prepared: PreparedData, limit: int) -> list[list[dict]]:
    """Held-back conversations (train when there is no validation split) to replay."""
    return held_back_conversations(prepared.val_jsonl, prepared.train_jsonl, bool(prepared.counts.val), limit)


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
        m["slop_per_1k_words"] = M.slop_per_1k_words([g.text for g in flat])
        m["cross_reply_4gram_rate"] = M.cross_reply_ngram_rate([g.text for g in flat])
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


def _scores(model, tokenizer, val_ds, recipe, prepared, encoder, screener, stop_ids, markers, autocast=None) -> ModelScores:
    # Scoring follows the training precision; generation (a token at a time) stays in the weights' dtype.
    loss, tokens = eval_loss(model, val_ds, autocast=autocast) if val_ds is not None else (float("nan"), 0)
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

    from llmtune.data.template import role_sequences
    from llmtune.distributed import configure_threads
    from llmtune.eval.embed import SentenceEncoder
    from llmtune.moderation import load_screener

    run_dir = recipe.run_dir
    adapter_dir = trained_adapter(recipe)
    origin = adapter_origin(run_dir)
    before_dir = run_dir / origin["before"] if origin and origin.get("before") else None
    prepared = PreparedData.load(run_dir)
    pairs_dir = RunDir(run_dir).preference_data / "tokenized" / "val_pairs"
    pairs = load_from_disk(str(pairs_dir)) if pairs_dir.exists() else None
    pairs = pairs if pairs is not None and len(pairs) else None
    beta = recipe.preference.beta if recipe.preference else 0.1
    configure_threads(recipe.training.num_threads)
    start = time.time()

    tokenizer = load_tokenizer(str(adapter_dir))  # carries the template used in training
    where = placement_for(recipe)
    model = load_base_model(recipe, where)
    val_ds = load_from_disk(str(prepared.val_tokenized)) if prepared.counts.val else None
    stop_ids = [tokenizer.convert_tokens_to_ids(prepared.end_of_turn)]
    seq = role_sequences(tokenizer, prepared.chat_template, prepared.end_of_turn)
    markers = sorted({s.strip() for s in (seq.user_prefix, seq.assistant_prefix, seq.system_prefix, prepared.end_of_turn) if s.strip()})
    needs_gen = recipe.eval.max_conversations > 0
    encoder = SentenceEncoder() if needs_gen else None
    screener = load_screener() if needs_gen and recipe.eval.red_team else None

    args = (tokenizer, val_ds, recipe, prepared, encoder, screener, stop_ids, markers)
    # Held-out pairs: each model's log-probs; the model before (SFT, else base) is the reference.
    logps = {"base": pair_logps(model, pairs, autocast=where.autocast)} if pairs is not None else {}
    base = _scores(model, *args, autocast=where.autocast) if recipe.eval.compare_base else None
    sft = None
    if before_dir is not None:
        model = PeftModel.from_pretrained(model, str(before_dir), adapter_name="before")
        logps["sft"] = pair_logps(model, pairs, autocast=where.autocast) if pairs is not None else None
        sft = _scores(model, *args, autocast=where.autocast)
        model.load_adapter(str(adapter_dir), adapter_name="after")
        model.set_adapter("after")
    else:
        model = PeftModel.from_pretrained(model, str(adapter_dir))
    if pairs is not None:
        logps["after"] = pair_logps(model, pairs, autocast=where.autocast)
    finetuned = _scores(model, *args, autocast=where.autocast)
    if pairs is not None:
        reference = logps["sft"] if sft is not None else logps["base"]
        for scores, key in ((base, "base"), (sft, "sft"), (finetuned, "after")):
            if scores is not None:
                scores.metrics.update(preference_scores(logps[key], reference, beta))

    result = EvalResult(run_dir, base, finetuned, [p[-1]["content"] for p in sample_prompts(recipe, prepared)],
                        time.time() - start, sft)
    RunDir(run_dir).eval_json.write_text(json.dumps(result.to_json(), indent=2, ensure_ascii=False))
    _plots(result, run_dir)
    print_eval(result)
    return result


def _plots(result: EvalResult, run_dir: Path) -> None:
    from llmtune.plots import plot_preference_eval, plot_side_by_side

    models = result.columns()
    replies = {name: [m["content"] for c in s.conversations for m in c if m["role"] == "assistant"] for name, s in models}
    if any(replies.values()):
        plot_side_by_side({n: [M.distinct_n(t, 2) for t in r] for n, r in replies.items()}, run_dir / "eval_distinct2.png",
                          "distinct-2 per reply (higher: less repetition)", "distinct-2")
        plot_side_by_side({n: [len(M.words(t)) for t in r] for n, r in replies.items()}, run_dir / "eval_lengths.png",
                          "reply length (words)", "words")
    keys = [k for k in ("preference_accuracy", "slop_per_1k_words", "cross_reply_4gram_rate")
            if any(k in s.metrics for _, s in models)]
    if "preference_accuracy" in keys or result.sft is not None:
        labels = {key: label for key, label, _ in TABLE}
        plot_preference_eval({name: s.metrics for name, s in models}, [(k, labels[k]) for k in keys],
                             run_dir / "eval_preference.png")


def rows(result: EvalResult) -> list[tuple[str, ...]]:
    """(label, one value per column of result.columns(), delta of the last column against the one
    before it) for the table in the terminal and report.md."""
    cols = [s for _, s in result.columns()]
    out = []

    def row(label: str, values: list[float | None], digits: int) -> tuple[str, ...]:
        shown = [f"{v:.{digits}f}" if v is not None else "-" for v in values]
        last, prev = values[-1], values[-2] if len(values) > 1 else None
        delta = f"{last - prev:+.{digits}f}" if last is not None and prev is not None else "-"
        return (label, *shown, delta)

    for name, attr in (("eval loss", "eval_loss"), ("perplexity", "perplexity")):
        out.append(row(name, [getattr(s, attr) for s in cols], 4))
    for key, label, _ in TABLE:
        if not any(key in s.metrics for s in cols):
            continue
        out.append(row(label, [s.metrics.get(key) for s in cols], 3))
    return out


def print_eval(result: EvalResult) -> None:
    cols = result.columns()
    table = Table(title=f"eval: {' vs '.join(name for name, _ in cols)} (same prompts, same seed)")
    table.add_column("metric", justify="left")
    for name, _ in cols:
        table.add_column(name, justify="right")
    table.add_column("delta", justify="right")
    for row in rows(result):
        table.add_row(*row)
    console.print(table)
    width = max(len(name) for name, _ in cols) + 1
    for i, prompt in enumerate(result.prompts):
        console.print(f"[bold]user[/]: {prompt}")
        for name, scores in cols:
            console.print(f"  [{'green' if scores is result.finetuned else 'dim'}]{name + ':':<{width}}[/] {scores.replies[i]}")
