"""The screen every stage calls: rules first, then the adapter, combined into one `Decision`.

    screener = load_screener(config)           # cached per config
    screener.screen("...")                     # one text
    screener.screen_batch(rows, progress=True) # many, batched through the adapter
    screener.screen_conversation(messages)     # each message alone and all of them joined

Decision logic, per category: blocked when the category blocks under the config (the hard floor
always does) and a rule fired OR the adapter's score reached the category's threshold.
`layer` names the layer that fired first: "rules" when any blocked category has a rule hit,
else "adapter", else "none".
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmtune.moderation.adapter import NAMES_NAME, ModerationAdapter
from llmtune.moderation.errors import ModerationError
from llmtune.moderation.normalize import canonical
from llmtune.moderation.policy import BUILTIN_CATEGORIES, HARD_FLOOR, ModerationConfig
from llmtune.moderation.rules import Analysis, PlatformCategory, RuleSet, read_name_list

# Categories that are about sexual content: the adapter alone blocks them only when the text has
# some sexual or romantic context (rules catch the rest). Without this gate the encoder flagged
# tame roleplay (a captain greeting her crew, a librarian's story) at the recall-tuned thresholds.
SEXUAL_CATEGORIES = frozenset({"minor_sexual", "real_person_sexual", "sexual_violence", "bestiality"})
# The gate for each category the adapter scores: the adapter's score blocks only when it is open.
# `illegal_instructions` opens on a harm cue (a weapon, drug, malware, poison, theft, ...): without
# it a captain explaining her ship's engines scored 0.87.
GATES = {**{c: "sexual_context" for c in SEXUAL_CATEGORIES}, "illegal_instructions": "harm_cue"}

# The maintained list in a checkout; an installed wheel uses the copy shipped with the adapter.
REPO_NAMES_FILE = Path(__file__).resolve().parents[2] / "data" / "moderation" / "real_people.txt"


@dataclass
class Decision:
    """The outcome of screening one text or conversation."""

    allowed: bool
    categories: list[str]  # blocked categories
    scores: dict[str, float]  # adapter score per category (1.0/0.0 for rule-only policy categories)
    layer: str  # "rules", "adapter" or "none"
    reasons: list[str] = field(default_factory=list)  # rule evidence and adapter scores, for quarantine notes

    def to_json(self) -> dict[str, Any]:
        return {"allowed": self.allowed, "categories": list(self.categories), "scores": dict(self.scores), "layer": self.layer}

    def reason(self) -> str:
        """One line for a quarantine file: what was blocked and why."""
        if self.allowed:
            return "allowed"
        return f"blocked ({', '.join(self.categories)}) by {self.layer}: " + "; ".join(self.reasons)


# ---------------------------------------------------------------------------------------------
# Policy file


def _policy_error(path: Path, msg: str) -> ModerationError:
    return ModerationError(f"{path}: {msg} (see docs/moderation.md, 'Adding categories and names')")


def load_policy_file(path: Path) -> tuple[list[PlatformCategory], list[str]]:
    """A platform's policy YAML: `categories:` (keywords/patterns) and `real_person_names(_file)`."""
    import yaml

    if not path.is_file():
        raise ModerationError(f"moderation.policy_file: {path} does not exist; point it at a YAML policy file")
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise _policy_error(path, f"not valid YAML: {exc}") from None
    if not isinstance(doc, dict):
        raise _policy_error(path, "a policy file is a mapping with `categories:` and/or `real_person_names:`")
    unknown = set(doc) - {"categories", "real_person_names", "real_person_names_file"}
    if unknown:
        raise _policy_error(path, f"unknown key(s) {sorted(unknown)}; valid: categories, real_person_names, real_person_names_file")
    cats = []
    for name, spec in (doc.get("categories") or {}).items():
        where = f"categories.{name}"
        if name in BUILTIN_CATEGORIES:
            raise _policy_error(path, f"{where}: `{name}` is built in; pick a new name for a platform category")
        if not re.match(r"^[a-z][a-z0-9_]{1,47}$", str(name)):
            raise _policy_error(path, f"{where}: category names are lower_snake_case")
        if not isinstance(spec, dict):
            raise _policy_error(path, f"{where}: expected a mapping with keywords: and/or patterns:")
        extra = set(spec) - {"description", "keywords", "patterns", "requires_sexual_context"}
        if extra:
            raise _policy_error(path, f"{where}: unknown key(s) {sorted(extra)}; valid: description, keywords, patterns, requires_sexual_context")
        keywords, patterns = spec.get("keywords") or [], spec.get("patterns") or []
        if not keywords and not patterns:
            raise _policy_error(path, f"{where}: give at least one of keywords: or patterns:")
        for p in patterns:
            try:
                re.compile(p)
            except re.error as exc:
                raise _policy_error(path, f"{where}.patterns: `{p}` is not a valid regular expression ({exc})") from None
        cats.append(PlatformCategory(name, str(spec.get("description", "")), [str(k) for k in keywords],
                                     [str(p) for p in patterns], bool(spec.get("requires_sexual_context", False))))
    names = [str(n) for n in doc.get("real_person_names") or []]
    if doc.get("real_person_names_file"):
        names_file = (path.parent / str(doc["real_person_names_file"])).resolve()
        if not names_file.is_file():
            raise _policy_error(path, f"real_person_names_file: {names_file} does not exist")
        names += read_name_list(names_file)
    return cats, names


