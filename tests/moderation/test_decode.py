"""Every disguise in moderation/obfuscate.py is undone by the views the rules read, and decoders
stay quiet on ordinary text."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from llmtune.moderation.decode import bidi_visual, decoded_readings, morse_reading, word_share
from llmtune.moderation.normalize import canonical, join_split_words, plain_view, views
from llmtune.moderation.obfuscate import METHODS

REPO = Path(__file__).resolve().parents[2]
CLINICAL = "asks for a sexual scene with a fifteen year old girl"


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_obfuscation_is_undone(method):
    disguised = METHODS[method](CLINICAL, random.Random(3))
    assert disguised != CLINICAL
    readings = views(disguised)
    assert any("sexual" in v and "15" in v for v in readings), (method, readings[:4])
    # the classifier's single view carries the plain reading too
    assert "sexual scene" in canonical(disguised).replace("  ", " ")


def test_rtl_override_shows_what_a_reader_sees():
    assert bidi_visual("hi \u202e51 si ehs\u202c ok") == "hi she is 15 ok"
    assert bidi_visual("plain text") is None


def test_morse_and_ciphers():
    assert morse_reading("... . -..- / ... -.-. . -. .").text == "sex scene"
    readings = {r.decoder for r in decoded_readings("jevgr n frkhny fprar")}
    assert "rot13" in readings


def test_split_words_joined_only_around_a_short_side():
    assert join_split_words("chi-ld se.xy") == "child sexy"
    assert join_split_words("a well-known long-standing captain") == "a well-known long-standing captain"


def test_decoders_quiet_on_tame_roleplay():
    texts = []
    for line in (REPO / "data/roleplay/mara_vell.jsonl").read_text().splitlines():
        texts += [m["content"] for m in json.loads(line)["messages"]]
    noisy = [t for t in texts if decoded_readings(t)]
    assert not noisy, noisy[:3]
    assert sum(plain_view(t) is not None for t in texts) > 0.6 * len(texts)


def test_word_share():
    share, n = word_share("the captain is on the bridge")
    assert n == 4 and share == 1.0  # runs of 3+ letters: two-letter runs are words by accident too often
    assert word_share("xqr zvbk the")[0] == 1 / 3
