"""Personal data in training rows: find it, and redact it with a placeholder or quarantine the row.

    found = find_pii(text)                  # [(kind, span, text)], kinds below
    text, kinds = redact(text)              # "[EMAIL]", "[PHONE]", ... in place of each

Kinds: `email`, `phone` (Google's libphonenumber via the `phonenumbers` package: numbers in
international form, or national numbers of the regions roleplay data mostly comes from), `card`
(payment card numbers that pass the Luhn check, `python-stdnum`), `iban` (`python-stdnum`),
`address` (a house number and a street word), `handle` (an @handle). A model trained on chat
logs would otherwise learn, and repeat, whoever's number was in them.
"""

from __future__ import annotations

import re
from functools import lru_cache

KINDS = ("email", "phone", "card", "iban", "address", "handle")
PLACEHOLDERS = {k: f"[{k.upper()}]" for k in KINDS}
# National-format numbers are looked for as if from these regions (international "+.." numbers always).
PHONE_REGIONS = ("US", "GB", "DE", "FR", "ES", "IT", "BR", "IN", "AU", "CA")

_EMAIL = re.compile(r"(?<![\w.+-])[\w.+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,24}\b")
_HANDLE = re.compile(r"(?<![\w@./])@[A-Za-z0-9_][A-Za-z0-9_.]{2,29}(?<!\.)\b")
_CARD = re.compile(r"(?<!\d)(?:\d[ -]?){12,18}\d(?!\d)")
_IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?:[ ]?[A-Z0-9]{4}){2,7}(?:[ ]?[A-Z0-9]{1,4})?\b")
_STREET = (r"street|st|avenue|ave|road|rd|lane|ln|boulevard|blvd|drive|dr|court|ct|way|place|pl|terrace|crescent|close"
           r"|straße|strasse|str|weg|allee|platz|rue|avenida|calle|via|rua|ulica|laan|straat")
_ADDRESS = re.compile(
    rf"\b\d{{1,5}}[a-z]?,?\s+(?:[A-Z][\w'’.-]*\s+){{0,3}}(?:{_STREET})\b\.?"
    rf"|\b(?:{_STREET})\s+[A-Z][\w'’-]+\s+\d{{1,5}}[a-z]?\b",
    re.IGNORECASE,
)


def _luhn_card(digits: str) -> bool:
    from stdnum import luhn

    return 13 <= len(digits) <= 19 and luhn.is_valid(digits)


@lru_cache(maxsize=1)
def _phonenumbers():
    import phonenumbers

    return phonenumbers


def _phones(text: str) -> list[tuple[int, int]]:
    if not re.search(r"\d[\d\s().-]{6,}\d", text):
        return []
    pn = _phonenumbers()
    spans: list[tuple[int, int]] = []
    for region in PHONE_REGIONS:
        for match in pn.PhoneNumberMatcher(text, region, leniency=pn.Leniency.VALID):
            span = (match.start, match.end)
            if not any(a <= span[0] < b for a, b in spans):
                spans.append(span)
    return spans


_MAYBE = re.compile(r"@|\d")  # every kind needs a digit or an @


def find_pii(text: str) -> list[tuple[str, tuple[int, int], str]]:
    """Every piece of personal data in `text`: (kind, span, matched text), spans not overlapping."""
    if not _MAYBE.search(text):
        return []
    found: list[tuple[str, tuple[int, int]]] = []
    for m in _EMAIL.finditer(text):
        found.append(("email", m.span()))
    for m in _CARD.finditer(text):
        if _luhn_card(re.sub(r"\D", "", m.group(0))):
            found.append(("card", m.span()))
    for m in _IBAN.finditer(text):
        from stdnum import iban

        if iban.is_valid(m.group(0)):
            found.append(("iban", m.span()))
    for span in _phones(text):
        found.append(("phone", span))
    for m in _ADDRESS.finditer(text):
        found.append(("address", m.span()))
    for m in _HANDLE.finditer(text):
        found.append(("handle", m.span()))
    found.sort(key=lambda f: (f[1][0], -(f[1][1] - f[1][0])))
    out, end = [], -1
    for kind, (a, b) in found:
        if a >= end:
            out.append((kind, (a, b), text[a:b]))
            end = b
    return out


def redact(text: str) -> tuple[str, list[str]]:
    """`text` with every piece of personal data replaced by its placeholder, and the kinds replaced."""
    found = find_pii(text)
    if not found:
        return text, []
    parts, pos = [], 0
    for kind, (a, b), _ in found:
        parts += [text[pos:a], PLACEHOLDERS[kind]]
        pos = b
    parts.append(text[pos:])
    return "".join(parts), [k for k, _, _ in found]
