"""The eval stage: the fine-tune against its base on the held-back split, same prompts.

Entry point: `evaluate(recipe) -> EvalResult`. Loads the base once, measures it, then puts
the trained adapter on it and measures again, so both numbers come from the same weights,
tokens and prompts. Writes eval.json and refreshes report.md.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from rich.table import Table

from llmtune.console import console
from llmtune.config import Recipe
from llmtune.data.prepare import PreparedData
from llmtune.data.template import IGNORE_INDEX
from llmtune.models import load_base_model, load_tokenizer, placement_for



@dataclass
class ModelScores:
    eval_loss: float
    perplexity: float
    tokens: int
    replies: list[str]


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
            logits = model(input_ids=ids.to(device), attention_mask=attn.to(device)).logits.float()
            shift_logits, shift_labels = logits[:, :-1], labels[:, 1:].to(device)
            loss = F.cross_entropy(
                shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
                ignore_index=IGNORE_INDEX, reduction="sum",
            )
            total += loss.item()
            count += int((shift_labels != IGNORE_INDEX).sum())
    return total / max(count, 1), count


def _scores(model, tokenizer, val_ds, prompts, recipe: Recipe, eot: str) -> ModelScores:
    from llmtune.train.callbacks import generate_replies

    loss, tokens = eval_loss(model, val_ds) if val_ds is not None else (float("nan"), 0)
    replies = generate_replies(model, tokenizer, prompts, recipe.eval.max_new_tokens, eot)
    return ModelScores(eval_loss=loss, perplexity=math.exp(min(loss, 50)), tokens=tokens, replies=replies)


def evaluate(recipe: Recipe) -> EvalResult:
    from datasets import load_from_disk
    from peft import PeftModel

    from llmtune.report import write_run_report
    from llmtune.train.sft import configure_threads, sample_prompts

    run_dir = recipe.run_dir
    adapter_dir = run_dir / "adapter"
    if not (adapter_dir / "adapter_config.json").exists():
        raise FileNotFoundError(f"no trained adapter in {adapter_dir}; run the train stage first (llmtune train {recipe.source_path})")
    prepared = PreparedData.load(run_dir)
    configure_threads(recipe.training.num_threads)
    start = time.time()

    tokenizer = load_tokenizer(str(adapter_dir))  # carries the template used in training
    model = load_base_model(recipe, placement_for(recipe))
    val_ds = load_from_disk(str(prepared.val_tokenized)) if prepared.counts["val"] else None
    prompts = sample_prompts(recipe, prepared)

    base = _scores(model, tokenizer, val_ds, prompts, recipe, prepared.end_of_turn) if recipe.eval.compare_base else None
    model = PeftModel.from_pretrained(model, str(adapter_dir))
    finetuned = _scores(model, tokenizer, val_ds, prompts, recipe, prepared.end_of_turn)

    result = EvalResult(run_dir, base, finetuned, [p[-1]["content"] for p in prompts], time.time() - start)
    (run_dir / "eval.json").write_text(json.dumps(result.to_json(), indent=2, ensure_ascii=False))
    print_eval(result)
    write_run_report(recipe)
    return result


def print_eval(result: EvalResult) -> None:
    table = Table(title="eval: fine-tune vs base (held-back split)")
    table.add_column("metric")
    table.add_column("base", justify="right")
    table.add_column("fine-tune", justify="right")
    table.add_column("delta", justify="right")
    b, f = result.base, result.finetuned
    for name, attr in (("eval loss", "eval_loss"), ("perplexity", "perplexity")):
        bv = getattr(b, attr) if b else None
        fv = getattr(f, attr)
        table.add_row(name, f"{bv:.4f}" if bv is not None else "-", f"{fv:.4f}", f"{fv - bv:+.4f}" if bv is not None else "-")
    console.print(table)
    for i, prompt in enumerate(result.prompts):
        console.print(f"[bold]user[/]: {prompt}")
        if b:
            console.print(f"  [dim]base[/]:      {b.replies[i]}")
        console.print(f"  [green]fine-tune[/]: {f.replies[i]}")
