"""PNG plots a person would rather look at than a table. Imports nothing from llmtune."""

from __future__ import annotations

from pathlib import Path


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_histogram(values: list[int], out: Path, title: str, bins: int = 30) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(values, bins=bins, color="#4477aa")
    ax.set_title(title)
    ax.set_xlabel("tokens")
    ax.set_ylabel("conversations")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def plot_loss_curve(metrics: list[dict], out: Path) -> Path:
    """Train loss per logged step, and the held-out loss at each evaluation."""
    plt = pyplot()
    train = [(m["step"], m["loss"]) for m in metrics if "loss" in m]
    evals = [(m["step"], m["eval_loss"]) for m in metrics if "eval_loss" in m]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if train:
        ax.plot(*zip(*train), label="train loss", color="#4477aa")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss", color="#ee6677")
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
    plt = pyplot()
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


def plot_preference_eval(scores: dict[str, dict], keys: list[tuple[str, str]], out: Path) -> Path:
    """One panel per metric (preference accuracy, slop...), one bar per model, left to right."""
    plt = pyplot()
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


def plot_side_by_side(series: dict[str, list[float]], out: Path, title: str, xlabel: str) -> Path:
    """Overlaid histograms of one metric per model (base vs fine-tune)."""
    plt = pyplot()
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