# ---------------------------------------------------------------------------------------------
# Screener


class Screener:
    """Rules + adapter under one `ModerationConfig`. Build it with `load_screener` (cached)."""

    def __init__(self, config: ModerationConfig | None = None):
        self.config = config or ModerationConfig()
        self.adapter = ModerationAdapter(self.config.adapter, self.config.precision)
        names_file = REPO_NAMES_FILE if REPO_NAMES_FILE.is_file() else self.adapter.dir / NAMES_NAME
        names = read_name_list(names_file) if names_file.is_file() else []
        platform: list[PlatformCategory] = []
        if self.config.policy_file:
            platform, extra = load_policy_file(Path(self.config.policy_file).expanduser())
            names += extra
        if self.config.real_person_names_file:
            path = Path(self.config.real_person_names_file).expanduser()
            if not path.is_file():
                raise ModerationError(f"moderation.real_person_names_file: {path} does not exist; one name per line")
            names += read_name_list(path)
        self.rules = RuleSet(names, platform)
        self.categories: list[str] = list(BUILTIN_CATEGORIES) + [c.name for c in platform]
        unknown = set(self.config.categories) - set(self.categories)
        if unknown:
            raise ModerationError(
                f"moderation.categories: unknown categor{'y' if len(unknown) == 1 else 'ies'} {sorted(unknown)}; "
                f"known: {', '.join(c for c in self.categories if c not in HARD_FLOOR)} "
                "(add platform categories in moderation.policy_file)"
            )
        missing = [c for c in BUILTIN_CATEGORIES if c not in self.adapter.categories]
        if missing:
            raise ModerationError(f"adapter {self.adapter.dir} has no head for {missing}; retrain it with the built-in categories")
        self.thresholds = {**self.adapter.meta.thresholds, **(self.config.thresholds or {})}
        # The floor's thresholds come from calibration only; config validation already refuses overrides.
        for cat in HARD_FLOOR:
            self.thresholds[cat] = self.adapter.meta.thresholds[cat]

    # -- single texts ------------------------------------------------------------------------

    def screen(self, text: str, fast: bool = False) -> Decision:
        return self.screen_batch([text], fast=fast)[0]

    def screen_batch(self, texts: list[str], batch_size: int = 64, progress: bool = False, fast: bool = False) -> list[Decision]:
        """Screen many texts, the adapter batched over them.

        With `fast`, work that cannot change a decision is skipped: a text on which no rule can
        fire and no adapter gate opens (`RuleSet.could_fire`) is allowed without further work, and
        the adapter runs only on texts with an open gate. Decisions are identical to the full
        screen's (tests/test_moderation_screener.py checks this on every moderation row); the
        skipped adapter scores read 0.0. Bulk callers (prepare, the gateway) use it; `llmtune
        moderate` and the evaluation report every score."""
        texts = [t if isinstance(t, str) else str(t) for t in texts]
        decisions: list[Decision | None] = [None] * len(texts)
        if fast:
            for i, t in enumerate(texts):
                if not self.rules.could_fire(t):
                    decisions[i] = Decision(True, [], {c: 0.0 for c in self.categories}, "none")
        todo = [i for i, d in enumerate(decisions) if d is None]
        analyses = {i: self.rules.analyse(texts[i]) for i in todo}
        scored = [i for i in todo if not fast or self._adapter_can_block(analyses[i])]
        scores = dict(zip(scored, self._adapter_scores([texts[i] for i in scored], batch_size, progress)))
        for i in todo:
            decisions[i] = self._decide(analyses[i], scores.get(i, {}))
        return decisions  # type: ignore[return-value]

    def _adapter_can_block(self, analysis: Analysis) -> bool:
        return any(self.config.blocks(c) and (c not in GATES or getattr(analysis, GATES[c]))
                   for c in BUILTIN_CATEGORIES if c in self.thresholds)

    def _adapter_scores(self, texts: list[str], batch_size: int, progress: bool) -> list[dict[str, float]]:
        if not texts:
            return []
        views = [canonical(t) for t in texts]
        if progress:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

            from llmtune.console import console

            with Progress("screening", BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=console) as bar:
                task = bar.add_task("screen", total=None)

                def step(n: int, total: int) -> None:
                    bar.update(task, total=total, advance=n)

                raw = self.adapter.scores(views, batch_size, on_batch=step)
        else:
            raw = self.adapter.scores(views, batch_size)
        cats = self.adapter.categories
        return [{c: round(float(v), 4) for c, v in zip(cats, row)} for row in raw]

    def _decide(self, analysis: Analysis, adapter_scores: dict[str, float]) -> Decision:
        hits = analysis.hits
        by_rule = {h.category for h in hits}
        scores = {c: adapter_scores.get(c, 0.0) for c in BUILTIN_CATEGORIES}
        for cat in self.categories[len(BUILTIN_CATEGORIES):]:
            scores[cat] = 1.0 if cat in by_rule else 0.0
        blocked, reasons = [], []
        for cat in self.categories:
            if not self.config.blocks(cat):
                continue
            rule_hits = [h for h in hits if h.category == cat]
            over = cat in self.thresholds and scores[cat] >= self.thresholds[cat]
            if over and cat in GATES and not getattr(analysis, GATES[cat]):
                over = False
            if rule_hits or over:
                blocked.append(cat)
                reasons += [h.reason() for h in rule_hits]
                if over:
                    reasons.append(f"{cat}: adapter score {scores[cat]:.3f} >= threshold {self.thresholds[cat]:.3f}")
        layer = "rules" if by_rule & set(blocked) else "adapter" if blocked else "none"
        return Decision(not blocked, blocked, scores, layer, reasons)

    # -- conversations -----------------------------------------------------------------------

    def screen_conversation(self, messages: list[dict], fast: bool = False) -> Decision:
        """Every message (system prompts and character-card text included) alone, and all of them
        joined, so a request split across messages is still caught."""
        texts = [t for t in (message_text(m) for m in messages) if t.strip()]
        if not texts:
            return Decision(True, [], {c: 0.0 for c in self.categories}, "none")
        joined = "\n".join(texts)
        decisions = self.screen_batch(texts + [joined] if len(texts) > 1 else texts, fast=fast)
        return merge_decisions(decisions, self.categories)


