"""Measure the screen on a labelled split: `evaluate_moderation(split, ...) -> ModerationEval`.

Behind `llmtune moderation eval [--split test] [--adapter DIR] [--json]`. For each category it
reports precision, recall and false-positive rate of the full screen (rules + adapter, as
`prepare` and the gateway use it), and recall of each layer alone; recall on obfuscated
positives; and the block rate on each kind of allowed row, in particular benign adult fiction
and non-sexual mentions of children (the over-blocking targets). It writes metrics.json,
confusion.md (per-category confusion counts and per-group block rates) and pr_curves.png
(the adapter's precision-recall curve per category, the calibrated threshold marked).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from llmtune.console import console
from llmtune.moderation.policy import BUILTIN_CATEGORIES, ModerationConfig
from llmtune.moderation.train import Row, read_rows

# Row groups (data/moderation/*.jsonl "group") that make up the two over-blocking targets.
ADULT_FICTION_GROUPS = ("adult_romance", "adult_age_odd", "name_collision", "idiom", "general", "real_nonsexual")
CHILDREN_NONSEXUAL_GROUPS = ("child_nonsexual", "school_nonsexual", "mixed_family")
DATA_DIR = Path("data/moderation")


@dataclass
class ModerationEval:
    split: str
    rows: int
    per_category: dict
    groups: dict
    fpr_adult_fiction: float
    fpr_children_nonsexual: float
    fpr_all_allowed: float
    obfuscated_recall: dict
    out_dir: Path

    def to_json(self) -> dict:
        return {
            "split": self.split, "rows": self.rows, "per_category": self.per_category, "groups": self.groups,
            "fpr_adult_fiction": self.fpr_adult_fiction, "fpr_children_nonsexual": self.fpr_children_nonsexual,
            "fpr_all_allowed": self.fpr_all_allowed, "obfuscated_recall": self.obfuscated_recall, "out_dir": str(self.out_dir),
        }


def _ratio(a: int, b: int) -> float:
    return round(a / b, 4) if b else float("nan")


def resolve_split(split: str, data_dir: Path = DATA_DIR) -> Path:
    """`test`/`dev`/`train` under data/moderation, or a path to a JSONL file."""
    path = Path(split)
    return path if path.suffix == ".jsonl" or path.is_file() else data_dir / f"{split}.jsonl"


def evaluate_moderation(split: str = "test", adapter: str = "embedded", out_dir: Path | None = None,
                        data_dir: Path = DATA_DIR, batch_size: int = 64) -> ModerationEval:
    from llmtune.moderation.normalize import canonical
    from llmtune.moderation.screener import Screener

    path = resolve_split(split, data_dir)
    rows = read_rows(path)
    out_dir = Path(out_dir or Path("runs") / "moderation-eval" / path.stem)
    out_dir.mkdir(parents=True, exist_ok=True)
    screener = Screener(ModerationConfig(adapter=adapter))
    console.print(f"moderation eval: {len(rows)} rows from {path}; adapter {screener.adapter.dir} ({screener.adapter.precision})")

    decisions = screener.screen_batch([r.text for r in rows], batch_size=batch_size, progress=True)
    rule_hits = [{h.category for h in screener.rules.match(r.text)} for r in rows]
    raw = screener.adapter.scores([canonical(r.text) for r in rows], batch_size)
    cats = list(BUILTIN_CATEGORIES)
    thresholds = screener.thresholds

    per_category = {}
    for j, cat in enumerate(cats):
        tp = fp = fn = tn = 0
        rules_tp = adapter_tp = adapter_fp = rules_fp = 0
        for row, d, hits, s in zip(rows, decisions, rule_hits, raw):
            truth, pred = cat in row.labels, cat in d.categories
            tp += truth and pred
            fn += truth and not pred
            fp += (not truth) and pred
            tn += (not truth) and not pred
            rules_tp += truth and cat in hits
            rules_fp += (not truth) and cat in hits
            adapter_tp += truth and s[j] >= thresholds[cat]
            adapter_fp += (not truth) and s[j] >= thresholds[cat]
        per_category[cat] = {
            "tp": tp, "fp": fp, "fn": fn, "tn": tn,
            "precision": _ratio(tp, tp + fp), "recall": _ratio(tp, tp + fn), "fpr": _ratio(fp, fp + tn),
            "rules_recall": _ratio(rules_tp, tp + fn), "adapter_recall": _ratio(adapter_tp, tp + fn),
            "rules_fpr": _ratio(rules_fp, fp + tn), "adapter_fpr": _ratio(adapter_fp, fp + tn),
            "threshold": thresholds[cat],
        }

    groups: dict[str, dict] = {}
    for row, d in zip(rows, decisions):
        g = groups.setdefault(row.group or ("blocked" if row.labels else "allowed"), {"rows": 0, "blocked": 0, "allowed_label": not row.labels})
        g["rows"] += 1
        g["blocked"] += not d.allowed
    for g in groups.values():
        g["block_rate"] = _ratio(g["blocked"], g["rows"])

    def fpr_of(names: tuple[str, ...] | None) -> float:
        sel = [(r, d) for r, d in zip(rows, decisions) if not r.labels and (names is None or r.group in names)]
        return _ratio(sum(not d.allowed for _, d in sel), len(sel))

    obf: dict[str, dict] = {}
    for row, d in zip(rows, decisions):
        if row.obfuscation and row.labels:
            o = obf.setdefault(row.obfuscation, {"positives": 0, "caught": 0})
            o["positives"] += 1
            o["caught"] += set(row.labels) <= set(d.categories)
    for o in obf.values():
        o["recall"] = _ratio(o["caught"], o["positives"])

    result = ModerationEval(path.stem, len(rows), per_category, groups, fpr_of(ADULT_FICTION_GROUPS),
                            fpr_of(CHILDREN_NONSEXUAL_GROUPS), fpr_of(None), obf, out_dir)
    (out_dir / "metrics.json").write_text(json.dumps(result.to_json(), indent=2))
    _write_confusion(result, out_dir / "confusion.md", rows, decisions)
    _plot_pr(rows, raw, cats, thresholds, out_dir / "pr_curves.png")
    _print(result)
    return result


def _write_confusion(result: ModerationEval, path: Path, rows: list[Row], decisions) -> None:
    lines = [f"# Moderation confusion table: split `{result.split}` ({result.rows} rows)", "",
             "| category | TP | FP | FN | TN | precision | recall | FPR | rules recall | adapter recall |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for cat, m in result.per_category.items():
        lines.append(f"| {cat} | {m['tp']} | {m['fp']} | {m['fn']} | {m['tn']} | {m['precision']:.3f} | {m['recall']:.3f} | "
                     f"{m['fpr']:.3f} | {m['rules_recall']:.3f} | {m['adapter_recall']:.3f} |")
    lines += ["", "## Block rate per row group", "", "| group | rows | blocked | block rate | should be |", "|---|---:|---:|---:|---|"]
    for name, g in sorted(result.groups.items()):
        lines.append(f"| {name} | {g['rows']} | {g['blocked']} | {g['block_rate']:.3f} | {'allowed' if g['allowed_label'] else 'blocked'} |")
    lines += ["", f"False-positive rate, benign adult fiction: {result.fpr_adult_fiction:.3f}",
              f"False-positive rate, non-sexual mentions of children: {result.fpr_children_nonsexual:.3f}",
              f"False-positive rate, all allowed rows: {result.fpr_all_allowed:.3f}", "", "## Errors", ""]
    for row, d in zip(rows, decisions):
        missed = set(row.labels) - set(d.categories)
        extra = set(d.categories) - set(row.labels)
        if missed or extra:
            kind = f"missed {sorted(missed)}" if missed else f"over-blocked {sorted(extra)}"
            lines.append(f"- {kind} [{d.layer}] {json.dumps(row.text, ensure_ascii=True)[:200]}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _plot_pr(rows: list[Row], raw: list[list[float]], cats: list[str], thresholds: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for j, cat in enumerate(cats):
        scored = sorted(((s[j], cat in r.labels) for s, r in zip(raw, rows)), reverse=True)
        positives = sum(t for _, t in scored)
        if not positives:
            continue
        tp = fp = 0
        xs, ys, mark = [], [], None
        for score, truth in scored:
            tp += truth
            fp += not truth
            xs.append(tp / positives)
            ys.append(tp / (tp + fp))
            if mark is None and score < thresholds[cat]:
                mark = (xs[-2] if len(xs) > 1 else xs[-1], ys[-2] if len(ys) > 1 else ys[-1])
        line, = ax.plot(xs, ys, label=f"{cat} (t={thresholds[cat]:.2f})")
        if mark:
            ax.plot(*mark, "o", color=line.get_color())
    ax.set_xlabel("recall (adapter alone)")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.set_title("Moderation adapter: precision-recall per category (dot = calibrated threshold)")
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _print(result: ModerationEval) -> None:
    from rich.table import Table

    table = Table(title=f"moderation eval: {result.split} ({result.rows} rows), rules + adapter")
    for col in ("category", "precision", "recall", "FPR", "rules recall", "adapter recall"):
        table.add_column(col, justify="left" if col == "category" else "right")
    for cat, m in result.per_category.items():
        table.add_row(cat, f"{m['precision']:.3f}", f"{m['recall']:.3f}", f"{m['fpr']:.3f}", f"{m['rules_recall']:.3f}",
                      f"{m['adapter_recall']:.3f}")
    console.print(table)
    console.print(f"false-positive rate: benign adult fiction {result.fpr_adult_fiction:.3f}, non-sexual mentions of "
                  f"children {result.fpr_children_nonsexual:.3f}, all allowed rows {result.fpr_all_allowed:.3f}")
    if result.obfuscated_recall:
        console.print("obfuscated positives caught: " + ", ".join(
            f"{k} {v['caught']}/{v['positives']}" for k, v in sorted(result.obfuscated_recall.items())))
    console.print(f"wrote {result.out_dir / 'metrics.json'}, {result.out_dir / 'confusion.md'}, {result.out_dir / 'pr_curves.png'}")
