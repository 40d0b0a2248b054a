"""Decoders for text people encode to slip past a screen: each returns the hidden reading, or None.

    decoded_readings(text) -> list[Reading]    # every reading worth screening, each with its decoder

They run on what `normalize` has already folded. Each decoder is cheap and conservative: it only
returns a reading when the text plausibly holds one (a long enough span of hex digits that
decodes to printable text, a Caesar shift whose words are far more often English words than the
original's, a right-to-left override whose visual order differs from the logical one, ...).
A reading is screened as an extra view: it can add a block, never remove one.
"""

from __future__ import annotations

import html
import re
import string
import urllib.parse
from dataclasses import dataclass
from functools import lru_cache

# A reading is kept when its share of known words beats the original's by this margin and
# reaches at least MIN_WORD_SHARE.
WORD_SHARE_MARGIN = 0.3
MIN_WORD_SHARE = 0.55
MIN_WORDS = 2
MAX_DECODE_CHARS = 20_000  # decoders read at most this much of a text

RLO, LRO, RLE, LRE, PDF, RLI, LRI, FSI, PDI = "\u202e", "\u202d", "\u202b", "\u202a", "\u202c", "\u2067", "\u2066", "\u2068", "\u2069"


@dataclass(frozen=True)
class Reading:
    decoder: str  # "rot13", "caesar-7", "atbash", "reversed", "rtl-override", "hex", "url", "html", "morse", "binary"
    text: str


@lru_cache(maxsize=1)
def english_words() -> frozenset[str]:
    """Whole English words (2+ letters) from the moderation encoder's WordPiece vocabulary: a
    21k-word dictionary that ships with the embedded encoder, so no extra download."""
    from llmtune.encoder import minilm_dir

    try:
        vocab = (minilm_dir() / "vocab.txt").read_text(encoding="utf-8").split()
    except Exception:  # noqa: BLE001 - without the encoder package, fall back to a tiny list
        vocab = "a an the is are was be to of and or in on at for with she he they you i it this that her his sex".split()
    return frozenset(w for w in vocab if w.isascii() and w.isalpha() and (len(w) >= 2 or w in ("a", "i")))


_WORD = re.compile(r"[a-z]+")


# Chat words the encoder's vocabulary lacks.
CHAT_WORDS = frozenset("nsfw sfw rp erp ooc lol pls plz ur omg ok okay tbh idk btw imo irl dm dms oc ocs u".split())


def word_share(text: str) -> tuple[float, int]:
    """Share of letter runs that are English words, and how many runs there were. Runs of three
    letters or more count when there are at least two of them: two-letter runs are words by
    accident too often ("vf", "ec")."""
    words = _WORD.findall(text.lower())
    if not words:
        return 0.0, 0
    long_words = [w for w in words if len(w) >= 3]
    if len(long_words) >= 2:
        words = long_words
    known = english_words()
    return sum(w in known or w in CHAT_WORDS for w in words) / len(words), len(words)


def _better(reading: str, original_share: float) -> bool:
    share, n = word_share(reading)
    return n >= MIN_WORDS and share >= MIN_WORD_SHARE and share >= original_share + WORD_SHARE_MARGIN


# ---------------------------------------------------------------------------------------------
# Substitution ciphers: ROT13 and other Caesar shifts, Atbash


def _shift_table(k: int) -> dict[int, str]:
    low, up = string.ascii_lowercase, string.ascii_uppercase
    return str.maketrans(low + up, low[k:] + low[:k] + up[k:] + up[:k])


_SHIFTS = {k: _shift_table(k) for k in range(1, 26)}
_ATBASH = str.maketrans(string.ascii_lowercase + string.ascii_uppercase,
                        string.ascii_lowercase[::-1] + string.ascii_uppercase[::-1])


