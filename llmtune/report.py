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

    eval_json = run_dir / "eval.json"
    e = json.loads(eval_json.read_text()) if eval_json.exists() else None
    if e:
        b, f = e["base"], e["finetuned"]
        lines += ["## Evaluation (held-back split)", "", "| metric | base | fine-tune | delta |", "|---|---|---|---|"]
        for name, key in (("eval loss", "eval_loss"), ("perplexity", "perplexity")):
            if b:
                lines.append(f"| {name} | {b[key]:.4f} | {f[key]:.4f} | {f[key] - b[key]:+.4f} |")
            else:
                lines.append(f"| {name} | - | {f[key]:.4f} | - |")
        lines += ["", "### Sample replies", ""]
        for i, prompt in enumerate(e["prompts"]):
            lines.append(f"**user:** {prompt}  ")
            if b:
                lines.append(f"**base:** {b['replies'][i]}  ")
            lines += [f"**fine-tune:** {f['replies'][i]}", ""]
    out = run_dir / "report.md"
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    # The loss curve is redrawn with the base model's eval loss for reference.
    if metrics:
        base = e["base"] if e else None
        plot_loss_curve(metrics, run_dir / "loss_curve.png", base["eval_loss"] if base else None)
    return out
