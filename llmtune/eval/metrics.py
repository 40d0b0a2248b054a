"""Roleplay metrics on generated replies. Pure functions, each tested on inputs with a known answer.

- clean stops: did the reply end with the trained end-of-turn token before the limit; does it
  leak template tokens; does it start speaking for the user;
- repetition: distinct-1/2 within a reply, repeated n-gram rate across consecutive replies of
  one conversation, self-similarity across a batch;
- persona: is a reply closer to its own persona than to the others (contrastive, on sentence
  embeddings), and does it keep the card's grammatical person;
- refusals: a documented rule set (REFUSAL_PATTERNS);
- slop: stock phrases per 1,000 words (the maintained list in sets/slop_phrases.txt) and the
  share of word 4-grams repeated across replies.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

_WORD = re.compile(r"[\w']+", re.UNICODE)


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


# ---------------------------------------------------------------------------------------------
# Clean stops


def clean_stop(token_ids: Sequence[int], stop_ids: set[int], max_new_tokens: int) -> bool:
    """True when generation ended on a stop token (the trained end-of-turn) before the limit."""
    return bool(token_ids) and token_ids[-1] in stop_ids and len(token_ids) <= max_new_tokens


def leaks_template(text: str, markers: Sequence[str]) -> bool:
    """True when the decoded reply contains template tokens (role headers, turn markers)."""
    return any(m and m in text for m in markers)


def speaks_for_user(text: str, user_names: Sequence[str] = ("User", "You", "{{user}}")) -> bool:
    """True when the reply writes the user's turn: a line opening with the user's name or a
    template user header, as runaway models do ("User: ...")."""
    names = "|".join(re.escape(n) for n in user_names if n)
    return bool(re.search(rf"(^|\n)\s*(?:{names})\s*:", text)) or "<|im_start|>user" in text


# ---------------------------------------------------------------------------------------------
# Repetition


def ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(text: str, n: int) -> float:
    """Unique n-grams / n-grams in one reply (1.0: no repetition; a loop drives it towards 0)."""
    grams = ngrams(words(text), n)
    return len(set(grams)) / len(grams) if grams else 1.0


def repeated_ngram_rate(replies: Sequence[str], n: int = 4) -> float:
    """Share of each reply's n-grams already present in the previous reply of the conversation."""
    hits = total = 0
    for prev, cur in zip(replies, replies[1:]):
        before = set(ngrams(words(prev), n))
        grams = ngrams(words(cur), n)
        hits += sum(g in before for g in grams)
        total += len(grams)
    return hits / total if total else 0.0


def mean_pairwise_similarity(vectors) -> float:
    """Mean cosine similarity over all pairs (self-similarity of a batch of replies)."""
    import torch

    v = torch.nn.functional.normalize(torch.as_tensor(vectors, dtype=torch.float32), dim=-1)
    n = v.shape[0]
    if n < 2:
        return 0.0
    sim = v @ v.T
    return float((sim.sum() - sim.diagonal().sum()) / (n * (n - 1)))


# ---------------------------------------------------------------------------------------------
# Persona


def persona_adherence(reply_vecs, persona_vecs, own: Sequence[int]) -> list[float]:
    """For each reply: cosine to its own persona minus the best cosine to any other persona.
    Positive means the reply is closer to its own persona than to every other one."""
    import torch

    r = torch.nn.functional.normalize(torch.as_tensor(reply_vecs, dtype=torch.float32), dim=-1)
    p = torch.nn.functional.normalize(torch.as_tensor(persona_vecs, dtype=torch.float32), dim=-1)
    sims = r @ p.T
    margins = []
    for i, k in enumerate(own):
        others = torch.cat([sims[i, :k], sims[i, k + 1 :]])
        margins.append(float(sims[i, k] - (others.max() if len(others) else 0.0)))
    return margins


FIRST_PERSON = {"i", "i'm", "i've", "i'll", "i'd", "me", "my", "mine", "myself"}


