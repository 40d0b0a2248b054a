"""The screen's word lists, kept as data in `lexicon/` beside this module (so wheels carry them):

    lexicon/<lang>.yaml          minor and sexual cues per language (fr, de, es, pt, it, ru, ja, zh, pl, nl, en_extra)
    lexicon/public_figures.tsv   name, field, country, aliases: thousands of public figures
    lexicon/organizations.tsv    name, kind, country, aliases: what people are identified through

`languages()` compiles every YAML once: each list entry is a regular expression matched
case-insensitively on `normalize.native` text (NFKC, lower case, accents and scripts kept),
with `{n}` standing for a number in digits or in that language's number words. `Gazetteer`
finds names by word n-grams (a set lookup per position, not a regex over thousands of names).
The format is checked by tests/moderation/test_lexicon.py.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from llmtune.moderation.errors import ModerationError

LEXICON_DIR = Path(__file__).resolve().parent / "lexicon"
LANGUAGE_FILES = ("fr", "de", "es", "pt", "it", "ru", "ja", "zh", "pl", "nl", "ko", "tr", "ar", "hi_latn", "id", "vi", "sv", "tl", "en_extra")
LIST_KEYS = (
    "age_patterns", "minor_terms", "school_patterns", "adult_patterns", "appearance_patterns", "ageplay_terms",
    "sexual_terms", "romantic_terms", "not_a_person", "negations",
)
KEYS = frozenset({"language", "name", "numbers", "ordinals", *LIST_KEYS, "ambiguous_terms"})
FIGURE_FIELDS = frozenset({"politics", "royalty", "film_tv", "music", "sports", "business", "media", "internet",
                           "literature", "science", "religion", "other"})
ORG_KINDS = frozenset({"company", "platform", "band", "team", "show", "party", "institution"})
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af]")


@dataclass
class Language:
    """One language's compiled cues. `number` maps a matched number (digits or word) to its value."""

    code: str
    name: str
    numbers: dict[str, int]
    patterns: dict[str, list["Entry"]] = field(default_factory=dict)

    def number(self, token: str) -> int | None:
        token = token.strip().lower()
        if token.isdigit():
            return int(token)
        return self.numbers.get(token)


# `{n}` in an entry: digits or a word; a match counts only when the word is one of the
# language's numbers (`Language.number`). One short token instead of an alternation of hundreds
# of number words keeps compiling thousands of entries fast.
NUMBER_TOKEN = r"(?P<n>\d{1,3}|[^\W\d_]+?)"


def _number_alternation(numbers: dict[str, int]) -> str:
    words = sorted((w for w in numbers if w), key=len, reverse=True)
    return r"(?P<n>\d{1,3}|" + "|".join(re.escape(w) for w in words) + ")" if words else r"(?P<n>\d{1,3})"


def _expand(entry: str, numbers_rx: str) -> str:
    """`entry` with its first `{n}` as the named number group and any further ones as plain numbers."""
    parts = entry.split("{n}")
    if len(parts) == 1:
        return entry
    plain = numbers_rx.replace("?P<n>", "?:")
    return parts[0] + numbers_rx + parts[1] + "".join(plain + p for p in parts[2:])


