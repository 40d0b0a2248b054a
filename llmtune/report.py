"""Plots (PNG) and the run's report.md."""

from __future__ import annotations

import json
from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_histogram(values: list[int], out: Path, title: str, bins: int = 30) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(values, bins=bins, color="#4477aa")
    ax.set_title(title)
    ax.set_xlabel("tokens")
    ax.set_ylabel("conversations")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_loss_curve(metrics: list[dict], out: Path, base_eval_loss: float | None = None) -> Path:
    plt = _pyplot()
    train = [(m["step"], m["loss"]) for m in metrics if "loss" in m]
    evals = [(m["step"], m["eval_loss"]) for m in metrics if "eval_loss" in m]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if train:
        ax.plot(*zip(*train), label="train loss", color="#4477aa")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss", color="#ee6677")
    if base_eval_loss is not None:
        ax.axhline(base_eval_loss, ls="--", color="#999999", label="base model eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.set_title("Loss")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def plot_preference_curve(metrics: list[dict], out: Path, method: str) -> Path:
    """The preference stage over steps: loss, and the reward margin and accuracy TRL logs (train and held out)."""
    plt = _pyplot()
    fig, (loss_ax, reward_ax) = plt.subplots(1, 2, figsize=(9, 3.5))
    for key, label, style, color in (("loss", "train loss", "-", "#4477aa"), ("eval_loss", "held-out loss", "o-", "#ee6677")):
        points = [(m["step"], m[key]) for m in metrics if key in m]
        if points:
            loss_ax.plot(*zip(*points), style, label=label, color=color)
    loss_ax.set_xlabel("step")
    loss_ax.set_ylabel(f"{method} loss")
    loss_ax.set_title(f"{method.upper()} loss")
    for key, label, style, color in (
        ("rewards/margins", "reward margin (train)", "-", "#228833"),
        ("eval_rewards/margins", "reward margin (held out)", "o-", "#117733"),
        ("rewards/accuracies", "reward accuracy (train)", "-", "#ccbb44"),
        ("eval_rewards/accuracies", "reward accuracy (held out)", "o-", "#aa7700"),
    ):
        points = [(m["step"], m[key]) for m in metrics if key in m]
        if points:
            reward_ax.plot(*zip(*points), style, label=label, color=color)
    reward_ax.axhline(0, ls=":", color="#999999")
    reward_ax.set_xlabel("step")
    reward_ax.set_title("implicit reward (TRL's logs)")
    for ax in (loss_ax, reward_ax):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def write_run_report(recipe) -> Path:
    """report.md in the run directory, assembled from what the stages left there."""
    run_dir = recipe.run_dir
    lines = [f"# Run report: {recipe.name}", ""]
    if recipe.description:
        lines += [recipe.description, ""]
    lines += [f"Base model: `{recipe.model.base}`; resolved recipe: `recipe.yaml`.", ""]

    prepared = run_dir / "data" / "prepared.json"
    if prepared.exists():
        from llmtune.data.prepare import reconciliation

        c = json.loads(prepared.read_text())["counts"]
        lines += [
            "## Data",
            "",
            f"{reconciliation(c)}; "
            f"{c['train']} train / {c['val']} validation conversations, {c['trained_tokens']:,} trained tokens. "
            "Details: [data/data_report.md](data/data_report.md).",
            "",
        ]

    metrics = read_metrics(run_dir / "metrics.jsonl")
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

    eval_json = run_dir / "eval.json"
    e = json.loads(eval_json.read_text()) if eval_json.exists() else None
    if e:
        from llmtune.eval.evaluate import EvalResult, ModelScores, rows

        result = EvalResult(run_dir, ModelScores(**e["base"]) if e["base"] else None, ModelScores(**e["finetuned"]),
                            e["prompts"], e["seconds"], ModelScores(**e["sft"]) if e.get("sft") else None)
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
    out = run_dir / "report.md"
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    # The loss curve is redrawn with the base model's eval loss for reference.
    if metrics:
        base = e["base"] if e else None
        plot_loss_curve(metrics, run_dir / "loss_curve.png", base["eval_loss"] if base else None)
    return out


def _review_section(run_dir: Path) -> list[str]:
    """Blind side-by-side judgments (`llmtune review`), from each review's results.json."""
    found = sorted(run_dir.glob("review/vs-*/results.json"))
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
    run_dir = recipe.run_dir
    prepared = run_dir / "data" / "preference" / "prepared.json"
    metrics = read_metrics(run_dir / "preference" / "metrics.jsonl")
    if not prepared.exists() and not metrics:
        return []
    lines = ["## Preference tuning", ""]
    if prepared.exists():
        from llmtune.data.preference import reconciliation

        c = json.loads(prepared.read_text())["counts"]
        dropped = sum(c["rejected_blocked"].values())
        lines += [f"Data: {reconciliation(c)}; {c['pairs']} pairs; {c['train']} train / {c['val']} held out "
                  f"({c['val_pairs']} held-out pairs)" + (f"; {dropped} rejected replies dropped by moderation" if dropped else "")
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


def plot_preference_eval(scores: dict[str, dict], keys: list[tuple[str, str]], out: Path) -> Path:
    """One panel per metric (preference accuracy, slop...), one bar per model, left to right."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3.4), squeeze=False)
    colors = ["#999999", "#4477aa", "#228833"][-len(scores):]
    for ax, (key, label) in zip(axes[0], keys):
        names = [n for n in scores if key in scores[n]]
        bars = ax.bar(names, [scores[n][key] for n in names], color=colors[-len(names):] if names else colors)
        ax.bar_label(bars, fmt="%.2f")
        ax.set_title(label, fontsize=8)
        ax.tick_params(axis="x", labelsize=7)
        ax.margins(y=0.2)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _cell(text: str) -> str:
    return text.replace("|", "/").replace("\n", " ")


def plot_side_by_side(series: dict[str, list[float]], out: Path, title: str, xlabel: str) -> Path:
    """Overlaid histograms of one metric per model (base vs fine-tune)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for (name, values), color in zip(series.items(), ("#999999", "#228833", "#4477aa")):
        if values:
            ax.hist(values, bins=20, alpha=0.6, label=name, color=color)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("replies")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
