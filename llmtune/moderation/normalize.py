"""Normalisation for matching, never for display: undo the tricks people use to slip past a screen.

`views(text)` returns every candidate view the rules match against; `canonical(text)` is the one
view the adapter reads. Steps, in order:

- Unicode tag characters (U+E0020-E007E) can smuggle hidden ASCII; their payload becomes a view.
- NFKC, then accents and other combining marks dropped (NFKD), so fullwidth, math-bold and
  "Zalgo" letters become plain letters.
- Zero-width, bidi-control, tag and other format characters (Unicode category Cf) are removed.
- Confusable skeleton: a non-ASCII letter that looks like an ASCII letter or digit (Cyrillic
  "а", Greek "ο", Cherokee "Ꭵ", ...) becomes that character (confusable-homoglyphs' table).
- Base64-looking spans are decoded (bounded size, count and depth) and normalised as views.
- Extra views: letter-spacing collapsed ("s e x", "1 5 y o"), leetspeak folded ("l0l1", "s3x")
  with 1 read as i and as l.
- Number words become digits in the rule views ("fifteen" -> 15, "twenty-two" -> 22,
  "eighth" -> 8th).
"""

from __future__ import annotations

import base64
import binascii
import re
import unicodedata
from functools import lru_cache

# Base64 decoding bounds: a span longer than this is not decoded, at most this many spans per
# text and this many levels of nesting (base64 of base64).
B64_MIN_CHARS = 16
B64_MAX_CHARS = 8192
B64_MAX_SPANS = 8
B64_MAX_DEPTH = 2

# Invisible characters that are not category Cf: fillers that render as blank space.
_BLANK_FILLERS = dict.fromkeys(map(ord, "\u115f\u1160\u3164\uffa0\u2800\u180e"), None)


# Look-alikes the confusables table lacks or maps to an upper-case letter (Greek and Cyrillic
# lower case seen in the wild).
_EXTRA_SKELETON = {"χ": "x", "κ": "k", "τ": "t", "ν": "v", "ι": "i", "ω": "w", "ς": "c", "ϲ": "c", "η": "n", "β": "b",
                   "γ": "y", "ε": "e", "ϱ": "p", "ɪ": "i", "ʟ": "l", "ᴄ": "c", "к": "k", "м": "m", "т": "t", "ј": "j",
                   "ԛ": "q", "ԝ": "w", "ɢ": "g", "ӏ": "l", "Ӏ": "l", "ǀ": "l", "є": "e", "ѕ": "s", "і": "i", "у": "y",
                   "х": "x", "с": "c", "о": "o", "р": "p", "а": "a", "е": "e", "һ": "h", "ԁ": "d", "ɡ": "g", "ɑ": "a",
                   "¢": "c", "ℓ": "l", "ρ": "p", "υ": "u", "ο": "o", "α": "a", "ѵ": "v", "ƅ": "b", "ɩ": "i", "ʂ": "s",
                   "ɾ": "r", "ȥ": "z", "λ": "a", "σ": "o", "ø": "o", "ß": "b", "∂": "d", "ɛ": "e", "ʃ": "s", "ɣ": "y",
                   "п": "n", "г": "r", "и": "u", "л": "n", "в": "b", "н": "h", "д": "a", "ь": "b", "ш": "w", "ц": "u",
                   "ф": "o", "я": "r", "ж": "x", "з": "e", "э": "e", "ю": "io", "μ": "u", "π": "n", "θ": "o", "δ": "d",
                   "ψ": "y", "ξ": "e", "ζ": "z", "φ": "o", "ј": "j", "ԍ": "g", "ɦ": "h", "ɱ": "m", "ɲ": "n", "ƞ": "n"}


