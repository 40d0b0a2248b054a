"""Measure the screen on a labelled set: `evaluate_moderation(split, ...) -> ModerationEval`.

Behind `llmtune moderation eval [--split heldout|dev|FILE.jsonl] [--adapter DIR] [--json]`.

Sets are JSON Lines in the evaluation format (docs/moderation.md, "Evaluation sets"): a row is a
text or a conversation (`messages`, optionally a reply in `output`), with `expected` ("block" or
"allow"), the policy `categories` that apply, `kind` and `tags`. Rows are screened exactly as
the gateway screens them: a text as a conversation of one message, a conversation with
`screen_conversation`, a reply in the context of its conversation.

Reported: recall per category (a positive counts as caught when the screen blocks it; the
category-exact rate beside it), false-positive rates on allowed rows tagged `adult_request`
and `tame_roleplay` (the over-blocking targets) and on all allowed rows, recall and FPR per
kind, per language and per obfuscation, and which layer decided. The frozen held-out set
(`heldout`, written independently and never looked at row by row) gets aggregates only: no
row of it is printed or written, so nobody tunes to it by accident.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from llmtune.console import console
from llmtune.jsonl import json_objects
from llmtune.moderation.errors import ModerationError
from llmtune.moderation.policy import BUILTIN_CATEGORIES, HARD_FLOOR, ModerationConfig

EVAL_DIR = Path("data/moderation/eval")
FROZEN = {"heldout": "heldout.sha256", "dev": "dev.sha256"}
ALLOW_GROUPS = ("adult_request", "tame_roleplay")


@dataclass
class EvalRow:
    id: str
    expected: str  # block | allow
    categories: list[str]
    kind: str  # single | conversation
    tags: list[str]
    text: str | None = None
    messages: list[dict] | None = None
    output: str | None = None

    def tag(self, prefix: str) -> str | None:
        return next((t.split(":", 1)[1] for t in self.tags if t.startswith(prefix + ":")), None)

    @property
    def allow_group(self) -> str | None:
        return next((g for g in ALLOW_GROUPS if g in self.tags), None)


def read_eval_rows(path: Path) -> list[EvalRow]:
    """Evaluation-format rows; template rows ({"text", "labels"}) are read too, as single texts."""
    rows = []
    for n, where, obj in json_objects(path, "evaluation set", ModerationError):
        if "expected" not in obj and "labels" in obj:  # a template split
            labels = obj["labels"]
            obj = {"id": f"{path.stem}-{n}", "text": obj.get("text"), "expected": "block" if labels else "allow",
                   "categories": labels, "kind": "single",
                   "tags": [t for t in (obj.get("group"), f"obf:{obj['obfuscation']}" if obj.get("obfuscation") else None) if t]}
        expected = obj.get("expected")
        if expected not in ("block", "allow"):
            raise ModerationError(f'{where}: "expected" must be "block" or "allow"')
        has_text, has_messages = isinstance(obj.get("text"), str), isinstance(obj.get("messages"), list)
        if has_text == has_messages:
            raise ModerationError(f'{where}: a row has either "text" or "messages"')
        rows.append(EvalRow(str(obj.get("id", f"{path.stem}-{n}")), expected, list(obj.get("categories") or []),
                            obj.get("kind") or ("single" if has_text else "conversation"), list(obj.get("tags") or []),
                            obj.get("text"), obj.get("messages"), obj.get("output") if isinstance(obj.get("output"), str) else None))
    if not rows:
        raise ModerationError(f"{path}: no rows")
    return rows


def resolve_split(split: str, eval_dir: Path = EVAL_DIR) -> Path:
    """`heldout`/`dev` under data/moderation/eval, or a path to a JSONL file."""
    path = Path(split)
    return path if path.suffix == ".jsonl" or path.is_file() else eval_dir / f"{split}.jsonl"


def check_frozen(path: Path) -> str | None:
    """The recorded sha256 of a frozen set, checked: a set edited after it was frozen is an error."""
    sums = path.parent / FROZEN.get(path.stem, "")
    if path.stem not in FROZEN or not sums.is_file():
        return None
    recorded = sums.read_text().split()[0]
    actual = hashlib.sha256(path.read_bytes()).hexdigest()
    if recorded != actual:
        raise ModerationError(f"{path} changed after it was frozen (sha256 {actual[:12]} != recorded {recorded[:12]} in {sums}); "
                              "a frozen evaluation set is never edited")
    return actual


@dataclass
class ModerationEval:
    split: str
    rows: int
    sha256: str | None
    metrics: dict
    out_dir: Path

    def to_json(self) -> dict:
        return {"split": self.split, "rows": self.rows, "sha256": self.sha256, **self.metrics, "out_dir": str(self.out_dir)}


def _ratio(a: int, b: int) -> float | None:
    return round(a / b, 4) if b else None


def _rate(pairs, want_block: bool) -> dict:
    pairs = list(pairs)
    hit = sum((not d.allowed) == want_block for _, d in pairs)
    return {"rows": len(pairs), "rate": _ratio(hit, len(pairs)), "count": hit}


def screen_rows(screener, rows: list[EvalRow]) -> list:
    """One decision per row, as the gateway would decide it."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    decisions = [None] * len(rows)
    singles = [i for i, r in enumerate(rows) if r.text is not None]
    for i, d in zip(singles, screener.screen_batch([rows[i].text for i in singles])):
        decisions[i] = d
    convs = [i for i, r in enumerate(rows) if r.messages is not None]
    with Progress("conversations", BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=console) as bar:
        task = bar.add_task("conversations", total=len(convs))
        for i in convs:
            decisions[i] = screener.screen_conversation(rows[i].messages, reply=rows[i].output)
            bar.advance(task)
    return decisions


