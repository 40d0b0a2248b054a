"""The conversation is the unit: facts set anywhere hold everywhere after.

    state = screener.conversation_state(messages)      # cached by conversation prefix
    decision = state.decision()                        # the request
    reply = state.reply()                              # a ReplyScreen for the model's output
    decision = reply.check(reply_so_far)               # at each checkpoint; same answer streamed or not

A `ConversationState` holds what every text so far established (`facts.TextFacts`) and the
per-text decisions of the rules and the classifier. Its decision blocks:

- whatever any single text blocks (rules or classifier; no lexical gate on the hard floor);
- `minor_sexual` when a conversation-scoped minor fact (a card's "Mia (16)", a name "Lily_15", a
  birth year against the story's year, "you are a ninth-grader", the classifier's minor signal)
  and a sexual or romantic turn are both in the conversation, however far apart;
- `minor_sexual` when a named minor of local scope (someone's child) is named again in a sexual
  or romantic text;
- `real_person_sexual` when a real, identifiable person is cast in the conversation (named,
  described, a private person, a handle or an address) and the conversation turns sexual or
  romantic.

Chat clients resend the whole history every turn, so states are cached by a hash chain over
the messages: a new turn pays only for its new text.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from llmtune.moderation.decision import Decision, merge_decisions
from llmtune.moderation.facts import ADULT_AGE, Evidence, TextFacts, this_year

if TYPE_CHECKING:
    from llmtune.moderation.screener import Screener

PREFIX_CACHE_SIZE = 4096
# Replies are screened at checkpoints: the first whitespace at least this many characters after
# the previous checkpoint, and the end. Plain and streamed replies use the same checkpoints, so
# they reach the same decision on the same text.
CHECKPOINT_CHARS = 64
# Each checkpoint's window for the per-text screen reaches this far back into the reply.
WINDOW_CONTEXT_CHARS = 400
ROLES = ("system", "developer", "user", "assistant", "tool", "function")
# Messages in these roles are the conversation's card (character definitions, scenario, ages). The
# classifier reads every later text with the card so far beside it (adapter.Tokenizer), so that a
# name the card defines, or an age it states, is in view when a request names no one.
CARD_ROLES = ("system", "developer")
# The classifier reads the card's first few dozen tokens (moderation.json's context_tokens); the
# card is kept to this many characters, which is well past them.
CARD_CHARS = 1500


def message_text(message: dict) -> str:
    """The screenable content of an OpenAI/ShareGPT-style message: a string or text parts."""
    content = message.get("content", message.get("value", ""))
    if isinstance(content, list):
        content = "\n".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content)
    return str(content or "")


def screened_text(message: dict) -> str:
    """What the screen reads of a message: its content, with its `name` in front ("Lily_15: hi"),
    since a name can carry a request as well as an age."""
    text, name = message_text(message), message.get("name")
    return f"{name}: {text}" if isinstance(name, str) and name.strip() else text


def with_card(card: str, text: str, role: str) -> str:
    """The card after a message: a card-role message adds its text to it. Every message is read
    with the card before it, a card message too (SillyTavern sends a card as a dozen system
    messages, its example dialogue among them), so only a conversation's first card message is
    read alone."""
    if role not in CARD_ROLES or not text.strip() or len(card) >= CARD_CHARS:
        return card
    return (f"{card}\n{text}" if card else text)[:CARD_CHARS]


def _hash(previous: str, *parts: str) -> str:
    h = hashlib.blake2b(previous.encode(), digest_size=16)
    for part in parts:
        h.update(b"\x00")
        h.update(part.encode("utf-8", "surrogatepass"))
    return h.hexdigest()


def next_checkpoint(text: str, start: int, final: bool, every: int = CHECKPOINT_CHARS) -> int | None:
    """The checkpoint after `start` in `text` (a prefix of the reply), or None if it is not known
    yet. Deterministic: it depends only on the text, never on how it arrived. Checkpoints sit
    after whitespace, so a word is never released in part."""
    if len(text) - start >= every:
        for i in range(start + every, min(len(text), start + 8 * every)):
            if text[i].isspace():
                return i + 1
        if len(text) - start >= 8 * every:
            return start + 8 * every  # one very long word: cut it anyway
    return len(text) if final and len(text) > start else None


def _from_classifier(e: Evidence) -> bool:
    return e.detail.startswith("classifier")


def _first_pair(facts: list[Evidence], signals: list[Evidence]) -> list[Evidence] | None:
    """The first (fact, signal) that blocks. Within one text the classifier has already judged
    the text as a whole (its minor_sexual and real_person_sexual heads), so where either side is
    only the classifier's (a signal head), it pairs with the other side from another text; a
    fact and a signal both in the text's words pair anywhere (the rules judge those)."""
    # Facts and signals in the text's words explain a verdict better than a classifier score.
    facts, signals = sorted(facts, key=_from_classifier), sorted(signals, key=_from_classifier)
    for fact in facts:
        for signal in signals:
            if (_from_classifier(fact) or _from_classifier(signal)) and fact.where == signal.where:
                continue
            return [fact, signal]
    return None