# Unicode names of letters that are a Latin letter in another dress: small capitals, circled,
# squared and parenthesised letters, regional indicators, modifier and subscript letters.
_LATIN_DRESS = re.compile(
    r"(?:LATIN LETTER SMALL CAPITAL|CIRCLED LATIN (?:SMALL|CAPITAL) LETTER|NEGATIVE CIRCLED LATIN CAPITAL LETTER"
    r"|SQUARED LATIN CAPITAL LETTER|NEGATIVE SQUARED LATIN CAPITAL LETTER|REGIONAL INDICATOR SYMBOL LETTER"
    r"|PARENTHESIZED LATIN SMALL LETTER|MODIFIER LETTER (?:SMALL|CAPITAL)|LATIN SUBSCRIPT SMALL LETTER"
    r"|LATIN (?:SMALL|CAPITAL) LETTER) ([A-Z])(?: WITH .*)?$"
)


def _dressed_latin() -> dict[int, str]:
    table: dict[int, str] = {}
    for cp in range(0x80, 0x20000):
        name = unicodedata.name(chr(cp), "")
        m = _LATIN_DRESS.match(name) if name else None
        if m:
            table[cp] = m.group(1).lower()
    return table


@lru_cache(maxsize=1)
def _skeleton_table() -> dict[int, str]:
    """Map each non-ASCII character that looks like one ASCII letter or digit to it (lower case).
    Lower-case targets win over upper-case ones (Cyrillic palochka reads "l", not "I"), letters over digits.
    Letters that are Latin letters by name (small capitals, circled or squared letters, regional
    indicators) map to their letter."""
    from confusable_homoglyphs.confusables import confusables_data

    table: dict[int, str] = dict(_dressed_latin())
    for char, glyphs in confusables_data.items():
        if len(char) != 1 or ord(char) < 128:
            continue  # never remap ASCII itself ("l" vs "1" is the leetspeak fold's job)
        targets = [g["c"].strip("\u200e") for g in glyphs]
        targets = [t for t in targets if len(t) == 1 and t.isascii() and t.isalnum()]
        ranked = sorted(targets, key=lambda t: (not t.islower(), not t.isalpha()))
        if ranked:
            table[ord(char)] = ranked[0].lower()
    table.update({ord(k): v for k, v in _EXTRA_SKELETON.items()})
    return table


def tag_payload(text: str) -> str:
    """The ASCII hidden in Unicode tag characters (U+E0020-U+E007E), or ''."""
    return "".join(chr(ord(c) - 0xE0000) for c in text if 0xE0020 <= ord(c) <= 0xE007E)


def fold(text: str) -> str:
    """NFKC, drop combining marks and invisible/format characters, confusable skeleton. Keeps case."""
    text = unicodedata.normalize("NFKC", text)
    if text.isascii():
        return text
    out = []
    for ch in unicodedata.normalize("NFKD", text):
        cat = unicodedata.category(ch)
        if cat in ("Mn", "Me", "Cf"):
            continue
        out.append(ch)
    text = "".join(out).translate(_BLANK_FILLERS)
    return text.translate(_skeleton_table())


# ---------------------------------------------------------------------------------------------
# Base64

_B64_SPAN = re.compile(rf"(?<![A-Za-z0-9+/_-])[A-Za-z0-9+/_-]{{{B64_MIN_CHARS},}}={{0,2}}")


def _decode_b64(span: str) -> str | None:
    if len(span) > B64_MAX_CHARS:
        return None
    # Ordinary long words are not base64: insist on digits, symbols or mixed case.
    core = span.rstrip("=")
    if core.isalpha() and (core.islower() or core.isupper()):
        return None
    padded = core + "=" * (-len(core) % 4)
    try:
        raw = base64.b64decode(padded, altchars=b"-_" if ("-" in core or "_" in core) else None, validate=True)
        decoded = raw.decode("utf-8")
    except (binascii.Error, ValueError, UnicodeDecodeError):
        return None
    printable = sum(ch.isprintable() or ch.isspace() for ch in decoded)
    letters = sum(ch.isalpha() for ch in decoded)
    if not decoded or printable < 0.95 * len(decoded) or letters < 0.5 * len(decoded):
        return None
    return decoded