def substitution_readings(text: str, share: float) -> list[Reading]:
    """The best Caesar shift (ROT13 included) and Atbash, when they read as English and the text
    itself does not."""
    if share >= 1.0 - WORD_SHARE_MARGIN:
        return []
    best: tuple[float, int, str] | None = None
    for k, table in _SHIFTS.items():
        candidate = text.translate(table)
        s, n = word_share(candidate)
        if n >= MIN_WORDS and (best is None or s > best[0]):
            best = (s, k, candidate)
    out = []
    if best is not None and _better(best[2], share):
        out.append(Reading("rot13" if best[1] == 13 else f"caesar-{best[1]}", best[2]))
    atbash = text.translate(_ATBASH)
    if _better(atbash, share):
        out.append(Reading("atbash", atbash))
    return out


# ---------------------------------------------------------------------------------------------
# Reversed text and bidi overrides


def reversed_readings(text: str, share: float) -> list[Reading]:
    """The text read backwards (characters, and word order), when that reads better."""
    out = []
    chars = text[::-1]
    if _better(chars, share):
        out.append(Reading("reversed", chars))
    # each word reversed in place ("ehs si 51" style is covered above; "ehs" "si" in order here)
    words = " ".join(w[::-1] for w in text.split())
    if words != chars and _better(words, share):
        out.append(Reading("reversed-words", words))
    return out


_BIDI_OPEN = {RLO, RLE, RLI}
_BIDI_CLOSE = {PDF, PDI}
_BIDI_ALL = {RLO, LRO, RLE, LRE, PDF, RLI, LRI, FSI, PDI, "\u200f", "\u200e", "\u061c"}


def bidi_visual(text: str) -> str | None:
    """What a reader sees when right-to-left overrides/embeddings reverse runs of Latin text:
    each run from an RLO/RLE/RLI to its PDF/PDI (or the end of the line) is reversed. None when
    the text has no such control."""
    if not any(c in text for c in _BIDI_OPEN):
        return None
    out: list[str] = []
    stack: list[list[str]] = []
    for ch in text:
        if ch in _BIDI_OPEN:
            stack.append([])
        elif ch in _BIDI_CLOSE or (ch == "\n" and stack):
            if stack:
                run = "".join(stack.pop())[::-1]
                (stack[-1] if stack else out).append(run)
            if ch == "\n":
                while stack:
                    run = "".join(stack.pop())[::-1]
                    (stack[-1] if stack else out).append(run)
                out.append(ch)
        elif ch in _BIDI_ALL:
            continue
        else:
            (stack[-1] if stack else out).append(ch)
    while stack:
        run = "".join(stack.pop())[::-1]
        (stack[-1] if stack else out).append(run)
    return "".join(out)


# ---------------------------------------------------------------------------------------------
# Byte encodings: hex, URL escapes, HTML entities, binary, Morse


_HEX_SPAN = re.compile(r"(?:(?:0x|\\x)?[0-9a-fA-F]{2}[\s:,\-]?){6,}")
_BIN_SPAN = re.compile(r"(?:[01]{8}[\s,]?){4,}")
_URL_ESC = re.compile(r"%[0-9a-fA-F]{2}")
_HTML_ENT = re.compile(r"&(?:#\d{2,7}|#x[0-9a-fA-F]{2,6}|[a-zA-Z]{2,8});")
_MORSE = re.compile(r"^[\s./\-_|·•−–—]+$")


def _printable(decoded: str) -> bool:
    if not decoded:
        return False
    printable = sum(ch.isprintable() or ch.isspace() for ch in decoded)
    letters = sum(ch.isalpha() for ch in decoded)
    return printable >= 0.95 * len(decoded) and letters >= 0.4 * len(decoded)


def _bytes_text(raw: bytes) -> str | None:
    try:
        decoded = raw.decode("utf-8")
    except UnicodeDecodeError:
        decoded = raw.decode("latin-1")
    return decoded if _printable(decoded) else None


def hex_readings(text: str) -> list[Reading]:
    out = []
    for m in _HEX_SPAN.finditer(text):
        digits = re.sub(r"0x|\\x|[\s:,\-]", "", m.group(0))
        if len(digits) % 2 or digits.isdigit() and len(digits) < 16:
            continue  # long plain numbers (phone numbers, dates) are not hex text
        decoded = _bytes_text(bytes.fromhex(digits))
        if decoded is not None:
            out.append(Reading("hex", text.replace(m.group(0), f" {decoded} ", 1)))
    return out[:8]