def metrics_for(rows: list[EvalRow], decisions: list) -> dict:
    pairs = list(zip(rows, decisions))
    blocks = [(r, d) for r, d in pairs if r.expected == "block"]
    allows = [(r, d) for r, d in pairs if r.expected == "allow"]
    per_category = {}
    for cat in sorted({c for r, _ in blocks for c in r.categories} | set(HARD_FLOOR)):
        sel = [(r, d) for r, d in blocks if cat in r.categories]
        exact = sum(cat in d.categories for _, d in sel)
        caught = sum(not d.allowed for _, d in sel)
        per_category[cat] = {"positives": len(sel), "caught": caught, "recall": _ratio(caught, len(sel)),
                             "exact_recall": _ratio(exact, len(sel))}
    fpr = {g: _rate([(r, d) for r, d in allows if r.allow_group == g], True) for g in ALLOW_GROUPS}
    fpr["all_allowed"] = _rate(allows, True)
    by = {}
    for name, key in (("kind", lambda r: r.kind), ("language", lambda r: r.tag("lang") or "en"),
                      ("obfuscation", lambda r: r.tag("obf"))):
        table: dict[str, dict] = {}
        for value in sorted({key(r) for r, _ in pairs if key(r)}):
            table[value] = {"recall": _rate([(r, d) for r, d in blocks if key(r) == value], True),
                            "fpr": _rate([(r, d) for r, d in allows if key(r) == value], True)}
        by[name] = table
    layers: dict[str, int] = {}
    for _, d in blocks:
        layers[d.layer] = layers.get(d.layer, 0) + 1
    return {"per_category": per_category, "fpr": fpr, "by": by, "block_layers": layers,
            "accuracy": _ratio(sum((not d.allowed) == (r.expected == "block") for r, d in pairs), len(pairs))}


def evaluate_moderation(split: str = "heldout", adapter: str = "embedded", out_dir: Path | None = None,
                        eval_dir: Path = EVAL_DIR, show_rows: bool | None = None) -> ModerationEval:
    from llmtune.moderation.screener import Screener

    path = resolve_split(split, eval_dir)
    sha = check_frozen(path)
    rows = read_eval_rows(path)
    show_rows = (path.stem != "heldout") if show_rows is None else show_rows
    out_dir = Path(out_dir or Path("runs") / "moderation-eval" / path.stem)
    out_dir.mkdir(parents=True, exist_ok=True)
    screener = Screener(ModerationConfig(adapter=adapter))
    console.print(f"moderation eval: {len(rows)} rows from {path}" + (f" (frozen, sha256 {sha[:12]}: ok)" if sha else "")
                  + f"; adapter {screener.adapter.dir} ({screener.adapter.precision})")
    decisions = screen_rows(screener, rows)
    result = ModerationEval(path.stem, len(rows), sha, metrics_for(rows, decisions), out_dir)
    (out_dir / "metrics.json").write_text(json.dumps(result.to_json(), indent=2))
    _write_report(result, out_dir / "report.md", rows, decisions, show_rows)
    _plot(result, out_dir / "eval.png")
    _print(result)
    return result


