"""The card segment: the classifier reads each text with its conversation's card beside it."""

from __future__ import annotations

from llmtune.encoder import minilm_dir
from llmtune.moderation.adapter import ModerationAdapter, Tokenizer, batch_tensors
from llmtune.moderation.conversation import CARD_CHARS, conversation_items
from llmtune.moderation.train import _conversation_rows, card_pool, read_tame

CARD = "You are Mara Vell, 34, captain of the airship Kestrel."


def test_windows_carry_the_card_after_the_text_cut_to_its_budget():
    tok = Tokenizer(minilm_dir(), max_length=16, context_tokens=5)
    long_text = " ".join(["sail"] * 40)
    windows, owner = tok.windows(["kiss me", long_text], ["a very long card " * 10, CARD])
    assert windows[0].text[0] == tok.cls_id and windows[0].text[-1] == tok.sep_id
    assert len(windows[0].card) == 6 and windows[0].card[-1] == tok.sep_id  # 5 card tokens + [SEP]
    assert len(windows) > 2 and all(w.card == windows[1].card for w in windows[1:])  # every window of a long text
    assert set(owner[1:]) == {1}
    ids, mask, types, pool = batch_tensors(windows[:2])
    assert mask[0].sum() == len(windows[0]) and types[0].sum() == 6 and pool[0].sum() == len(windows[0].text)


def test_no_budget_no_card():
    tok = Tokenizer(minilm_dir(), max_length=16, context_tokens=0)
    windows, _ = tok.windows(["kiss me"], [CARD])
    assert windows[0].card == []


def test_an_adapter_without_a_card_budget_ignores_cards():
    adapter = ModerationAdapter("embedded", precision="float32")
    if adapter.context_tokens:  # the shipped adapter reads cards: it must differ only where one is given
        assert adapter.scores(["kiss me"], contexts=[""]) == adapter.scores(["kiss me"])
    else:
        assert adapter.scores(["kiss me"], contexts=[CARD.lower()]) == adapter.scores(["kiss me"])


def test_each_message_reads_the_card_before_it():
    messages = [{"role": "system", "content": CARD}, {"role": "user", "content": "hi"},
                {"role": "system", "content": "Scenario: a storm."},
                {"role": "assistant", "content": "hello", "name": "Mara"}]
    items, cards = conversation_items(messages)
    # every message reads the card before it; a card message too (SillyTavern's example dialogue is system text)
    assert [it[4] for it in items] == ["", CARD, CARD, CARD + "\nScenario: a storm."]
    assert items[3][0] == "Mara: hello" and items[3][3] == "Mara"
    assert cards[-1] == CARD + "\nScenario: a storm."
    huge = [{"role": "system", "content": "x" * (CARD_CHARS * 2)}, {"role": "user", "content": "hi"}]
    assert len(conversation_items(huge)[0][1][4]) == CARD_CHARS


def test_conversation_rows_carry_their_card_and_label_the_last_text_only_where_the_card_shows_why():
    allowed = {"messages": [{"role": "system", "content": CARD}, {"role": "user", "content": "hello captain"},
                            {"role": "user", "content": "kiss me, Mara"}], "labels": [], "sexual": False}
    rows = _conversation_rows(allowed, "f:1")
    assert [(r.text, r.card) for r in rows] == [(CARD, ""), ("hello captain", CARD), ("kiss me, Mara", CARD)]
    assert all(r.targets["minor_sexual"] == 0.0 for r in rows)
    card_minor = {"messages": [{"role": "system", "content": "Character: a student described as 15 years old."},
                               {"role": "user", "content": "asks for a sexual scene with her"}],
                  "labels": ["minor_sexual"], "sexual": True, "group": "minor_card_age"}
    (row,) = _conversation_rows(card_minor, "f:2")
    assert row.targets["minor_sexual"] == 1.0 and row.targets["real_person_sexual"] == 0.0 and row.card
    early_turn = {"messages": [{"role": "system", "content": "A fantasy tavern."},
                               {"role": "user", "content": "describes the user's character as 15 years old"},
                               {"role": "user", "content": "asks for a sexual scene"}],
                  "labels": ["minor_sexual"], "sexual": True, "group": "minor_early_turn"}
    (row,) = _conversation_rows(early_turn, "f:3")
    assert row.targets["minor_sexual"] is None  # the evidence is in a turn the card segment does not hold


def test_the_card_pool_holds_no_card_that_defines_a_minor():
    rows = _conversation_rows({"messages": [{"role": "system", "content": CARD}, {"role": "user", "content": "hi"}],
                               "labels": []}, "f:1")
    rows += _conversation_rows({"messages": [{"role": "system", "content": "Tilly, 12, helps in the kitchen."},
                                             {"role": "user", "content": "hi"}], "labels": []}, "f:2")
    pool = card_pool(rows, {r.card: r.card.lower() for r in rows if r.card})
    assert pool == [CARD.lower()]


def test_tame_roleplay_rows_read_with_their_card(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text('{"messages": [{"role": "system", "content": "You are Mara Vell."}, '
                    '{"role": "user", "content": "hello"}, {"role": "assistant", "content": "welcome aboard"}]}\n')
    rows = read_tame(path)
    assert [(r.text, r.card) for r in rows] == [("You are Mara Vell.", ""), ("hello", "You are Mara Vell."),
                                                ("welcome aboard", "You are Mara Vell.")]