def binary_readings(text: str) -> list[Reading]:
    out = []
    for m in _BIN_SPAN.finditer(text):
        bits = re.sub(r"[\s,]", "", m.group(0))
        decoded = _bytes_text(bytes(int(bits[i:i + 8], 2) for i in range(0, len(bits) - 7, 8)))
        if decoded is not None:
            out.append(Reading("binary", text.replace(m.group(0), f" {decoded} ", 1)))
    return out[:4]


def escape_readings(text: str) -> list[Reading]:
    out = []
    if _URL_ESC.search(text):
        decoded = urllib.parse.unquote(text)
        if decoded != text:
            out.append(Reading("url", decoded))
    if _HTML_ENT.search(text):
        decoded = html.unescape(text)
        if decoded != text:
            out.append(Reading("html", decoded))
    return out


_MORSE_CODE = {
    ".-": "a", "-...": "b", "-.-.": "c", "-..": "d", ".": "e", "..-.": "f", "--.": "g", "....": "h", "..": "i",
    ".---": "j", "-.-": "k", ".-..": "l", "--": "m", "-.": "n", "---": "o", ".--.": "p", "--.-": "q", ".-.": "r",
    "...": "s", "-": "t", "..-": "u", "...-": "v", ".--": "w", "-..-": "x", "-.--": "y", "--..": "z",
    "-----": "0", ".----": "1", "..---": "2", "...--": "3", "....-": "4", ".....": "5", "-....": "6",
    "--...": "7", "---..": "8", "----.": "9",
}


def morse_reading(text: str) -> Reading | None:
    stripped = text.strip()
    if len(stripped) < 8 or not _MORSE.match(stripped):
        return None
    norm = stripped.translate(str.maketrans({"·": ".", "•": ".", "−": "-", "–": "-", "—": "-", "_": "-", "|": "/"}))
    words = []
    for word in re.split(r"\s*/\s*|\s{3,}", norm):
        letters = [_MORSE_CODE.get(sym) for sym in word.split()]
        if not letters or None in letters:
            return None
        words.append("".join(letters))
    return Reading("morse", " ".join(words))


# ---------------------------------------------------------------------------------------------


def decoded_readings(text: str) -> list[Reading]:
    """Every hidden reading of `text` worth screening (deduplicated, never the text itself)."""
    text = text[:MAX_DECODE_CHARS]
    out: list[Reading] = []
    visual = bidi_visual(text)
    if visual is not None:
        out.append(Reading("rtl-override", visual))
    out += hex_readings(text) + binary_readings(text) + escape_readings(text)
    morse = morse_reading(text)
    if morse is not None:
        out.append(morse)
    # ciphers and reversal apply to the text, or to what a byte decoder found in it
    for candidate in [r.text for r in out] or [text]:
        if candidate.isascii() or sum(c.isascii() for c in candidate) > 0.9 * len(candidate):
            share, n = word_share(candidate)
            if n >= MIN_WORDS and share < 1.0 - WORD_SHARE_MARGIN:
                out += substitution_readings(candidate, share) + reversed_readings(candidate, share)
    seen, unique = {text}, []
    for r in out:
        if r.text not in seen:
            seen.add(r.text)
            unique.append(r)
    return unique


def needs_decoding(text: str) -> bool:
    """Cheap test: could `decoded_readings` return anything for this (ASCII) text?"""
    if _HEX_SPAN.search(text) or _BIN_SPAN.search(text) or _URL_ESC.search(text) or _HTML_ENT.search(text):
        return True
    if _MORSE.match(text.strip() or "x") and len(text.strip()) >= 8:
        return True
    share, n = word_share(text)
    return n >= MIN_WORDS and share < 1.0 - WORD_SHARE_MARGIN