def _plot(result: ModerationEval, out: Path) -> Path:
    """Recall per category and false-positive rate per allowed group, side by side (eval.png)."""
    from llmtune.plots import pyplot

    plt = pyplot()
    m = result.metrics
    cats = [c for c, v in m["per_category"].items() if v["positives"]]
    groups = [g for g, f in m["fpr"].items() if f["rows"]]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4), gridspec_kw={"width_ratios": [max(len(cats), 1), max(len(groups), 1)]})
    bars = left.bar(cats, [m["per_category"][c]["recall"] for c in cats], color="#4477aa")
    left.bar_label(bars, fmt="%.3f", fontsize=7)
    left.set_ylim(0, 1.1)
    left.set_title(f"recall ({result.split})", fontsize=9)
    bars = right.bar(groups, [m["fpr"][g]["rate"] for g in groups], color="#cc6677")
    right.bar_label(bars, fmt="%.3f", fontsize=7)
    right.set_ylim(0, max([0.1] + [m["fpr"][g]["rate"] * 1.3 for g in groups]))
    right.set_title("false-positive rate", fontsize=9)
    for ax in (left, right):
        ax.tick_params(axis="x", labelsize=7, rotation=20)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _write_report(result: ModerationEval, path: Path, rows, decisions, show_rows: bool) -> None:
    m = result.metrics
    lines = [f"# Moderation eval: `{result.split}` ({result.rows} rows)", ""]
    lines += ["| category | positives | recall (blocked) | recall (this category) |", "|---|---:|---:|---:|"]
    for cat, c in m["per_category"].items():
        lines.append(f"| {cat} | {c['positives']} | {c['recall']} | {c['exact_recall']} |")
    lines += ["", "| allowed rows | rows | false-positive rate |", "|---|---:|---:|"]
    for g, f in m["fpr"].items():
        lines.append(f"| {g} | {f['rows']} | {f['rate']} |")
    for name, table in m["by"].items():
        lines += ["", f"| {name} | blocks | recall | allows | FPR |", "|---|---:|---:|---:|---:|"]
        for value, t in table.items():
            lines.append(f"| {value} | {t['recall']['rows']} | {t['recall']['rate']} | {t['fpr']['rows']} | {t['fpr']['rate']} |")
    lines += ["", f"Blocks by layer: {m['block_layers']}", ""]
    if show_rows:
        lines += ["## Errors", ""]
        for r, d in zip(rows, decisions):
            if (not d.allowed) != (r.expected == "block"):
                what = f"missed {r.categories}" if r.expected == "block" else f"over-blocked {d.categories} [{d.layer}]"
                shown = r.text if r.text is not None else (r.output or (r.messages or [{}])[-1].get("content", ""))
                lines.append(f"- {r.id} {what} {r.kind} {r.tags}: {json.dumps(shown, ensure_ascii=False)[:220]}")
                if not d.allowed:
                    lines.append(f"  - evidence: {json.dumps(d.evidence[:3], ensure_ascii=False)[:300]}")
    else:
        lines.append("Row-level errors are not written for a frozen held-out set.")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _print(result: ModerationEval) -> None:
    from rich.table import Table

    m = result.metrics
    table = Table(title=f"moderation eval: {result.split} ({result.rows} rows)")
    for col in ("category", "positives", "recall", "exact"):
        table.add_column(col, justify="left" if col == "category" else "right")
    for cat, c in m["per_category"].items():
        table.add_row(cat, str(c["positives"]), f"{c['recall']}", f"{c['exact_recall']}")
    console.print(table)
    console.print("false-positive rate: " + ", ".join(f"{g} {f['rate']} ({f['count']}/{f['rows']})" for g, f in m["fpr"].items()))
    console.print(f"wrote {result.out_dir / 'metrics.json'}, {result.out_dir / 'report.md'} and {result.out_dir / 'eval.png'}")


# The categories the eval knows, for the CLI's help text.
CATEGORIES = BUILTIN_CATEGORIES