def grammatical_person(text: str, name: str | None = None) -> str:
    """`first` when the text speaks as "I", `third` when it narrates the character by name or
    he/she/they without "I", `unknown` otherwise."""
    toks = words(text)
    if not toks:
        return "unknown"
    first = sum(t in FIRST_PERSON for t in toks)
    third = sum(t in {"he", "she", "they", "his", "her", "their", "him", "them"} for t in toks)
    if name:
        third += sum(t == name.lower().split()[0] for t in toks)
    if first and first >= third:
        return "first"
    if third and not first:
        return "third"
    return "first" if first else "unknown"


# ---------------------------------------------------------------------------------------------
# Refusals

# An assistant-style refusal of an allowed request. Each pattern is a phrase generic chat
# models use to decline; roleplay characters saying "no" in the story do not match them.
REFUSAL_PATTERNS = [
    r"\bI(?:'m| am) (?:sorry|afraid),? (?:but )?I (?:can(?:no|')t|won't|am (?:not able|unable))",
    r"\bI (?:can(?:no|')t|won't|am unable to|am not able to) (?:help|assist|provide|create|write|generate|engage|continue|comply|fulfil)",
    r"\bas an (?:AI|artificial intelligence|AI language model|assistant)\b",
    r"\b(?:against|violates?) (?:my|the) (?:guidelines|policies|policy|programming|content policy)",
    r"\bI(?:'m| am) not (?:comfortable|allowed|permitted) (?:to )?(?:writing|creating|continuing|with)",
    r"\b(?:inappropriate|explicit) content (?:is|isn't|is not) (?:something|allowed)",
    r"\bI must (?:decline|refuse)\b",
]
_REFUSAL = re.compile("|".join(f"(?:{p})" for p in REFUSAL_PATTERNS), re.IGNORECASE)


def is_refusal(text: str) -> bool:
    return bool(_REFUSAL.search(text))


# ---------------------------------------------------------------------------------------------
# Slop: stock phrases and phrasing repeated across replies

SLOP_PHRASES_FILE = Path(__file__).resolve().parent / "sets" / "slop_phrases.txt"


def read_slop_phrases(path=SLOP_PHRASES_FILE) -> list[str]:
    """The maintained stock-phrase list: one lower-case phrase a line; `#` comments and blank lines skipped."""
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def _normalise_quotes(text: str) -> str:
    return text.replace("\u2019", "'").replace("\u2018", "'")


_SLOP_CACHE: dict[tuple[str, ...], re.Pattern] = {}


def slop_pattern(phrases: Sequence[str]) -> re.Pattern:
    key = tuple(phrases)
    if key not in _SLOP_CACHE:
        alternatives = sorted((r"\s+".join(re.escape(w) for w in p.split()) for p in phrases), key=len, reverse=True)
        _SLOP_CACHE[key] = re.compile(r"(?<![\w'])(?:" + "|".join(alternatives) + r")(?![\w'])", re.IGNORECASE)
    return _SLOP_CACHE[key]


def slop_matches(text: str, phrases: Sequence[str] | None = None) -> list[str]:
    """The stock phrases in `text`, in order (non-overlapping, longest first at each position)."""
    phrases = read_slop_phrases() if phrases is None else phrases
    return [m.group(0).lower() for m in slop_pattern(phrases).finditer(_normalise_quotes(text))]


def slop_per_1k_words(replies: Sequence[str], phrases: Sequence[str] | None = None) -> float:
    """Stock phrases per 1,000 words over all replies (0 without words)."""
    n_words = sum(len(words(r)) for r in replies)
    hits = sum(len(slop_matches(r, phrases)) for r in replies)
    return 1000.0 * hits / n_words if n_words else 0.0


def cross_reply_ngram_rate(replies: Sequence[str], n: int = 4, min_replies: int = 3) -> float:
    """Share of the replies' word n-grams that occur in at least `min_replies` different replies: a
    model's own stock phrasing, whether or not the list knows it ("the wind picks up as", "I can't
    help but"). 0 for a set of replies that never repeat one another."""
    per_reply = [set(ngrams(words(r), n)) for r in replies]
    spread: dict[tuple[str, ...], int] = {}
    for grams in per_reply:
        for g in grams:
            spread[g] = spread.get(g, 0) + 1
    total = sum(len(ngrams(words(r), n)) for r in replies)
    repeated = sum(1 for r in replies for g in ngrams(words(r), n) if spread[g] >= min_replies)
    return repeated / total if total else 0.0
