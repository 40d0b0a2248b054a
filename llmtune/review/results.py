"""What the judgments say: RUN_A's win rate over RUN_B with a 95% interval, ties, per-pair outcomes.

The win rate counts decisive verdicts only (RUN_A or RUN_B preferred); ties and "both bad"
are reported beside it, not folded in. The interval is the Wilson score interval (scipy's
`binomtest(...).proportion_ci(method="wilson")`), which stays inside [0, 1] and is sound for
the handful of judgments a person makes in one sitting. `results.json` and `results.png` sit
in the review's directory, and the run's report.md shows them.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from llmtune.review.store import ReviewStore


@dataclass
class Outcome:
    id: int
    kind: str
    source: str
    prompt: str  # the last user turn, which both replies answer
    reply_a: str | None
    reply_b: str | None
    withheld: list[str]  # which side's reply the screen blocked, and why
    verdict: str | None  # run_a, run_b, tie, both_bad; None while unjudged or withheld
    note: str


@dataclass
class ReviewResults:
    label_a: str
    label_b: str
    pairs: int
    to_judge: int
    judged: int
    withheld: int
    wins_a: int
    wins_b: int
    ties: int
    both_bad: int
    win_rate_a: float | None  # wins_a / (wins_a + wins_b)
    ci_low: float | None
    ci_high: float | None
    left_chosen: int  # of the decisive verdicts, how many went to the left reply (position bias check)
    outcomes: list[Outcome] = field(default_factory=list)

    @property
    def decisive(self) -> int:
        return self.wins_a + self.wins_b

    def summary(self) -> str:
        """One sentence for the terminal and report.md."""
        if not self.decisive:
            head = f"{self.label_a} vs {self.label_b}: no decisive verdict yet"
        else:
            head = (f"{self.label_a} preferred over {self.label_b} in {self.wins_a} of {self.decisive} decisive judgments: "
                    f"win rate {self.win_rate_a:.2f} (95% CI {self.ci_low:.2f}-{self.ci_high:.2f}, Wilson)")
        return (f"{head}; {self.ties} tie{'' if self.ties == 1 else 's'}, {self.both_bad} both bad; {self.judged} of {self.to_judge} pairs judged; "
                f"{self.withheld} withheld by the moderation screen")

    def to_json(self) -> dict:
        return {**asdict(self), "decisive": self.decisive, "summary": self.summary()}


def wilson_interval(successes: int, trials: int, confidence: float = 0.95) -> tuple[float, float]:
    from scipy.stats import binomtest

    ci = binomtest(successes, trials).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


def summarise(store: ReviewStore) -> ReviewResults:
    meta, items, judgments = store.meta(), store.items(), store.judgments()
    outcomes, counts, left = [], dict.fromkeys(("run_a", "run_b", "tie", "both_bad"), 0), 0
    for item in items:
        j = judgments.get(item.id)
        if j:
            counts[j.verdict] += 1
            if j.verdict in ("run_a", "run_b"):
                left += (j.verdict == "run_a") == item.a_on_left
        withheld = [f"{meta['label_a' if side == 'a' else 'label_b']}: {why}"
                    for side, why in (("a", item.withheld_a), ("b", item.withheld_b)) if why]
        prompt = next((m["content"] for m in reversed(item.messages) if m["role"] == "user"), "")
        outcomes.append(Outcome(item.id, item.kind, item.source, prompt, item.reply_a, item.reply_b, withheld,
                                j.verdict if j else None, j.note if j else ""))
    wins_a, wins_b = counts["run_a"], counts["run_b"]
    rate = low = high = None
    if wins_a + wins_b:
        rate = wins_a / (wins_a + wins_b)
        low, high = wilson_interval(wins_a, wins_a + wins_b)
    p = store.progress()
    return ReviewResults(meta["label_a"], meta["label_b"], p["pairs"], p["to_judge"], p["judged"], p["withheld"],
                         wins_a, wins_b, counts["tie"], counts["both_bad"], rate, low, high, left, outcomes)


def plot_results(r: ReviewResults, out: Path) -> Path:
    """Verdict counts, and the win rate with its 95% interval against the 50% line."""
    from matplotlib.ticker import MaxNLocator

    from llmtune.plots import pyplot

    plt = pyplot()
    fig, (counts, rate) = plt.subplots(1, 2, figsize=(8, 3.2), gridspec_kw={"width_ratios": [3, 2]})
    labels = [f"{r.label_a} better", "tie", "both bad", f"{r.label_b} better"]
    values = [r.wins_a, r.ties, r.both_bad, r.wins_b]
    bars = counts.barh(labels[::-1], values[::-1], color=["#4477aa", "#bbbbbb", "#ee6677", "#228833"][::-1])
    counts.bar_label(bars, padding=3)
    counts.set_xlabel("pairs")
    counts.set_title(f"verdicts ({r.judged} of {r.to_judge} pairs judged)")
    counts.set_xlim(0, max(values + [1]) * 1.2)
    counts.xaxis.set_major_locator(MaxNLocator(integer=True))
    rate.axvline(0.5, ls="--", color="#999999")
    if r.win_rate_a is not None:
        rate.errorbar([r.win_rate_a], [0], xerr=[[r.win_rate_a - r.ci_low], [r.ci_high - r.win_rate_a]],
                      fmt="o", color="#4477aa", capsize=6)
        rate.annotate(f"{r.win_rate_a:.2f} [{r.ci_low:.2f}, {r.ci_high:.2f}]", (r.win_rate_a, 0), xytext=(0, 12),
                      textcoords="offset points",
                      ha="right" if r.win_rate_a > 0.8 else "left" if r.win_rate_a < 0.2 else "center")
    else:
        rate.text(0.5, 0, "no decisive verdict yet", ha="center", va="center", color="#777777")
    rate.set_xlim(0, 1)
    rate.set_yticks([])
    rate.set_xlabel(f"{r.label_a} win rate (95% CI)")
    rate.set_title(f"{r.decisive} decisive verdict{'' if r.decisive == 1 else 's'}")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def write_results(store: ReviewStore, directory: Path) -> ReviewResults:
    """results.json and results.png beside the review file."""
    r = summarise(store)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / "results.json.tmp"
    tmp.write_text(json.dumps(r.to_json(), indent=2, ensure_ascii=False), encoding="utf-8")
    tmp.replace(directory / "results.json")
    plot_results(r, directory / "results.png")
    return r
