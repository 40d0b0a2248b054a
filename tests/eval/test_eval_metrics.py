"""Each roleplay metric on constructed inputs whose right answer is known."""

from __future__ import annotations

import pytest

from llmtune.eval import metrics as M

LOOP = "the wind the wind the wind the wind the wind the wind the wind the wind"
VARIED = "The Kestrel rides the northern wind while the crew hauls brass and sings of distant harbours."


def test_a_reply_that_never_stops_is_not_a_clean_stop():
    eot = 2
    assert M.clean_stop([5, 6, 7, eot], {eot}, max_new_tokens=8)
    assert not M.clean_stop([5, 6, 7, 8, 9, 10, 11, 12], {eot}, max_new_tokens=8)  # hit the limit
    assert not M.clean_stop([], {eot}, max_new_tokens=8)


def test_template_leaks_and_speaking_for_the_user():
    markers = ["<|im_start|>", "<|im_end|>"]
    assert M.leaks_template("Aye.<|im_end|>\n<|im_start|>user", markers)
    assert not M.leaks_template("Aye, deckhand.", markers)
    assert M.speaks_for_user("Aye, deckhand.\nUser: and then I say")
    assert M.speaks_for_user("Fine.\n  You: sure")
    assert not M.speaks_for_user("You could try the galley, deckhand.")


def test_a_looping_reply_has_low_distinct_n():
    assert M.distinct_n(LOOP, 2) < 0.2 < 0.9 < M.distinct_n(VARIED, 2)
    assert M.distinct_n(VARIED, 1) > M.distinct_n(LOOP, 1)
    assert M.distinct_n("", 2) == 1.0


def test_repeated_ngrams_across_consecutive_replies():
    same = ["we sail at dawn past the copper cliffs", "we sail at dawn past the copper cliffs"]
    assert M.repeated_ngram_rate(same, 4) == 1.0
    assert M.repeated_ngram_rate(["we sail at dawn today", "the stew is ready in the galley"], 4) == 0.0
    assert M.repeated_ngram_rate(["only one reply"], 4) == 0.0


def test_self_similarity_of_identical_and_orthogonal_batches():
    assert M.mean_pairwise_similarity([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]]) == pytest.approx(1.0)
    assert M.mean_pairwise_similarity([[1.0, 0.0], [0.0, 1.0]]) == pytest.approx(0.0)


def test_persona_adherence_margin_sign():
    personas = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    replies = [[0.9, 0.1, 0.0], [0.9, 0.1, 0.0]]
    margins = M.persona_adherence(replies, personas, own=[0, 1])
    assert margins[0] > 0 > margins[1]


@pytest.mark.slow
def test_persona_adherence_with_the_real_encoder():
    from llmtune.eval.embed import SentenceEncoder

    enc = SentenceEncoder()
    personas = ["You are Captain Mara Vell of the airship Kestrel; you talk about clouds, brass and the crew.",
                "You are Pip, a goblin tinkerer who loves gears, explosions and bad puns."]
    reply = "Clouds ahead, deckhand. Tighten the brass fittings, the Kestrel climbs at dawn with the whole crew."
    [margin] = M.persona_adherence(enc.encode([reply]), enc.encode(personas), own=[0])
    [wrong] = M.persona_adherence(enc.encode([reply]), enc.encode(personas), own=[1])
    assert margin > 0 > wrong


def test_grammatical_person():
    assert M.grammatical_person("I keep the Kestrel in the air, and my crew trusts me.") == "first"
    assert M.grammatical_person("Orin adjusts his spectacles and hums.", name="Orin Thistle") == "third"
    assert M.grammatical_person("The wind rises.") == "unknown"


@pytest.mark.parametrize("text", [
    "I'm sorry, but I can't help with that request.",
    "As an AI language model, I cannot write that.",
    "I cannot continue this roleplay.",
    "That goes against my guidelines.",
    "I must decline.",
])
def test_refusals_are_detected(text):
    assert M.is_refusal(text)


@pytest.mark.parametrize("text", [
    "No, deckhand, you can't have the captain's cabin.",
    "She refuses to dance with him, laughing.",
    "I won't let the storm take my ship!",
    "Sorry, the galley is closed for the night.",
])
def test_in_character_refusals_are_not_over_refusals(text):
    assert not M.is_refusal(text)


# ---------------------------------------------------------------------------------------------
# Slop


def test_slop_phrase_list_format():
    """The maintained list: lower case, single spaces, no patterns, no duplicates, sorted within each group."""
    raw = M.SLOP_PHRASES_FILE.read_text(encoding="utf-8")
    assert raw.endswith("\n") and "\t" not in raw
    phrases = M.read_slop_phrases()
    assert len(phrases) >= 40 and len(set(phrases)) == len(phrases)
    group: list[str] = []
    for line in raw.splitlines() + [""]:
        if not line.strip() or line.startswith("#"):
            assert group == sorted(group), f"keep each group sorted: {group}"
            group = []
            continue
        group.append(line)
        assert line == line.strip().lower() and "  " not in line, f"lower case, single spaces: {line!r}"
        assert not set(line) & set("()[]{}*+?|\\^$"), f"plain words, no patterns: {line!r}"
        assert len(M.words(line)) >= 2, f"one word is voice, not a stock phrase: {line!r}"
        assert M.slop_matches(line.upper()) == [line], f"{line!r} must match itself"


def test_slop_rate_counts_phrases_per_thousand_words():
    clean = "Due north, deckhand, along the copper cliffs. Keep your hat tied down."
    sloppy = "A shiver runs down my spine. Maybe, just maybe, the air is thick with wonder \u2014 a tapestry of dreams."
    assert M.slop_matches(clean) == []
    assert M.slop_matches(sloppy) == ["shiver runs down", "maybe, just maybe", "air is thick with", "tapestry of"]
    assert M.slop_per_1k_words([clean]) == 0.0
    n_words = len(M.words(clean)) + len(M.words(sloppy))
    assert M.slop_per_1k_words([clean, sloppy]) == pytest.approx(1000 * 4 / n_words)
    assert M.slop_matches("I can\u2019t help but feel AS AN AI") == ["as an ai"]  # curly quotes and case
    assert M.slop_matches("a tapestryof") == [] and M.slop_matches("as an aide") == []  # word boundaries
    assert M.slop_per_1k_words([]) == 0.0


def test_cross_reply_ngrams_find_a_models_own_stock_phrasing():
    varied = ["The wind turns north.", "Odile counts the biscuits again.", "Pell plays the fiddle badly."]
    assert M.cross_reply_ngram_rate(varied) == 0.0
    stock = [f"The wind picks up as {x}." for x in ("we climb", "you speak", "night falls")]
    # "the wind picks up" and "wind picks up as" are in all three replies: 2 of each reply's 4 4-grams.
    assert M.cross_reply_ngram_rate(stock) == pytest.approx(6 / 12)
    assert M.cross_reply_ngram_rate(stock, min_replies=4) == 0.0
    assert M.cross_reply_ngram_rate([]) == 0.0
