"""Preference data: every source shape becomes PreferenceExamples; prepare's guarantees hold for pairs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from llmtune.config import load_recipe
from llmtune.data.cards import load_card
from llmtune.data.pairs import read_preference_file, row_to_example
from llmtune.data.types import Message, PreferenceExample, Rejection
from tests.conftest import REPO, run_cli, tiny_recipe_dict, write_conversations

PREF = REPO / "data" / "preference"
SYSTEM = "You are Mara."
BLOCKED = "asks for a sexual scene with a 15-year-old"  # a request the floor refuses, described, never written


def write_rows(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def pair(user: str, chosen: str, rejected: str, system: str | None = SYSTEM, **extra) -> dict:
    prompt = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    return {"prompt": prompt, "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}], **extra}


def kto(user: str, completion: str, label: bool) -> dict:
    return {"prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}],
            "completion": [{"role": "assistant", "content": completion}], "label": label}


def parse(obj, kind="auto"):
    return row_to_example(obj, "f.jsonl", 1, json.dumps(obj), kind)


# ---------------------------------------------------------------------------------------------
# Row shapes


def test_trl_pair_and_review_page_shapes_become_one_type():
    explicit = parse(pair("Hi", "Aye, deckhand.", "Hello! How can I help you today?", review_id="r-17", judged_by="ops"))
    assert isinstance(explicit, PreferenceExample) and explicit.kind == "pair"
    assert explicit.prompt == [Message("system", SYSTEM), Message("user", "Hi")]
    assert (explicit.chosen, explicit.rejected) == ("Aye, deckhand.", "Hello! How can I help you today?")
    # TRL's standard (string) format, `messages` as the prompt, and the implicit prompt all agree.
    strings = parse({"prompt": "Hi", "chosen": "Aye.", "rejected": "Hello!"})
    assert strings.prompt == [Message("user", "Hi")] and strings.chosen == "Aye."
    messages = parse({"messages": [{"role": "user", "content": "Hi"}], "chosen": "Aye.", "rejected": "Hello!"})
    assert messages.prompt == strings.prompt
    implicit = parse({"chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Aye."}],
                      "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]})
    assert (implicit.prompt, implicit.chosen, implicit.rejected) == (strings.prompt, "Aye.", "Hello!")
    assert explicit.to_trl() == {k: v for k, v in pair("Hi", "Aye, deckhand.", "Hello! How can I help you today?").items()}


def test_kto_rows_keep_their_label():
    good, bad = parse(kto("Hi", "Aye, deckhand.", True)), parse(kto("Hi", "As an AI...", False))
    assert (good.kind, good.chosen, good.rejected) == ("desirable", "Aye, deckhand.", None)
    assert (bad.kind, bad.chosen, bad.rejected) == ("undesirable", None, "As an AI...")
    assert bad.to_trl()["label"] is False and bad.to_trl()["completion"] == [{"role": "assistant", "content": "As an AI..."}]


@pytest.mark.parametrize("obj, kind, reason", [
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Aye."}]}, "auto", "unknown_format"),
    (pair("Hi", "Aye.", "Hello!"), "kto", "unknown_format"),
    ({"prompt": "Hi", "chosen": "Aye."}, "auto", "bad_pair"),
    ({"prompt": "Hi", "chosen": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}],
      "rejected": "c"}, "auto", "bad_pair"),
    ({"prompt": "Hi", "chosen": " Aye. ", "rejected": "Aye."}, "auto", "same_reply"),
    ({"prompt": "Hi", "completion": "Aye.", "label": "yes"}, "auto", "bad_kto_row"),
    ({"prompt": [], "chosen": "Aye.", "rejected": "Hello!"}, "auto", "empty_prompt"),
    ({"prompt": [{"role": "narrator", "content": "x"}], "chosen": "a", "rejected": "b"}, "auto", "unknown_role"),
    ({"prompt": "Hi", "chosen": "", "rejected": "b"}, "auto", "empty_content"),
    (["not", "an", "object"], "auto", "not_an_object"),
])
def test_bad_rows_are_rejected_with_a_reason(obj, kind, reason):
    got = parse(obj, kind)
    assert isinstance(got, Rejection) and got.reason == reason, got
    assert got.source == "f.jsonl" and got.line == 1 and got.detail


def test_sillytavern_swipes_are_pairs_against_the_kept_message():
    path = PREF / "mara_vell_sillytavern.jsonl"
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    got = list(read_preference_file(path, system="SYS"))
    assert all(isinstance(g, PreferenceExample) for g in got)
    expected = [(n, s) for n, row in enumerate(lines, start=1) if "swipes" in row
                for j, s in enumerate(row["swipes"]) if j != row["swipe_id"]]
    assert [(g.line, g.rejected) for g in got] == expected and len(got) == 9
    hidden = next(row["mes"] for row in lines if row.get("is_system"))
    for g in got:
        row = lines[g.line - 1]
        assert g.chosen == row["mes"] == row["swipes"][row["swipe_id"]]
        assert g.prompt[0] == Message("system", "SYS")
        # The prompt is the chat up to that message: every earlier visible message, in order, nothing after.
        earlier = [r["mes"] for r in lines[1: g.line - 1] if "mes" in r and not r.get("is_system")]
        assert [m.content for m in g.prompt[1:]] == earlier
        assert hidden not in [m.content for m in g.prompt]
    assert {g.prompt[-1].role for g in got[1:]} == {"user"}


def test_sillytavern_edge_cases(tmp_path):
    header = {"user_name": "Wren", "character_name": "Orin"}
    msg = lambda mes, **kw: {"name": "Orin", "is_user": False, "mes": mes, **kw}  # noqa: E731
    user = {"name": "Wren", "is_user": True, "mes": "Hello"}
    path = write_rows(tmp_path / "chat.jsonl", [
        header,
        msg("Greetings.", swipes=["Greetings.", "Hi there!"], swipe_id=0),  # a greeting: no prompt without a system turn
        user,
        msg("Orin waves.", swipes=["Orin waves.", "Orin waves.", "  "], swipe_id=1),  # only copies and blanks: no pair
        user,
        msg("Orin nods.", swipes="Orin nods.", swipe_id=0),  # broken swipes
        user,
        msg("Orin bows.", swipes=["A", "Orin bows.", "B"], swipe_id=1),
    ])
    got = list(read_preference_file(path))
    assert [(type(g).__name__, g.line) for g in got] == [("Rejection", 2), ("Rejection", 6), ("PreferenceExample", 8),
                                                          ("PreferenceExample", 8)]
    assert [g.reason for g in got[:2]] == ["empty_prompt", "bad_swipes"]
    assert [g.rejected for g in got[2:]] == ["A", "B"]
    # A card gives every prompt its system turn, the greeting's too.
    carded = list(read_preference_file(path, card=load_card(REPO / "data" / "roleplay" / "card_orin.json")))
    assert isinstance(carded[0], PreferenceExample) and carded[0].prompt[0].role == "system"
    assert "Orin Thistle" in carded[0].prompt[0].content and carded[0].chosen == "Greetings."


# ---------------------------------------------------------------------------------------------
# prepare: counts, dedup, screen, template, masks, truncation, split


def pref_recipe(tmp_path, sources: list[dict], **preference) -> Path:
    chats = write_conversations(tmp_path / "chats.jsonl", [[("user", f"Say {i}"), ("assistant", f"{i}, deckhand.")] for i in range(6)])
    doc = tiny_recipe_dict(tmp_path, chats)
    doc["preference"] = {"method": "dpo", "sources": [{"license": "CC0-1.0", **s} for s in sources], **preference}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def prepared(path: Path, *overrides: str):
    from llmtune.data.prepare import prepare
    from llmtune.artifacts import PreparedPreference

    recipe = load_recipe(path, list(overrides))
    prepare(recipe)
    return recipe, PreparedPreference.load(recipe.run_dir)


def quarantined(p) -> list[dict]:
    return [json.loads(line) for line in p.quarantine.read_text().splitlines()]


@pytest.mark.slow
def test_counts_reconcile_and_every_reason_lands_in_quarantine(tmp_path):
    rows = [pair(f"Question {i}?", f"Answer {i}, deckhand.", f"As an AI, answer {i}.") for i in range(6)]
    rows += [rows[0], "{not json", {"prompt": "Hi", "chosen": "Aye."}, kto("Hi", "Aye.", True)]
    src = write_rows(tmp_path / "pairs.jsonl", rows)
    recipe, p = prepared(pref_recipe(tmp_path, [{"path": str(src)}]))
    c = p.counts
    assert (c.read, c.kept, c.duplicates, c.quarantined) == (10, 6, 1, 3)
    assert c.read == c.kept + c.quarantined + c.duplicates and c.pairs == 6
    assert sorted(r["reason"] for r in quarantined(p)) == ["bad_json", "bad_pair", "unpaired"]
    assert {(r["line"], r["reason"]) for r in quarantined(p)} == {(8, "bad_json"), (9, "bad_pair"), (10, "unpaired")}
    dup = json.loads((p.data_dir / "duplicates.jsonl").read_text())
    assert dup["line"] == 7 and dup["duplicate_of"].endswith("pairs.jsonl:1") and dup["kind"] == "exact"
    train = [json.loads(line) for line in p.train_jsonl.read_text().splitlines()]
    assert set(train[0]) == {"prompt", "chosen", "rejected", "source", "line"}  # TRL's conversational format
    assert "## Preference data" in (recipe.run_dir / "data" / "data_report.md").read_text()


@pytest.mark.slow
def test_tokens_follow_the_template_and_the_sft_masks(tmp_path, tiny_tokenizer):
    from datasets import load_from_disk

    src = write_rows(tmp_path / "pairs.jsonl", [pair(f"Q{i}", f"Aye {i}.", f"Hello {i}!") for i in range(4)])
    recipe, p = prepared(pref_recipe(tmp_path, [{"path": str(src)}], val_fraction=0.0))
    ds = load_from_disk(str(p.train_tokenized))
    assert set(ds.column_names) == {"prompt_ids", "chosen_ids", "rejected_ids", "length"}
    for row, example in zip(ds, [json.loads(line) for line in p.train_jsonl.read_text().splitlines()]):
        prompt = tiny_tokenizer.apply_chat_template(example["prompt"], add_generation_prompt=True, tokenize=False)
        assert tiny_tokenizer.decode(row["prompt_ids"]) == prompt
        # The reply and the end-of-turn token are trained; the newline the template writes after it is not.
        assert tiny_tokenizer.decode(row["chosen_ids"]) == example["chosen"][0]["content"] + "<|im_end|>"
        assert tiny_tokenizer.decode(row["rejected_ids"]) == example["rejected"][0]["content"] + "<|im_end|>"
        assert row["length"] == len(row["prompt_ids"]) + max(len(row["chosen_ids"]), len(row["rejected_ids"]))


@pytest.mark.slow
def test_long_prompts_lose_their_oldest_exchanges_at_turn_boundaries(tmp_path, tiny_tokenizer):
    from datasets import load_from_disk

    history = [{"role": r, "content": f"{r} turn {i} " + "word " * 20} for i in range(6) for r in ("user", "assistant")]
    long_row = {"prompt": [{"role": "system", "content": SYSTEM}, *history, {"role": "user", "content": "Last question?"}],
                "chosen": "Aye.", "rejected": "Hello there!"}
    hopeless = {"prompt": [{"role": "user", "content": "word " * 400}], "chosen": "Aye.", "rejected": "Hello!"}
    src = write_rows(tmp_path / "pairs.jsonl", [long_row, hopeless])
    recipe, p = prepared(pref_recipe(tmp_path, [{"path": str(src)}], val_fraction=0.0), "data.max_seq_length=128")
    assert p.counts.truncated == 1 and [r["reason"] for r in quarantined(p)] == ["too_long"]
    kept = json.loads(p.train_jsonl.read_text())
    assert kept["prompt"][0] == {"role": "system", "content": SYSTEM}  # the system prompt stays
    assert kept["prompt"][1]["role"] == "user" and kept["prompt"][-1]["content"] == "Last question?"
    assert len(kept["prompt"]) < len(long_row["prompt"])
    row = load_from_disk(str(p.train_tokenized))[0]
    assert row["length"] <= 128


@pytest.mark.slow
def test_near_duplicates_need_both_sides_and_swipes_of_one_message_are_not_duplicates(tmp_path):
    base = pair("Where are we headed, Captain?", "North past the copper cliffs, deckhand, then east with the wind.",
                "Our heading is a tapestry of dreams and destiny, maybe, just maybe.")
    near = pair("Where are we headed, Captain?", "North past the copper cliffs, deckhand, then east with the wind!",
                "Our heading is a tapestry of dreams and destiny, maybe, just maybe!")
    other_swipe = pair("Where are we headed, Captain?", base["chosen"][0]["content"],
                       "As an AI language model I cannot fly an airship, but I can help you plan a trip.")
    src = write_rows(tmp_path / "pairs.jsonl", [base, near, other_swipe])
    recipe, p = prepared(pref_recipe(tmp_path, [{"path": str(src)}]))
    assert (p.counts.kept, p.counts.duplicates) == (2, 1)
    assert json.loads((p.data_dir / "duplicates.jsonl").read_text())["kind"] == "near"
    # The two pairs of one kept message land in the same split.
    splits = {s: [json.loads(line)["line"] for line in (p.data_dir / f"{s}.jsonl").read_text().splitlines()] for s in ("train", "val")}
    assert sorted(splits["train"] + splits["val"]) == [1, 3] and (not splits["train"] or not splits["val"])


@pytest.mark.slow
def test_screen_quarantines_blocked_chosen_and_drops_blocked_rejected(tmp_path):
    rows = [pair("Tell me a story.", "Once, on the Kestrel...", "Hello!"),
            pair("Tell me another.", BLOCKED, "No."),  # the chosen side is blocked: the pair goes
            pair("And one more.", "The wind rose, deckhand.", BLOCKED)]  # the rejected side is blocked: it goes
    src = write_rows(tmp_path / "pairs.jsonl", rows)
    recipe, p = prepared(pref_recipe(tmp_path, [{"path": str(src)}]))
    assert p.counts.moderation == {"minor_sexual": 1} and p.counts.rejected_blocked == {"minor_sexual": 1}
    reasons = {r["line"]: r for r in quarantined(p)}
    assert reasons[2]["reason"] == "moderation:minor_sexual" and "chosen" in reasons[2]["detail"]
    # DPO cannot train on what is left of pair 3 (one reply): quarantined as unpaired, saying why.
    assert reasons[3]["reason"] == "unpaired" and "blocked by moderation" in reasons[3]["detail"]
    assert p.counts.kept == 1 and p.counts.read == p.counts.kept + p.counts.quarantined
    kept_text = p.train_jsonl.read_text() + p.val_jsonl.read_text()
    assert "15-year-old" not in kept_text

    # KTO keeps the chosen reply of pair 3 as a desirable row, and trains pairs as two rows each.
    recipe, p = prepared(pref_recipe(tmp_path, [{"path": str(src)}], method="kto", val_fraction=0.0))
    assert (p.counts.pairs, p.counts.desirable, p.counts.train_rows) == (1, 1, 3)
    from datasets import load_from_disk

    ds = load_from_disk(str(p.train_tokenized))
    assert set(ds.column_names) == {"prompt_ids", "completion_ids", "label", "length"}
    assert sorted(ds["label"]) == [False, True, True]


@pytest.mark.slow
def test_shipped_demo_sources(tmp_path):
    system = "You are Captain Mara Vell."
    recipe, p = prepared(pref_recipe(tmp_path, [{"path": str(PREF / "mara_vell_pairs.jsonl")},
                                                {"path": str(PREF / "mara_vell_sillytavern.jsonl"), "system": system},
                                                {"path": str(PREF / "mara_vell_kto.jsonl")}], method="kto"))
    c = p.counts
    assert (c.read, c.quarantined, c.duplicates) == (57, 0, 0)
    assert (c.pairs, c.desirable, c.undesirable) == (49, 5, 3)
    assert [s.formats for s in p.sources] == [{"pair": 40}, {"sillytavern": 9}, {"kto": 8}]


@pytest.mark.slow
def test_data_inspect_reports_pairs(tmp_path):
    res = run_cli("data", "inspect", str(PREF / "mara_vell_pairs.jsonl"), str(PREF / "mara_vell_sillytavern.jsonl"), "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["pairs"] == 40 + 8  # the greeting's swipe has no prompt without a system turn
    assert out["preference"]["reasons"] == {"empty_prompt": 1}
    assert {"read", "kept", "quarantined", "duplicates", "formats", "reasons"} <= set(out)  # today's counts stay


def test_recipe_validation_of_the_preference_section(tmp_path):
    from llmtune.errors import RecipeError

    path = pref_recipe(tmp_path, [{"path": "x.jsonl"}])
    with pytest.raises(RecipeError, match="did you mean `method`"):
        load_recipe(path, ["preference.methd=dpo"])
    with pytest.raises(RecipeError, match="preference.method"):
        load_recipe(path, ["preference.method=ppo"])
    doc = yaml.safe_load(path.read_text())
    del doc["preference"]
    doc["stages"] = ["prepare", "train", "preference"]
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(RecipeError, match="needs a `preference:` section"):
        load_recipe(path)
