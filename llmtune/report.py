"""The run's report.md, assembled from what the stages left in the run directory.

Written once per command by the top of the pipeline (`llmtune run`, and the CLI after a stage
or a review), never by a stage itself: it reads every stage's artifacts, so it sits above them.
"""

from __future__ import annotations

import json
from pathlib import Path

from llmtune.artifacts import PreparedData, PreparedPreference, RunDir, preference_reconciliation, read_metrics, reconciliation


def write_run_report(recipe) -> Path:
    """report.md in the run directory, assembled from what the stages left there."""
    run_dir = recipe.run_dir
    run = RunDir(run_dir)
    lines = [f"# Run report: {recipe.name}", ""]
    if recipe.description:
        lines += [recipe.description, ""]
    lines += [f"Base model: `{recipe.model.base}`; resolved recipe: `recipe.yaml`.", ""]

    if run.prepared.exists():
        c = PreparedData.load(run_dir).counts
        lines += [
            "## Data",
            "",
            f"{reconciliation(c)}; "
            f"{c.train} train / {c.val} validation conversations, {c.trained_tokens:,} trained tokens. "
            "Details: [data/data_report.md](data/data_report.md).",
            "",
        ]

    metrics = read_metrics(run.metrics)
    if metrics:
        final = [m for m in metrics if "train_runtime" in m]
        lora, t = recipe.lora, recipe.training
        lines += [
            "## Training",
            "",
            f"{'QLoRA (NF4)' if recipe.quantization.mode == 'nf4' else 'LoRA'} r={lora.rank} alpha={lora.alpha} "
            f"on {lora.target_modules}; lr {t.learning_rate} {t.lr_scheduler}; micro-batch {t.micro_batch_size} x "
            f"accumulation {t.gradient_accumulation_steps}; max_seq_length {recipe.data.max_seq_length}.",
        ]
        if final:
            f = final[-1]
            lines.append(f"{f['step']} steps in {f['train_runtime']:.0f}s ({f.get('train_samples_per_second', 0):.2f} samples/s).")
        lines += ["", "![loss curve](loss_curve.png)", ""]

    lines += preference_section(recipe)

    if run.eval_json.exists():
        from llmtune.eval.evaluate import EvalResult, rows

        result = EvalResult.load(run_dir)
        cols = result.columns()
        names = [name for name, _ in cols]
        lines += [f"## Evaluation ({' vs '.join(names)}: same prompts, same seed)", "",
                  "| metric | " + " | ".join(names) + " | delta |", "|---" * (len(names) + 2) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows(result)]
        lines += ["", "Metric definitions: docs/evaluation.md in the llmtune repository."]
        for png in ("eval_preference.png", "eval_distinct2.png", "eval_lengths.png"):
            if (run_dir / png).exists():
                lines += ["", f"![{png}]({png})"]
        lines += ["", "### Sample replies", ""]
        f = result.finetuned
        for i, prompt in enumerate(result.prompts):
            lines.append(f"**user:** {prompt}  ")
            lines += [f"**{name}:** {scores.replies[i]}  " for name, scores in cols[:-1]]
            lines += [f"**{cols[-1][0]}:** {f.replies[i]}", ""]
        if f.conversations:
            lines += ["### Side by side: held-back conversations replayed", ""]
            prev_name, prev = cols[-2] if len(cols) > 1 else ("base", None)
            for i, conv in enumerate(f.conversations):
                base_conv = prev.conversations[i] if prev and i < len(prev.conversations) else []
                lines += [f"| turn | {prev_name} | {cols[-1][0]} |", "|---|---|---|"]
                for j, msg in enumerate(conv):
                    if msg["role"] == "system":
                        continue
                    theirs = base_conv[j]["content"] if msg["role"] == "assistant" and j < len(base_conv) else msg["content"]
                    lines.append(f"| {msg['role']} | {_cell(theirs)} | {_cell(msg['content'])} |")
                lines.append("")
    lines += _review_section(run_dir)
    run.report.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return run.report


def _review_section(run_dir: Path) -> list[str]:
    """Blind side-by-side judgments (`llmtune review`), from each review's results.json."""
    found = sorted(RunDir(run_dir).review.glob("vs-*/results.json"))
    if not found:
        return []
    lines = ["## Human review (blind, side by side)", ""]
    names = {"run_a": None, "run_b": None, "tie": "tie", "both_bad": "both bad", None: "not judged"}
    for path in found:
        r = json.loads(path.read_text(encoding="utf-8"))
        rel = path.parent.relative_to(run_dir).as_posix()
        names.update(run_a=f"{r['label_a']} better", run_b=f"{r['label_b']} better")
        lines += [f"### {r['label_a']} vs {r['label_b']}", "", r["summary"] + ".", "",
                  f"![review results]({rel}/results.png)", "",
                  "| # | prompt | verdict | note |", "|---|---|---|---|"]
        for o in r["outcomes"]:
            verdict = names[o["verdict"]] if o["verdict"] or not o["withheld"] else "withheld by the screen"
            lines.append(f"| {o['id']} | {_cell(o['prompt'])} | {verdict} | {_cell(o['note'])} |")
        lines += ["", f"Replies and verdicts: `{rel}/results.json`; training pairs: `llmtune review export {run_dir}`.", ""]
    return lines


def preference_section(recipe) -> list[str]:
    """The preference stage in report.md: data, method, the run of it (TRL's held-out rewards), the curve."""
    run = RunDir(recipe.run_dir)
    metrics = read_metrics(run.preference_metrics)
    if not run.preference_prepared.exists() and not metrics:
        return []
    lines = ["## Preference tuning", ""]
    if run.preference_prepared.exists():
        c = PreparedPreference.load(run.root).counts
        dropped = sum(c.rejected_blocked.values())
        lines += [f"Data: {preference_reconciliation(c)}; {c.pairs} pairs; {c.train} train / {c.val} held out "
                  f"({c.val_pairs} held-out pairs)" + (f"; {dropped} rejected replies dropped by moderation" if dropped else "")
                  + ". Details: [data/data_report.md](data/data_report.md).", ""]
    p = recipe.preference
    if metrics and p is not None:
        final = [m for m in metrics if "train_runtime" in m]
        evals = [m for m in metrics if "eval_loss" in m]
        lines.append(f"Method `{p.method}` (beta {p.beta}) from `{p.start_from}`: LoRA r={recipe.lora.rank} "
                     f"alpha={recipe.lora.alpha}; lr {p.learning_rate} {p.lr_scheduler}; micro-batch {p.micro_batch_size} "
                     f"x accumulation {p.gradient_accumulation_steps}.")
        if final:
            f = final[-1]
            lines.append(f"{f['step']} steps in {f['train_runtime']:.0f}s.")
        if evals:
            last = evals[-1]
            shown = [(k, last[k]) for k in ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins") if k in last]
            lines.append("Held out at step {}: ".format(last["step"]) + ", ".join(f"{k.removeprefix('eval_')} {v:.4f}" for k, v in shown)
                         + " (TRL's implicit rewards).")
        lines += ["", "![preference curve](preference_curve.png)", ""]
    return lines


def _cell(text: str) -> str:
    return text.replace("|", "/").replace("\n", " ")