def load_language(path: Path) -> Language:
    import yaml

    where = str(path)
    try:
        doc = yaml.load(path.read_text(encoding="utf-8"), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ModerationError(f"{where}: cannot read the lexicon ({exc})") from None
    if not isinstance(doc, dict):
        raise ModerationError(f"{where}: a lexicon is a mapping with keys {sorted(KEYS)}")
    unknown = set(doc) - KEYS
    if unknown:
        raise ModerationError(f"{where}: unknown key(s) {sorted(unknown)}; valid: {sorted(KEYS)}")
    numbers: dict[str, int] = {}
    ordinals: dict[str, int] = {}
    for key, table in (("numbers", numbers), ("ordinals", ordinals)):
        for word, value in (doc.get(key) or {}).items():
            if not isinstance(value, int):
                raise ModerationError(f"{where}: {key}.{word}: expected an integer, got {value!r}")
            table[unicodedata.normalize("NFKC", str(word)).lower()] = value
    # school years are said with ordinals ("neunte Klasse"); ages only with cardinals ("sie ist Erste" is no age)
    lang = Language(str(doc.get("language") or path.stem), str(doc.get("name") or path.stem), {**ordinals, **numbers})
    numbers_rx = ordinals_rx = NUMBER_TOKEN
    for key in LIST_KEYS:
        entries = doc.get(key) or []
        if not isinstance(entries, list):
            raise ModerationError(f"{where}: `{key}` must be a list of regular expressions")
        rx = ordinals_rx if key == "school_patterns" else numbers_rx
        # NFKC only: matching is case-insensitive, and lower-casing an expression would break its
        # syntax ("(?P<n>" -> "(?p<n>", "\S" -> "\s"); the prefilter's literals are lower-cased on their own
        cleaned = [unicodedata.normalize("NFKC", str(e)) for e in entries]
        lang.patterns[key] = []
        for i, e in enumerate(cleaned):
            source = _expand(e, rx)
            lang.patterns[key].append(Entry(source, required_literals(source, f"{where}: {key}[{i}]: `{e}`")))
    return lang


class Entry:
    """A lexicon entry, compiled on first use, and a set of literals one of which every match
    contains (None when it has no such set). A text holding none of them skips the regular
    expression: thousands of entries cost a few substring tests each instead of a backtracking
    scan each, and most of them are never compiled at all."""

    __slots__ = ("source", "literals", "_pattern")

    def __init__(self, source: str, literals: tuple[str, ...] | None):
        self.source, self.literals, self._pattern = source, literals, None

    @property
    def pattern(self) -> re.Pattern:
        if self._pattern is None:
            self._pattern = re.compile(self.source, re.IGNORECASE)
        return self._pattern

    def possible(self, text: str) -> bool:
        return self.literals is None or any(lit in text for lit in self.literals)

    def search(self, text: str):
        return self.pattern.search(text) if self.possible(text) else None

    def finditer(self, text: str):
        return self.pattern.finditer(text) if self.possible(text) else iter(())

    def match(self, text: str):
        return self.pattern.match(text) if self.possible(text) else None

    def sub(self, repl, text: str) -> str:
        return self.pattern.sub(repl, text) if self.possible(text) else text


def _required(items, sre) -> tuple[str, ...] | None:
    """Literals one of which every match of the parsed sequence `items` contains."""
    best: tuple[str, ...] | None = None

    def strength(cand) -> int:
        return min(len(lit) if lit.isascii() else 3 * len(lit) for lit in cand)

    def consider(cand):
        nonlocal best
        if cand and (best is None or strength(cand) > strength(best)):
            best = cand

    run: list[str] = []
    for op, arg in items:
        if op is sre.LITERAL:
            run.append(chr(arg).lower())
            continue
        if run:
            consider(("".join(run),))
            run = []
        if op is sre.SUBPATTERN:
            consider(_required(arg[3], sre))
        elif op is sre.BRANCH:
            subs = [_required(b, sre) for b in arg[1]]
            if all(subs):
                union = tuple(sorted({lit for sub in subs for lit in sub}))
                if len(union) <= 64:
                    consider(union)
        elif op in (sre.MAX_REPEAT, sre.MIN_REPEAT) and arg[0] >= 1:
            consider(_required(arg[2], sre))
    if run:
        consider(("".join(run),))
    return best


def required_literals(entry: str, where: str = "") -> tuple[str, ...] | None:
    """For the prefilter: a set of literals (2+ characters each) every match of `entry` holds one
    of. Parsing here is also the check that the entry is a valid expression."""
    try:
        from re import _parser as sre  # Python 3.11+
    except ImportError:  # pragma: no cover
        import sre_parse as sre  # type: ignore[no-redef]

    try:
        found = _required(sre.parse(entry, re.IGNORECASE), sre)
    except re.error as exc:
        raise ModerationError(f"{where or entry}: not a valid regular expression ({exc})") from None
    # a literal must be telling: 3+ Latin characters, or any character of another script (CJK, emoji)
    if not found or not all(len(lit.strip()) >= 3 or (lit.strip() and not lit.isascii()) for lit in found):
        return None
    return found


@lru_cache(maxsize=1)
def languages() -> tuple[Language, ...]:
    """Every lexicon that ships (missing files are skipped: the English rules stand alone)."""
    return tuple(load_language(LEXICON_DIR / f"{code}.yaml") for code in LANGUAGE_FILES
                 if (LEXICON_DIR / f"{code}.yaml").is_file())


class LexiconIndex:
    """One Aho-Corasick automaton (pyahocorasick) over every entry's literals in every language:
    a single pass over a text finds the few entries that could match it."""

    def __init__(self, langs: tuple[Language, ...]):
        import ahocorasick

        self.langs = langs
        self.automaton = ahocorasick.Automaton()
        owners: dict[str, list[tuple[int, str, int]]] = {}
        self.always: dict[tuple[int, str], list[int]] = {}
        for li, lang in enumerate(langs):
            for key, entries in lang.patterns.items():
                for ei, entry in enumerate(entries):
                    if entry.literals is None:
                        self.always.setdefault((li, key), []).append(ei)
                    else:
                        for lit in entry.literals:
                            owners.setdefault(lit, []).append((li, key, ei))
        for lit, owned in owners.items():
            self.automaton.add_word(lit, tuple(owned))
        self.automaton.make_automaton() if owners else None
        self.empty = not owners

    def candidates(self, text: str) -> dict[tuple[int, str], list[int]]:
        """(language index, key) -> indices of the entries that could match `text`, in file order."""
        found: dict[tuple[int, str], set[int]] = {k: set(v) for k, v in self.always.items()}
        if not self.empty:
            for _, owned in self.automaton.iter(text):
                for li, key, ei in owned:
                    found.setdefault((li, key), set()).add(ei)
        return {k: sorted(v) for k, v in found.items()}


@lru_cache(maxsize=1)
def index() -> LexiconIndex:
    return LexiconIndex(languages())


# ---------------------------------------------------------------------------------------------
# Names


def stem(word: str) -> str:
    """A name word without its inflection: its first five letters (short words whole)."""
    return word[:5] if len(word) > 5 else word


def name_key(text: str) -> str:
    """A name as the gazetteer compares it: NFKC, accents dropped, lower case, words joined by one space."""
    text = unicodedata.normalize("NFKD", unicodedata.normalize("NFKC", text))
    text = "".join(ch for ch in text if not unicodedata.combining(ch)).lower()
    return " ".join(re.findall(r"[^\W_]+", text))


@dataclass(frozen=True)
class Person:
    name: str
    field: str
    country: str


@dataclass
class Gazetteer:
    """Public figures (and a platform's own names) looked up by word n-grams."""

    entries: dict[str, Person] = field(default_factory=dict)  # name_key -> person (names and aliases)
    joined: dict[str, str] = field(default_factory=dict)  # "taylorswift" -> "taylor swift"
    max_words: int = 1
    cjk: list[tuple[str, str]] = field(default_factory=list)  # (alias in CJK script, key) found by substring

    stems: dict[str, str] = field(default_factory=dict)  # stemmed key -> key, for inflected names
    prefixes: dict[str, str] = field(default_factory=dict)  # one-word aliases in inflecting scripts

    def add(self, name: str, person: Person) -> None:
        key = name_key(name)
        if not key:
            return
        self.entries.setdefault(key, person)
        words = key.split()
        self.max_words = max(self.max_words, len(words))
        # Names are inflected: "o Robercie Lewandowskim" (Polish), "про Путина" (Russian). A name of
        # two or more words also matches word stems; a one-word alias in Cyrillic or Greek matches
        # with a short case ending.
        if len(words) > 1 and all(len(w) >= 3 for w in words):
            self.stems.setdefault(" ".join(stem(w) for w in words), key)
        elif len(words) == 1 and len(key) >= 4 and not key.isascii() and not _CJK.search(key):
            self.prefixes.setdefault(key, key)
        if len(words) > 1 and min(map(len, words)) >= 2 and len("".join(words)) >= 8:
            self.joined.setdefault("".join(words), key)  # "taylorswift", as in a hashtag
        if _CJK.search(name):
            self.cjk.append((unicodedata.normalize("NFKC", name).lower(), key))

    def find(self, text: str) -> list[tuple[tuple[int, int], str, Person]]:
        """(span, matched key, person) for every listed name in `text` (longest match first)."""
        out = []
        tokens = [(m.start(), m.end(), m.group(0)) for m in re.finditer(r"[^\W_]+", text)]
        keys = [name_key(t[2]) for t in tokens]
        i = 0
        while i < len(tokens):
            hit = None
            for n in range(min(self.max_words, len(tokens) - i), 0, -1):
                key = " ".join(keys[i:i + n])
                if key not in self.entries and key in self.joined:
                    key = self.joined[key]
                if key not in self.entries and n > 1:
                    key = self.stems.get(" ".join(stem(w) for w in keys[i:i + n]), key)
                if key not in self.entries and n == 1 and self.prefixes and not key.isascii():
                    key = next((k for k in (key[:-j] for j in (1, 2, 3) if len(key) - j >= 4) if k in self.prefixes), key)
                person = self.entries.get(key)
                if person is not None:
                    hit = (n, key, person)
                    break
            if hit:
                n, key, person = hit
                out.append(((tokens[i][0], tokens[i + n - 1][1]), key, person))
                i += n
            else:
                i += 1
        if self.cjk:
            low = unicodedata.normalize("NFKC", text).lower()
            for alias, key in self.cjk:
                start = low.find(alias)
                if start >= 0:
                    out.append(((start, start + len(alias)), key, self.entries[key]))
        return out


def _read_tsv(path: Path, columns: int, allowed: frozenset[str], what: str):
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines()
    for n, line in enumerate(lines[1:], 2):
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split("\t")
        if len(parts) != columns:
            raise ModerationError(f"{path}:{n}: expected {columns} tab-separated fields, got {len(parts)}")
        if parts[1] not in allowed:
            raise ModerationError(f"{path}:{n}: {what} `{parts[1]}` is not one of {sorted(allowed)}")
        yield parts


# A one-word alias must not be an ordinary word or someone's first name: "Drake", "Pink",
# "H.E.R." ("her") and "MTG" would match everyday text. Words among the encoder vocabulary's
# most frequent entries count as ordinary.
COMMON_WORD_RANK = 6000
MIN_ALIAS_CHARS = 4


@lru_cache(maxsize=1)
def _common_words() -> frozenset[str]:
    from llmtune.encoder import minilm_dir

    try:
        vocab = (minilm_dir() / "vocab.txt").read_text(encoding="utf-8").split("\n")
    except Exception:  # noqa: BLE001
        return frozenset()
    return frozenset(w for w in vocab[:COMMON_WORD_RANK] if w.isalpha())


def distinctive(alias: str, first_names: set[str]) -> bool:
    """Whether a one-word alias identifies its person on its own (scripts without word spaces always do)."""
    key = name_key(alias)
    if " " in key or _CJK.search(alias):
        return True
    return len(key) >= MIN_ALIAS_CHARS and key not in _common_words() and key not in first_names


@lru_cache(maxsize=1)
def public_figures() -> Gazetteer:
    rows = list(_read_tsv(LEXICON_DIR / "public_figures.tsv", 4, FIGURE_FIELDS, "field"))
    first_names = {name_key(name).split()[0] for name, *_ in rows if " " in name_key(name)}
    gazetteer = Gazetteer()
    for name, fld, country, aliases in rows:
        person = Person(name, fld, country)
        for form in [name, *aliases.split(";")]:
            if form.strip() and distinctive(form.strip(), first_names):
                gazetteer.add(form.strip(), person)
    return gazetteer


@lru_cache(maxsize=1)
def organizations() -> dict[str, str]:
    """name_key -> kind, for every organisation and alias (companies, platforms, bands, teams, shows, parties)."""
    orgs: dict[str, str] = {}
    for name, kind, _country, aliases in _read_tsv(LEXICON_DIR / "organizations.tsv", 4, ORG_KINDS, "kind"):
        for form in [name, *aliases.split(";")]:
            if name_key(form):
                orgs.setdefault(name_key(form), kind)
    return orgs


@lru_cache(maxsize=1)
def countries() -> frozenset[str]:
    """Country names, official names and common short forms (pycountry), as name keys."""
    import pycountry

    names = set()
    for c in pycountry.countries:
        for attr in ("name", "official_name", "common_name"):
            value = getattr(c, attr, None)
            if value:
                names.add(name_key(value))
    names |= {"usa", "us", "america", "uk", "britain", "great britain", "england", "scotland", "wales", "russia",
              "south korea", "north korea", "korea", "iran", "syria", "vietnam", "taiwan", "czechia", "the netherlands",
              "holland", "the philippines", "the uk", "the us", "the usa", "the united states", "the united kingdom"}
    return frozenset(names)
