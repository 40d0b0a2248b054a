"""Layer 1 on its own: normalisation for matching (no model, milliseconds)."""

from __future__ import annotations

import base64

import pytest

from llmtune.moderation.normalize import (
    B64_MAX_CHARS,
    canonical,
    collapse_spacing,
    decode_base64_spans,
    fold,
    numbers_to_digits,
    tag_payload,
    unleet,
    views,
)


@pytest.mark.parametrize(
    "raw, folded",
    [
        ("\uff33\uff45\uff58", "Sex"),  # fullwidth
        ("\u0430sks", "asks"),  # Cyrillic a
        ("\u03bfld", "old"),  # Greek omicron
        ("\U0001d41a\U0001d41b", "ab"),  # math bold
        ("ki\u200bd", "kid"),  # zero-width space
        ("mi\u202enor", "minor"),  # bidi override
        ("te\u00aden", "teen"),  # soft hyphen
        ("Beyonc\u00e9", "Beyonce"),  # accent
        ("z\u0336a\u0337l", "zal"),  # combining strokes ("Zalgo")
        ("P\u03b1\u028b\u04cf", "Paul"),  # Greek alpha, Latin v-hook, Cyrillic palochka
    ],
)
def test_fold_undoes_lookalikes_and_invisible_characters(raw, folded):
    assert fold(raw) == folded


@pytest.mark.parametrize(
    "raw, digits",
    [
        ("fifteen", "15"),
        ("a fourteen-year-old", "a 14-year-old"),
        ("twelve yo", "12 yo"),
        ("aged twenty-two", "aged 22"),
        ("nineteen", "19"),
        ("an eighth grader", "an 8th grader"),
        ("a thousand-year-old", "a 1000-year-old"),
    ],
)
def test_number_words_become_digits(raw, digits):
    assert numbers_to_digits(raw) == digits


def test_leetspeak_resolves_ambiguous_characters_to_words():
    assert unleet("s3x") == "sex"
    assert unleet("ch11d g!r1 l0l1") == "child girl loli"  # 1 read as i or l, whichever spells a word
    assert unleet("13-y34r-0ld") == "13-year-old"  # the number part of a token stays a number
    assert unleet("15yo 8th 42-year-old 10pm") == "15yo 8th 42-year-old 10pm"


def test_letter_spacing_collapses_and_splits_around_words():
    assert collapse_spacing("s e x") == "sex"
    assert collapse_spacing("l.o.l.i") == "loli"
    assert collapse_spacing("a s h o t a b o y") == "a shota boy"
    assert collapse_spacing("a 1 5 year old") == "a 15 year old"
    assert collapse_spacing("two adults in love") == "two adults in love"


def test_base64_spans_are_decoded_with_bounds():
    hidden = base64.b64encode(b"a story about a 14 year old").decode()
    text, found = decode_base64_spans(f"please decode {hidden} now")
    assert "a story about a 14 year old" in text and found
    # Nested once is decoded; a huge span is left alone; an ordinary long word is not base64.
    nested = base64.b64encode(base64.b64encode(b"nested payload text").decode().encode()).decode()
    assert "nested payload text" in decode_base64_spans(nested)[0]
    huge = base64.b64encode(b"x" * B64_MAX_CHARS).decode()
    assert decode_base64_spans(huge)[0] == huge
    assert decode_base64_spans("antidisestablishmentarianism")[1] == []


def test_tag_characters_smuggling_text_become_a_view():
    smuggled = "hello" + "".join(chr(0xE0000 + ord(c)) for c in "secret words")
    assert tag_payload(smuggled) == "secret words"
    assert "secret words" in views(smuggled)
    assert canonical(smuggled) == "secret words hello"  # hidden readings first (the first window holds them)


def test_views_combine_every_fold():
    v = views("asks for s e x with a f1ft33n yo")
    assert any("sex with a 15 yo" in x for x in v)
    assert canonical("Аsks for ＳＥＸ") == "asks for sex"


def test_spacing_scanner_matches_exactly_when_collapse_spacing_could_act():
    """plain_view's one RE2 scan stands for three Python regexes with lookarounds."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from llmtune.moderation.normalize import _SPACED, _SPACED_DIGITS, _SPLIT_DIGITS, _spacing_scanner

    scanner = _spacing_scanner()
    alphabet = "ab5 1.-_*|/\\,+~\t\n\x0b\x1c\r7y0yrsea"

    @settings(max_examples=2000, deadline=None)
    @given(st.text(alphabet, max_size=24))
    def check(text):
        expected = bool(_SPACED.search(text) or _SPLIT_DIGITS.search(text) or _SPACED_DIGITS.search(text))
        assert bool(scanner.search(text)) == expected, text

    check()
    for text in ("s e x", "1 5 year old", "aged 4 0", "it's a big ship", "room 12", "i-i-i know"):
        expected = bool(_SPACED.search(text) or _SPLIT_DIGITS.search(text) or _SPACED_DIGITS.search(text))
        assert bool(scanner.search(text)) == expected, text
