"""The screen every stage calls: rules, the classifier and the conversation's facts, combined into one `Decision`.

    screener = load_screener(config)                    # cached per config
    screener.screen("...")                              # one text (a conversation of one message)
    screener.screen_batch(rows, progress=True)          # many texts, the classifier batched over them
    screener.screen_conversation(messages, reply=None)  # a whole conversation, and a reply in its context
    state = screener.conversation_state(messages)       # the same, incremental (the gateway streams with it)

Per text, a category is blocked when it blocks under the config (the hard floor always does)
and a rule fired OR the classifier's score reached the category's threshold. No lexical gate
stands between the classifier and the hard floor: where the classifier over-fires on tame
roleplay the fix is its data and calibration. (The configurable categories keep their gates.)
On top of that, `conversation.ConversationState` blocks what the conversation as a whole
establishes (a minor or a real person, and a sexual or romantic turn, anywhere in it).
`layer` names the layer that decided: "rules", "adapter", "conversation" or "none".
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from pathlib import Path

from llmtune.moderation.adapter import ModerationAdapter
from llmtune.moderation.conversation import ConversationState, PrefixCache, conversation_items, screened_text
from llmtune.moderation.decision import Decision
from llmtune.moderation.errors import ModerationError
from llmtune.moderation.facts import Evidence, TextFacts, extract_facts
from llmtune.moderation.normalize import canonical
from llmtune.moderation.policy import BUILTIN_CATEGORIES, HARD_FLOOR, SIGNALS, ModerationConfig, PolicyFile
from llmtune.moderation.rules import Analysis, PlatformCategory, RuleSet, read_name_list
from llmtune.schema import load_yaml_model

# Gates on the classifier for CONFIGURABLE categories only: its score blocks only when the gate
# is open. The hard floor has none (the classifier's floor verdict always stands).
# `illegal_instructions` opens on a harm cue (a weapon, drug, malware, poison, theft, ...): without
# it a captain explaining her ship's engines scored 0.87.
GATES = {"sexual_violence": "sexual_context", "bestiality": "sexual_context", "illegal_instructions": "harm_cue"}
assert not set(GATES) & set(HARD_FLOOR)
# The classifier's signal heads become facts at these scores unless the adapter calibrated its own.
DEFAULT_SIGNAL_THRESHOLDS = {"sexual": 0.5, "minor": 0.9, "real_person": 0.9}
TEXT_CACHE_SIZE = 16384



# ---------------------------------------------------------------------------------------------
# Policy file


POLICY_HINT = "see docs/moderation.md, 'Adding categories and names'"


def load_policy_file(path: Path) -> tuple[list[PlatformCategory], list[str]]:
    """A platform's policy YAML (`PolicyFile`): its categories as rules, and its real people's names.
    Read by the one config loader: a mistake names the file, the line and the key."""
    policy = load_yaml_model(PolicyFile, path, "moderation policy file", ModerationError,
                             hint=f"moderation.policy_file; {POLICY_HINT}")
    cats = [PlatformCategory(name, c.description, c.keywords, c.patterns, c.requires_sexual_context)
            for name, c in policy.categories.items()]
    names = list(policy.real_person_names)
    if policy.real_person_names_file:
        names_file = (path.parent / policy.real_person_names_file).resolve()
        if not names_file.is_file():
            raise ModerationError(f"{path}: real_person_names_file: {names_file} does not exist ({POLICY_HINT})")
        names += read_name_list(names_file)
    return cats, names


# ---------------------------------------------------------------------------------------------
# Screener


class Screener:
    """Rules + adapter under one `ModerationConfig`. Build it with `load_screener` (cached)."""

    def __init__(self, config: ModerationConfig | None = None):
        self.config = config or ModerationConfig()
        self.adapter = ModerationAdapter(self.config.adapter, self.config.precision)
        names: list[str] = []  # the platform's own; the built-in gazetteer is lexicon/public_figures.tsv
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
        self.signal_thresholds = {**DEFAULT_SIGNAL_THRESHOLDS, **self.adapter.meta.raw.get("signal_thresholds", {})}
        from llmtune.moderation.bulk import PREFILTER_NAME, Prefilter

        self.prefilter = Prefilter.load(self.adapter.dir / PREFILTER_NAME)
        self.bulk_skipped = 0
        self._text_cache: OrderedDict = OrderedDict()
        self._lock = threading.Lock()  # the caches are shared by the gateway's screening threads
        self._prefixes = PrefixCache()
        self.thresholds = {**self.adapter.meta.thresholds, **(self.config.thresholds or {})}
        # The floor's thresholds come from calibration only; config validation already refuses overrides.
        for cat in HARD_FLOOR:
            self.thresholds[cat] = self.adapter.meta.thresholds[cat]

    # -- single texts ------------------------------------------------------------------------

    def screen(self, text: str, fast: bool = False) -> Decision:
        return self.screen_batch([text], fast=fast)[0]

    def screen_batch(self, texts: list[str], batch_size: int = 64, progress: bool = False, fast: bool = False) -> list[Decision]:
        """Screen many texts, each as a conversation of one message, the classifier batched over them.

        With `fast` (bulk data), see screen_conversations."""
        texts = [t if isinstance(t, str) else str(t) for t in texts]
        return self.screen_conversations([[{"role": "text", "content": t}] for t in texts], batch_size, progress, fast)

    def screen_texts(self, items: list[tuple[str, str, str, str | None, str]], batch_size: int = 64,
                     progress: bool = False) -> list[tuple[Decision, TextFacts]]:
        """(decision, facts) per (text, where, role, name, card): the text's own rule and classifier
        decision (the classifier reading the conversation's card beside it), and the facts it
        establishes, the classifier's signals among them. Cached by (role, name, text, card), so
        resent conversation history costs nothing."""
        results: list[tuple[Decision, TextFacts] | None] = [None] * len(items)
        todo: list[int] = []
        # an adapter that reads no card gives a text the same verdict beside any card
        keys = [(role, name, text, card if self.adapter.context_tokens else "") for text, _, role, name, card in items]
        with self._lock:
            for i, key in enumerate(keys):
                cached = self._text_cache.get(key)
                if cached is not None:
                    self._text_cache.move_to_end(key)
                    where = items[i][1]
                    results[i] = (_placed(cached[0], where), _relocate(cached[1], where))
                else:
                    todo.append(i)
        if todo:
            analyses = {i: self.rules.analyse(items[i][0]) for i in todo}
            scored = [i for i in todo if items[i][0].strip()]
            scores = dict(zip(scored, self._adapter_scores([items[i][0] for i in scored], batch_size, progress,
                                                           [items[i][4] for i in scored])))
            for i in todo:
                text, where, role, name, _card = items[i]
                facts = extract_facts(text, where, role, self.rules, name=name)
                self._signal_facts(facts, scores.get(i, {}), where, role)
                decision = self._decide(analyses[i], scores.get(i, {}))
                with self._lock:
                    self._text_cache[keys[i]] = (decision, facts)
                    if len(self._text_cache) > TEXT_CACHE_SIZE:
                        self._text_cache.popitem(last=False)
                results[i] = (_placed(decision, where), _relocate(facts, where))
        return results  # type: ignore[return-value]

    def _signal_facts(self, facts: TextFacts, scores: dict[str, float], where: str, role: str) -> None:
        """The classifier's signal heads as facts: a sexual turn, a minor participant, a real person."""
        for signal in SIGNALS:
            score = scores.get(signal)
            if score is None or score < self.signal_thresholds[signal]:
                continue
            detail = f"classifier: {signal.replace('_', ' ')} {score:.2f}"
            if signal == "sexual":
                facts.sexual.append(Evidence("sexual", detail, "", where))
            elif signal == "minor":
                facts.minor.append(Evidence("minor", detail, "", where))
            else:
                # "about a real person" says nothing about whether they are cast or only mentioned:
                # evidence for the report, never a conversation fact on its own
                facts.real.append(Evidence("real_person", detail, "", where, "local"))

    def _adapter_scores(self, texts: list[str], batch_size: int, progress: bool,
                        cards: list[str] | None = None) -> list[dict[str, float]]:
        if not texts:
            return []
        views = [canonical(t) for t in texts]
        if cards and self.adapter.context_tokens:
            normalised = {c: canonical(c) for c in set(cards) if c}
            cards = [normalised.get(c, "") for c in cards]
        else:
            cards = None
        if progress:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

            from llmtune.console import console

            with Progress("screening", BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=console) as bar:
                task = bar.add_task("screen", total=None)

                def step(n: int, total: int) -> None:
                    bar.update(task, total=total, advance=n)

                raw = self.adapter.scores(views, batch_size, on_batch=step, contexts=cards)
        else:
            raw = self.adapter.scores(views, batch_size, contexts=cards)
        cats = self.adapter.categories
        return [{c: round(float(v), 4) for c, v in zip(cats, row)} for row in raw]

    def _decide(self, analysis: Analysis, adapter_scores: dict[str, float]) -> Decision:
        hits = analysis.hits
        by_rule = {h.category for h in hits}
        scores = {c: adapter_scores.get(c, 0.0) for c in BUILTIN_CATEGORIES}
        for cat in self.categories[len(BUILTIN_CATEGORIES):]:
            scores[cat] = 1.0 if cat in by_rule else 0.0
        blocked, reasons, evidence = [], [], []
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
                evidence += [{"fact": cat, "detail": h.rule, "text": h.evidence, "where": "text"} for h in rule_hits]
                if over:
                    reasons.append(f"{cat}: adapter score {scores[cat]:.3f} >= threshold {self.thresholds[cat]:.3f}")
                    evidence.append({"fact": cat, "detail": f"classifier score {scores[cat]:.3f} >= {self.thresholds[cat]:.3f}",
                                     "text": "", "where": "text"})
        layer = "rules" if by_rule & set(blocked) else "adapter" if blocked else "none"
        return Decision(not blocked, blocked, scores, layer, reasons, evidence)

    # -- conversations -----------------------------------------------------------------------

    def clear_caches(self) -> None:
        """Forget cached texts and conversation prefixes (benchmarks time the uncached screen)."""
        with self._lock:
            self._text_cache.clear()
        with self._prefixes.lock:
            self._prefixes.states.clear()

    def conversation_state(self, messages: list[dict]) -> ConversationState:
        """Every message screened (system prompts and card text included, `name` fields too), its
        facts accumulated; states are cached by conversation prefix."""
        return self._prefixes.state(self, messages)

    def screen_conversations(self, conversations: list[list[dict]], batch_size: int = 64, progress: bool = False,
                             fast: bool = False) -> list[Decision]:
        """Many conversations at once (bulk data): the classifier batched over all their messages.
        No prefix cache: bulk data rarely shares prefixes.

        With `fast` and `moderation.bulk: cascade` (prepare's default), a conversation that no rule
        or fact could block (`bulk.could_block`) and whose every text the classifier's first stage
        clears (`bulk.Prefilter`) is allowed without the rules and the classifier; the rest are
        screened in full. The gateway never takes this path."""
        allowed = Decision(True, [], {c: 0.0 for c in self.categories}, "none")
        out: list[Decision | None] = [None] * len(conversations)
        if fast:
            for k, messages in enumerate(conversations):
                if not self.needs_full_screen([screened_text(m) for m in messages]):
                    out[k] = allowed
        self.bulk_skipped = sum(d is not None for d in out)
        items, owner = [], []
        for k, messages in enumerate(conversations):
            if out[k] is not None:
                continue
            items += conversation_items(messages)[0]
            owner += [k] * len(messages)
        states = {k: ConversationState(self) for k in set(owner)}
        for k, screened in zip(owner, self.screen_texts(items, batch_size, progress)):
            states[k].add_screened(*screened)
        for k, state in states.items():
            out[k] = state.decision()
        for k in range(len(out)):
            if out[k] is None:  # a conversation with no text at all
                out[k] = allowed
        return out  # type: ignore[return-value]

    def needs_full_screen(self, texts: list[str]) -> bool:
        """For bulk data: False when no rule or fact could block these texts and the classifier's
        first stage clears every one of them (then the full screen could only allow them)."""
        from llmtune.moderation.bulk import could_block

        if self.config.bulk == "full" or self.prefilter is None or could_block(self.rules, texts):
            return True
        return any(self.prefilter.passes(t) for t in texts if t.strip())

    def screen_conversation(self, messages: list[dict], reply: str | None = None, fast: bool = False) -> Decision:
        """The conversation's decision; with `reply`, the decision on that reply in its context
        (through the checkpoints a stream of it would pass)."""
        state = self.conversation_state(messages)
        if reply is None:
            return state.decision()
        decision, _ = state.reply().screen(reply)
        return decision


def _placed(decision: Decision, where: str) -> Decision:
    """A per-text decision with its evidence pointing at where the text sits."""
    if not decision.evidence or where == "text":
        return decision
    return Decision(decision.allowed, decision.categories, decision.scores, decision.layer, decision.reasons,
                    [{**e, "where": where} for e in decision.evidence])


def _relocate(facts: TextFacts, where: str) -> TextFacts:
    """A cached text's facts with `where` pointing at its place in this conversation."""
    def move(items):
        return [e if e.where == where else Evidence(e.fact, e.detail, e.text, where if not e.where.endswith(".name") else
                                                       where.rsplit(".", 1)[0] + ".name", e.scope, e.subject, e.value)
                for e in items]
    return TextFacts(move(facts.minor), move(facts.adult), move(facts.real), move(facts.sexual), move(facts.romantic),
                     move(facts.years), set(facts.characters), set(facts.names))


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