def message_text(message: dict) -> str:
    """The screenable text of an OpenAI/ShareGPT-style message: content (string or text parts) and name."""
    content = message.get("content", message.get("value", ""))
    if isinstance(content, list):
        content = "\n".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content)
    parts = [str(content or "")]
    if message.get("name"):
        parts.insert(0, str(message["name"]))
    return "\n".join(parts)


def merge_decisions(decisions: Iterable[Decision], categories: list[str]) -> Decision:
    decisions = list(decisions)
    blocked = [c for c in categories if any(c in d.categories for d in decisions)]
    scores = {c: max(d.scores.get(c, 0.0) for d in decisions) for c in categories}
    layers = {d.layer for d in decisions if not d.allowed}
    layer = "rules" if "rules" in layers else "adapter" if layers else "none"
    reasons: list[str] = []
    for d in decisions:
        reasons += [r for r in d.reasons if r not in reasons]
    return Decision(not blocked, blocked, scores, layer, reasons)


# ---------------------------------------------------------------------------------------------
# Cache

_CACHE: dict[str, Screener] = {}


def load_screener(config: ModerationConfig | None = None) -> Screener:
    """A Screener for `config` (default: the shipped policy and adapter), built once per distinct config."""
    config = config or ModerationConfig()
    key = json.dumps(config.model_dump(mode="json"), sort_keys=True)
    if key not in _CACHE:
        _CACHE[key] = Screener(config)
    return _CACHE[key]


def configure_threads(num_threads: int | None = None) -> int:
    """torch threads for screening: every core we may use unless told otherwise."""
    import torch

    n = num_threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(n)
    return n

