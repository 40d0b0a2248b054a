"""Ways people disguise text, as functions: the classifier trains on them (through `canonical`,
as screening reads them) and the tests check that every one is undone.

    obfuscate(text, rng)            # one random method
    METHODS["rot13"](text)          # a named one
"""

from __future__ import annotations

import base64
import codecs
import random
from collections.abc import Callable

_LEET = {"a": "4", "e": "3", "i": "1", "o": "0", "s": "5", "t": "7", "l": "1", "g": "9", "b": "8"}
_CYRILLIC = {"a": "а", "e": "е", "o": "о", "p": "р", "c": "с", "x": "х", "y": "у", "i": "і", "s": "ѕ", "j": "ј", "h": "һ"}
_GREEK = {"a": "α", "e": "ε", "o": "ο", "p": "ρ", "i": "ι", "k": "κ", "n": "η", "t": "τ", "u": "υ", "v": "ν", "x": "χ", "w": "ω"}
_SMALL_CAPS = dict(zip("abcdefghijklmnopqrstuvwxyz", "ᴀʙᴄᴅᴇꜰɢʜɪᴊᴋʟᴍɴᴏᴘǫʀꜱᴛᴜᴠᴡxʏᴢ"))
_ZW = "\u200b"
RLO, PDF = "\u202e", "\u202c"


def _map(table: dict[str, str], text: str, rate: float, rng: random.Random) -> str:
    return "".join(table.get(c.lower(), c) if c.lower() in table and rng.random() < rate else c for c in text)


def _words(text: str, fn: Callable[[str], str], rng: random.Random, share: float = 0.5) -> str:
    return " ".join(fn(w) if len(w) > 2 and rng.random() < share else w for w in text.split(" "))


METHODS: dict[str, Callable[[str, random.Random], str]] = {
    "leet": lambda t, r: _map(_LEET, t, 0.6, r),
    "cyrillic": lambda t, r: _map(_CYRILLIC, t, 0.7, r),
    "greek": lambda t, r: _map(_GREEK, t, 0.7, r),
    "small_caps": lambda t, r: _map(_SMALL_CAPS, t, 1.0, r),
    "spaced": lambda t, r: _words(t, lambda w: " ".join(w), r, 0.4),
    "dotted": lambda t, r: _words(t, lambda w: ".".join(w), r, 0.4),
    "hyphen_split": lambda t, r: _words(t, lambda w: w[: len(w) // 2] + "-" + w[len(w) // 2:], r, 0.5),
    "zero_width": lambda t, r: _words(t, lambda w: _ZW.join(w), r, 0.6),
    "fullwidth": lambda t, r: "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in t),
    "combining": lambda t, r: "".join(c + "\u0301" if c.isalpha() and r.random() < 0.5 else c for c in t),
    "rot13": lambda t, r: codecs.encode(t, "rot13"),
    "reversed": lambda t, r: t[::-1],
    "rtl_override": lambda t, r: RLO + t[::-1] + PDF,
    "hex": lambda t, r: t.encode("utf-8").hex(" "),
    "base64": lambda t, r: base64.b64encode(t.encode("utf-8")).decode("ascii"),
    "url": lambda t, r: "".join(f"%{ord(c):02X}" if c.isascii() and c.isalpha() and r.random() < 0.5 else c for c in t),
}


def obfuscate(text: str, rng: random.Random, method: str | None = None) -> str:
    """`text` disguised by one method (random unless named)."""
    name = method or rng.choice(sorted(METHODS))
    return METHODS[name](text, rng)