@dataclass
class ConversationState:
    screener: "Screener"
    facts: TextFacts = field(default_factory=TextFacts)
    per_text: list["Decision"] = field(default_factory=list)  # blocked per-text decisions
    texts: list[TextFacts] = field(default_factory=list)  # each text's own facts (for named dependants)
    key: str = ""
    card: str = ""  # the card-role text so far, which the classifier reads beside each later text

    def copy(self) -> "ConversationState":
        return ConversationState(self.screener, self.facts.copy(), list(self.per_text), list(self.texts), self.key,
                                 self.card)

    def add(self, text: str, where: str, role: str, name: str | None = None) -> None:
        self.add_screened(*self.screener.screen_texts([(text, where, role, name, self.card)])[0])
        self.card = with_card(self.card, text, role)

    def add_screened(self, decision: "Decision", facts: TextFacts) -> None:
        if not decision.allowed:
            self.per_text.append(decision)
        self.facts.extend(facts)
        self.texts.append(facts)

    # -- the verdict -----------------------------------------------------------------------

    def _minor_facts(self) -> list[Evidence]:
        f = self.facts
        adults = {e.subject for e in f.adult if e.subject}
        out = []
        for e in f.minor:
            if e.scope != "conversation":
                continue
            if e.subject and e.subject in adults and e.detail.startswith("a participant described as"):
                continue  # "kid" or "girl" said of a character stated to be an adult
            out.append(e)
        births = [e for e in f.years if e.fact == "birth_year"]
        if births:
            stories = [e for e in f.years if e.fact == "story_year"]
            now = stories[-1].value if stories else this_year()
            for b in births:
                age = now - (b.value or 0)
                if 0 < age < ADULT_AGE:
                    where = b.where + (f" + {stories[-1].where}" if stories else "")
                    out.append(Evidence("minor", f"born {b.value}, so {age} in {now}", b.text, where, value=age))
        return out

    def _named_dependant(self) -> list[Evidence]:
        """A local-scope minor with a name (someone's child "Tilly, 8") named again in a sexual or romantic text."""
        named = [e for e in self.facts.minor if e.scope == "local" and e.subject]
        if not named:
            return []
        for text in self.texts:
            if text.sexual or text.romantic:
                for e in named:
                    if e.subject in text.names and e.where != (text.sexual or text.romantic)[0].where:
                        return [e, (text.sexual or text.romantic)[0]]
        return []

    def decision(self) -> "Decision":
        screener = self.screener
        base = merge_decisions(self.per_text, screener.categories) if self.per_text else Decision(
            True, [], {c: 0.0 for c in screener.categories}, "none")
        signals = self.facts.sexual + self.facts.romantic
        blocked = list(base.categories)
        evidence: list[dict] = []
        reasons = list(base.reasons)
        # The conversation's own pair (a minor or real person established in one place, sexual talk
        # in another) is named even when a single text also blocks: it is what explains the verdict.
        pairs = {}
        if signals:
            pairs["minor_sexual"] = _first_pair(self._minor_facts(), signals) or self._named_dependant()
            pairs["real_person_sexual"] = _first_pair([e for e in self.facts.real if e.scope == "conversation"], signals)
        for category, pair in pairs.items():
            if not pair:
                continue
            evidence += [e.to_json() for e in pair]
            if category not in blocked:
                blocked.append(category)
                reasons.append(f"{category}: conversation ({pair[0].detail}: {pair[0].text!r} at {pair[0].where}; "
                               f"{pair[1].detail}: {pair[1].text!r} at {pair[1].where})")
        if blocked == base.categories and not evidence:
            return base
        evidence += [e for e in base.evidence if e not in evidence]
        ordered = [c for c in screener.categories if c in blocked]
        layer = base.layer if base.layer != "none" else "conversation"
        return Decision(not ordered, ordered, base.scores, layer, reasons, evidence)

    def reply(self, checkpoint_chars: int = CHECKPOINT_CHARS, context_chars: int = WINDOW_CONTEXT_CHARS) -> "ReplyScreen":
        return ReplyScreen(self.copy(), checkpoint_chars, context_chars)