def decode_base64_spans(text: str, depth: int = B64_MAX_DEPTH) -> tuple[str, list[str]]:
    """Replace decodable base64 spans with their text (recursively, bounded). Returns (text, decoded spans)."""
    found: list[str] = []
    if depth <= 0 or len(text) < B64_MIN_CHARS:
        return text, found
    spans = 0

    def swap(m: re.Match) -> str:
        nonlocal spans
        if spans >= B64_MAX_SPANS:
            return m.group(0)
        decoded = _decode_b64(m.group(0))
        if decoded is None:
            return m.group(0)
        spans += 1
        inner, deeper = decode_base64_spans(fold(decoded), depth - 1)
        found.append(inner)
        found.extend(deeper)
        return f" {inner} "

    return _B64_SPAN.sub(swap, text), found


# ---------------------------------------------------------------------------------------------
# Letter spacing and leetspeak

# Words the screen cares about. Leetspeak with ambiguous characters ("ch11d": is 1 an i or an l?)
# resolves to one of these when it can, and a collapsed letter-spaced run ("ashotaboy") is split
# around them ("a shota boy").
VOCAB = frozenset(["child", "children", "childs", "kid", "kids", "kiddie", "girl", "girls", "boy", "boys", "little", "young", "teen", "teens", "teenage", "teenager", "minor", "minors", "underage", "toddler", "preteen", "tween", "schoolgirl", "schoolboy", "elementary", "middle", "school", "schooler", "schoolers", "grade", "grader", "pupil", "baby", "infant", "loli", "lolis", "lolita", "lolicon", "shota", "shotacon", "jailbait", "pedo", "body", "year", "years", "old", "aged", "age", "yrs", "sex", "sexy", "sexual", "sexually", "sexting", "explicit", "erotic", "erotica", "lewd", "smut", "nsfw", "porn", "nude", "nudes", "naked", "seduce", "seduction", "steamy", "lust", "intimate", "romance", "romantic", "rape", "raped", "raping", "molest", "kiss", "kissing", "fetish", "orgasm", "aroused", "horny", "strip", "naughty", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety", "hundred", "thousand", "first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth", "horse", "dog", "animal", "goat", "pony", "bomb", "meth", "drug", "drugs", "real", "celebrity"])
_VOCAB_SEGMENT = sorted((w for w in VOCAB if len(w) >= 3), key=len, reverse=True)

# Three or more single characters separated by 1-3 spacing/punctuation characters: "s e x", "l.o.l.i".
_SPACED = re.compile(r"(?<![a-z0-9])(?:[a-z0-9][\s.\-_*·•|/\\,+~]{1,3}){2,}[a-z0-9](?![a-z0-9])")
# Two single digits split by a separator in front of an age word: "1 5 year old".
_SPLIT_DIGITS = re.compile(r"(?<!\d)(\d)[\s.\-_*]{1,2}(\d)(?=\s*[-\s]?\s*(?:y|years?|yrs?)\b)")
_SEPARATORS = re.compile(r"[\s.\-_*·•|/\\,+~]")


def _segment(run: str) -> str:
    """Split a collapsed run around vocabulary words ("ashotaboy" -> "a shota boy") and where
    letters meet digits ("a15" -> "a 15")."""
    run = re.sub(r"(?<=[a-z])(?=\d)", " ", run)
    if " " in run:
        return " ".join(_segment(p) for p in run.split())
    if run in VOCAB or len(run) < 4 or run.isdigit():
        return run
    marks = [False] * len(run)
    cuts: list[tuple[int, int]] = []
    for word in _VOCAB_SEGMENT:
        start = run.find(word)
        while start >= 0:
            end = start + len(word)
            if not any(marks[start:end]):
                cuts.append((start, end))
                for i in range(start, end):
                    marks[i] = True
            start = run.find(word, start + 1)
    if not cuts:
        return run
    out, pos = [], 0
    for start, end in sorted(cuts):
        out += [run[pos:start], run[start:end]]
        pos = end
    out.append(run[pos:])
    return " ".join(p for p in out if p)


# Any two single digits split by spacing: "aged 4 0" reads as 40 in this view (the plain view keeps 4 and 0).
_SPACED_DIGITS = re.compile(r"(?<![\w.])(\d)[ ._*]{1,2}(\d)(?![\w])")


def collapse_spacing(text: str, segment: bool = True) -> str:
    """Join letter-spaced runs; with `segment`, split the result around vocabulary words."""
    join = _segment if segment else (lambda run: re.sub(r"(?<=[a-z])(?=\d)", " ", run))

    def collapse(m: re.Match) -> str:
        # "s e x y  s t o r y": single separators inside a word, a wider gap between words
        words = re.split(r"\s{2,}|\s*[/|]\s*(?=\S\s)", m.group(0))
        return " ".join(join(_SEPARATORS.sub("", w)) for w in words if w.strip())

    text = _SPACED.sub(collapse, text)
    return _SPACED_DIGITS.sub(r"\1\2", _SPLIT_DIGITS.sub(r"\1\2", text))


_LEET = {"0": "o", "1": "il", "3": "e", "4": "a", "5": "s", "7": "t", "8": "b", "9": "g", "6": "bg",
         "@": "a", "$": "s", "!": "il", "|": "li", "+": "t", "€": "e", "(": "c"}
_TOKEN = re.compile(r"\S+")
# Parts of a token that are numbers, alone or with a unit/suffix, keep their digits: 15, 15yo, 8th,
# 18+, 10pm, 42 in "42-year-old", 13 in "13-y34r-old".
_NUMERIC = re.compile(
    r"^[(\[]?\d+(?:[.,:]\d+)*(?:yo|y|yr|yrs|th|st|nd|rd|s|f|m|k|am|pm|min|mins|ft|cm|mm|kg|lb|lbs|g|gb|mb|p|v|\+|%|')?"
    r"[)\],.;:!?]*$"
)


def _candidates(core: str, limit: int = 64):
    """Every reading of a leetspeak word (ambiguous characters tried both ways), capped."""
    readings = [""]
    for ch in core:
        options = _LEET.get(ch, ch)
        readings = [r + o for r in readings for o in options][:limit]
    return readings


def _vocab_reading(core: str) -> str | None:
    for reading in _candidates(core.lower()):
        base = reading.removesuffix("'s")
        if base in VOCAB or (base.endswith("s") and base[:-1] in VOCAB):
            return reading
    return None


def _fold_part(part: str, one: str) -> str:
    lead = len(part) - len(part.lstrip("([\"'"))
    tail = len(part) - len(part.rstrip(".,;:!?)]\"'"))
    core = part[lead: len(part) - tail]
    # "l0l!" and "(hild": a leet character may look like punctuation; keep it when that spells a word.
    whole = part.strip("\"'")
    if whole != core and any(c in _LEET for c in whole):
        known = _vocab_reading(whole)
        if known is not None:
            lead_q = len(part) - len(part.lstrip("\"'"))
            return part[:lead_q] + known + part[lead_q + len(whole):]
    if not core or not any(c in _LEET for c in core) or any(c.isalpha() and ord(c) > 0x24F for c in core):
        return part  # nothing to fold, or a word in another script ("15歳"): leetspeak is Latin
    known = _vocab_reading(core)
    if known is not None:
        core = known
    elif _NUMERIC.match(core) or not any(c.isalpha() for c in core):
        return part
    else:
        core = "".join((one if ch in "1!|" else _LEET[ch][0]) if ch in _LEET else ch for ch in core)
    return part[:lead] + core + part[len(part) - tail:]


def unleet(text: str, one_as_l: bool = False) -> str:
    """Fold leetspeak inside tokens that mix letters with look-alike digits/symbols ("s3x", "ch11d",
    "13-y34r-0ld" -> "13-year-old"). Ambiguous characters resolve to a vocabulary word when one
    fits, else to i (or l with one_as_l). Plain numbers and numbers with units stay digits."""
    one = "l" if one_as_l else "i"
    return _TOKEN.sub(lambda m: "".join(_fold_part(p, one) for p in re.split(r"([-/])", m.group(0))), text)


# Tokens unleet() could change: only those holding a character it folds.
_LEETISH = re.compile(r"\S*[" + re.escape("".join(_LEET)) + r"]\S*")


@lru_cache(maxsize=1 << 16)
def _leet_changes(token: str) -> bool:
    return unleet(token) != token


def has_leet(text: str) -> bool:
    """Whether unleet() changes the text: token by token (unleet works per token), and only the
    tokens holding a character it folds, each looked up once."""
    return any(_leet_changes(tok) for tok in _LEETISH.findall(text))


# ---------------------------------------------------------------------------------------------
# Number words

_ONES = {
    "zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8,
    "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13, "fourteen": 14, "fifteen": 15,
    "sixteen": 16, "seventeen": 17, "eighteen": 18, "nineteen": 19,
}
_TENS = {"twenty": 20, "thirty": 30, "forty": 40, "fourty": 40, "fifty": 50, "sixty": 60, "seventy": 70,
         "eighty": 80, "ninety": 90}
_ORDINALS = {
    "first": 1, "second": 2, "third": 3, "fourth": 4, "fifth": 5, "sixth": 6, "seventh": 7, "eighth": 8,
    "ninth": 9, "tenth": 10, "eleventh": 11, "twelfth": 12, "thirteenth": 13, "fourteenth": 14,
    "fifteenth": 15, "sixteenth": 16, "seventeenth": 17, "eighteenth": 18, "nineteenth": 19,
}
_ONES_WORDS = "|".join(sorted(_ONES, key=len, reverse=True))
_TENS_WORDS = "|".join(_TENS)
_UNIT_WORDS = "one|two|three|four|five|six|seven|eight|nine"
_NUMBER_WORDS = re.compile(
    rf"\b(?:(?P<tens>{_TENS_WORDS})(?:[\s-]?(?P<unit>{_UNIT_WORDS}))?|(?P<ones>{_ONES_WORDS}))"
    rf"(?:[\s-]?(?P<scale>hundred|thousand))?\b"
)
_ORDINAL_WORDS = re.compile(r"\b(" + "|".join(sorted(_ORDINALS, key=len, reverse=True)) + r")\b")
_SUFFIX = {1: "st", 2: "nd", 3: "rd"}


def numbers_to_digits(text: str) -> str:
    """"fifteen" -> "15", "twenty-two" -> "22", "a thousand" -> "1000", "eighth" -> "8th" (lower-case text)."""

    def cardinal(m: re.Match) -> str:
        if m.group("tens"):
            n = _TENS[m.group("tens")] + (_ONES[m.group("unit")] if m.group("unit") else 0)
        else:
            n = _ONES[m.group("ones")]
        scale = m.group("scale")
        if scale:
            n *= 100 if scale == "hundred" else 1000
        return str(n)

    def ordinal(m: re.Match) -> str:
        n = _ORDINALS[m.group(1)]
        return f"{n}{_SUFFIX.get(n, 'th') if n not in (11, 12, 13) else 'th'}"

    text = re.sub(r"\b(a[\s-]|one[\s-])(hundred|thousand)\b",
                  lambda m: ("a " if m.group(1).startswith("a") else "") + ("100" if m.group(2) == "hundred" else "1000"), text)
    return _ORDINAL_WORDS.sub(ordinal, _NUMBER_WORDS.sub(cardinal, text))


# ---------------------------------------------------------------------------------------------
# Views


# Letters split by a separator inside one word, where one side is short ("chi-ld", "se.xy",
# "fif-teen"): the joined reading is an extra view. Ordinary compounds ("well-known") have two
# long sides and stay as they are.
_SPLIT_WORD = re.compile(r"(?<![a-z])([a-z]{1,3})[-_.*·•]+(?=[a-z]{2,}\b)|(?<![a-z])([a-z]{2,})[-_.*·•]+(?=[a-z]{1,3}(?![a-z]))")


def join_split_words(text: str) -> str:
    """"chi-ld" -> "child", "se.xy" -> "sexy"; repeated until no short split is left."""
    for _ in range(4):
        joined = _SPLIT_WORD.sub(lambda m: m.group(1) or m.group(2), text)
        if joined == text:
            break
        text = joined
    return text


def native(text: str) -> str:
    """The text as its own language reads it: NFKC, lower case, invisible and format characters
    removed, accents and scripts kept. The multilingual lexicons match this view."""
    text = unicodedata.normalize("NFKC", text)
    if not text.isascii():
        text = "".join(ch for ch in text if unicodedata.category(ch) != "Cf").translate(_BLANK_FILLERS)
    return text.lower()


# Emoji used as sexual cues, read as the word they stand in for (rules and classifier alike).
EMOJI_WORDS = {"🍆": "nsfw", "🍑": "nsfw", "💦": "nsfw", "👅": "nsfw", "🥵": "nsfw", "🔞": "nsfw", "🫦": "nsfw",
               "🌶": "spicy", "🌶️": "spicy", "💋": "kiss", "😘": "kiss",
               # people and places that are cues for minors, animals for bestiality
               "🧒": "child", "👶": "baby", "👦": "boy child", "👧": "girl child", "🏫": "school", "🎒": "school kid",
               "🐕": "dog", "🐶": "dog", "🐴": "horse", "🐎": "horse"}
_EMOJI = re.compile("|".join(sorted(map(re.escape, EMOJI_WORDS), key=len, reverse=True)))


def emoji_words(text: str) -> str:
    return _EMOJI.sub(lambda m: f" {EMOJI_WORDS[m.group(0)]} ", text) if not text.isascii() else text


def _base(text: str) -> tuple[str, list[str]]:
    """Folded, lower-cased text with base64 spans decoded in place, plus the hidden readings:
    a tag-character payload, the visual order of right-to-left overrides, and every decoded
    reading (ROT13 and other shifts, reversed text, hex, URL escapes, HTML entities, binary, Morse)."""
    from llmtune.moderation.decode import bidi_visual, decoded_readings

    hidden = tag_payload(text)
    text = text[:_MAX_VIEW_CHARS] if len(text) > _MAX_VIEW_CHARS else text
    visual = bidi_visual(unicodedata.normalize("NFKC", text))
    text, _ = decode_base64_spans(emoji_words(fold(text)))
    extra = []
    for raw in ([hidden] if hidden else []) + ([visual] if visual is not None else []):
        payload, _ = decode_base64_spans(fold(raw))
        extra.append(payload.lower())
    extra += [r.text.lower() for r in decoded_readings(text)]
    return text.lower(), extra


# Views are built from at most this many characters of a text (callers window longer texts).
_MAX_VIEW_CHARS = 50_000


def views(text: str) -> list[str]:
    """Every candidate view for rule matching (deduplicated, number words as digits)."""
    base, extra = _base(text)
    out: list[str] = []
    for v in [base, *extra]:
        candidates = [v]
        collapsed = collapse_spacing(v)
        if collapsed != v:
            # segmented ("a shota boy") and whole ("gretagerwig", so a spaced-out name still matches)
            candidates += [collapsed, collapse_spacing(v, segment=False)]
        if has_leet(v):
            candidates += [unleet(v), unleet(v, one_as_l=True)]
            candidates += [collapse_spacing(unleet(v)), collapse_spacing(unleet(v, one_as_l=True))]
        joined = join_split_words(v)
        if joined != v:
            candidates.append(joined)
        for c in candidates:
            c = numbers_to_digits(c)
            if c not in out:
                out.append(c)
    return out


# What re's \s matches in ASCII text (str.isspace), spelled out: RE2's \s lacks \v and \x1c-\x1f.
_WS = r"\t\n\x0b\x0c\r\x1c-\x1f "


@lru_cache(maxsize=1)
def _spacing_scanner():
    """One RE2 scan that matches exactly when _SPACED, _SPLIT_DIGITS or _SPACED_DIGITS has a match
    in lower-case ASCII text, i.e. when collapse_spacing could change it. The lookarounds become
    consumed boundary characters, which keeps the existence of a match the same."""
    import re2

    sep = rf"[{_WS}.\-_*·•|/\\,+~]"
    spaced = rf"(?:^|[^a-z0-9])(?:[a-z0-9]{sep}{{1,3}}){{2,}}[a-z0-9](?:$|[^a-z0-9])"
    split_digits = rf"(?:^|[^0-9])[0-9][{_WS}.\-_*]{{1,2}}[0-9][{_WS}]*[-{_WS}]?[{_WS}]*(?:y|years?|yrs?)(?:$|[^a-z0-9_])"
    spaced_digits = r"(?:^|[^a-z0-9_.])[0-9][ ._*]{1,2}[0-9](?:$|[^a-z0-9_])"
    return re2.compile(f"{spaced}|{split_digits}|{spaced_digits}")


@lru_cache(maxsize=1)
def _number_word_scanner():
    """RE2 scan for any word numbers_to_digits rewrites: without one, it returns the text as is."""
    import re2

    words = sorted({*_ONES, *_TENS, *_ORDINALS, "hundred", "thousand"}, key=len, reverse=True)
    return re2.compile(r"\b(?:" + "|".join(words) + r")\b")


def plain_view(text: str) -> str | None:
    """The one view of a text that has nothing to undo, or None when any normalisation step could
    change it. For plain text `views(text) == [plain_view(text)]` exactly: ASCII (so no Unicode
    folding, tag or invisible characters), no base64-looking span, no letter spacing, no token that
    leetspeak folding changes, no word split by a separator, nothing a decoder could read
    (decode.needs_decoding). Costs a few regex scans instead of building every view."""
    if not text.isascii() or any(_decode_b64(m.group(0)) is not None for m in _B64_SPAN.finditer(text)):
        return None
    low = text.lower()
    if _spacing_scanner().search(low):  # collapse_spacing would change it
        return None
    if has_leet(low) or join_split_words(low) != low:
        return None
    from llmtune.moderation.decode import needs_decoding

    if needs_decoding(low):
        return None
    return numbers_to_digits(low) if _number_word_scanner().search(low) else low


def _mostly_other_script(text: str) -> bool:
    """More than half the letters are neither Latin nor look-alikes used inside Latin words:
    Russian, Greek, Japanese or Chinese text, whose own letters the classifier should read."""
    letters = [c for c in text if c.isalpha()]
    if not letters:
        return False
    latin = sum(c.isascii() or unicodedata.name(c, "").startswith("LATIN") for c in letters)
    return latin < 0.5 * len(letters)


def canonical(text: str) -> str:
    """The single view the adapter reads: folded, decoded, spacing collapsed, leetspeak folded.
    Text mostly in another script (Cyrillic, Greek, CJK) is read in its own letters (`native`),
    not mapped to Latin look-alikes; its decoded readings are appended."""
    base, extra = _base(text)
    if _mostly_other_script(text):
        base = native(text)
    # hidden readings first: a text that is all ROT13 or hex reads as its decoding in the first window
    parts = [join_split_words(unleet(collapse_spacing(v)) if has_leet(v) else collapse_spacing(v)) for v in [*extra, base]]
    return re.sub(r"\s+", " ", " ".join(parts)).strip()