class ReplyScreen:
    """Screens a model's reply against its conversation, checkpoint by checkpoint.

    `check(text, final)` takes the whole reply so far; it screens each new checkpoint's window
    (the new text plus up to WINDOW_CONTEXT_CHARS before it), adds what it establishes to the
    conversation's facts, and returns (decision, released): how much of the reply has passed."""

    def __init__(self, state: ConversationState, checkpoint_chars: int = CHECKPOINT_CHARS,
                 context_chars: int = WINDOW_CONTEXT_CHARS):
        self.state = state
        self.checkpoint_chars, self.context_chars = checkpoint_chars, context_chars
        self.released = 0
        self.blocked: "Decision | None" = None

    def check(self, text: str, final: bool = False) -> tuple["Decision", int]:
        if self.blocked is not None:
            return self.blocked, self.released
        decision = None
        while True:
            cut = next_checkpoint(text, self.released, final, self.checkpoint_chars)
            if cut is None:
                break
            window = text[max(0, self.released - self.context_chars): cut]
            self.state.add(window, "reply", "reply")
            decision = self.state.decision()
            if not decision.allowed:
                self.blocked = decision
                return decision, self.released
            self.released = cut
        return decision or self.state.decision(), self.released

    def screen(self, text: str) -> tuple["Decision", int]:
        """A whole (plain) reply, through the very checkpoints a stream of it would pass."""
        return self.check(text, final=True)


def conversation_items(messages: list[dict], start: int = 0, card: str = "") -> tuple[list[tuple], list[str]]:
    """Screen items (text, where, role, name, card) for messages (the first at index `start`),
    and the card after each one."""
    items, cards = [], []
    for i, m in enumerate(messages, start):
        text, role = screened_text(m), str(m.get("role", "user"))
        items.append((text, f"messages[{i}].content", role, m.get("name") or None, card))
        card = with_card(card, text, role)
        cards.append(card)
    return items, cards


class PrefixCache:
    """ConversationState per conversation prefix (a hash chain over role, name and content)."""

    def __init__(self, size: int = PREFIX_CACHE_SIZE):
        self.size = size
        self.states: OrderedDict[str, ConversationState] = OrderedDict()
        self.hits = self.misses = 0
        self.lock = threading.Lock()  # the gateway screens on several threads

    def state(self, screener: "Screener", messages: list[dict]) -> ConversationState:
        chain = [""]
        for m in messages:
            chain.append(_hash(chain[-1], str(m.get("role", "")), str(m.get("name") or ""), message_text(m)))
        start = 0
        state = None
        with self.lock:
            for i in range(len(messages), 0, -1):
                cached = self.states.get(chain[i])
                if cached is not None:
                    self.states.move_to_end(chain[i])
                    state, start = cached.copy(), i
                    break
            self.hits += start
            self.misses += len(messages) - start
        state = state or ConversationState(screener)
        items, cards = conversation_items(messages[start:], start, state.card)
        for i, screened, card in zip(range(start, len(messages)), screener.screen_texts(items), cards):
            state.add_screened(*screened)
            state.key, state.card = chain[i + 1], card
            with self.lock:
                self.states[chain[i + 1]] = state.copy()
                if len(self.states) > self.size:
                    self.states.popitem(last=False)
        return state
