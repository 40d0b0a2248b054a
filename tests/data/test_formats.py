"""Input formats: every format becomes one Conversation type; every bad row a Rejection with a reason."""

from __future__ import annotations

import base64
import json
import struct
import zlib
from pathlib import Path

import pytest
from pydantic import ValidationError

from llmtune.config import DataSource
from llmtune.data.cards import (
    DEFAULT_SYSTEM_PROMPT,
    CharacterCard,
    card_json_from_png,
    card_system_prompt,
    encode_card_chunk,
    load_card,
    read_png_text_chunks,
    solid_png,
    split_example_blocks,
    substitute_placeholders,
)
from llmtune.data.cards import main as cards_main
from llmtune.data.formats import apply_source_quota, read_data_source, read_source
from llmtune.data.types import Conversation, Message, Rejection
from llmtune.errors import DataError
from tests.conftest import DATA

ORIN_JSON = DATA / "card_orin.json"
ORIN_PNG = DATA / "card_orin.png"
ORIN = json.loads(ORIN_JSON.read_text())
CREATOR_NOTES = ORIN["data"]["creator_notes"]


def read(path: Path, *args, **kwargs) -> tuple[list[Conversation], list[Rejection]]:
    items = list(read_source(path, *args, **kwargs))
    return [i for i in items if isinstance(i, Conversation)], [i for i in items if isinstance(i, Rejection)]


def only_rejection(path: Path, *args, **kwargs) -> Rejection:
    items = list(read_source(path, *args, **kwargs))
    assert len(items) == 1 and isinstance(items[0], Rejection), items
    return items[0]


def roles(conv: Conversation) -> list[str]:
    return [m.role for m in conv.messages]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def card_json(**data) -> dict:
    base = {"name": "Vee", "description": "{{char}} is a lighthouse keeper.", "first_mes": "Hello, {{user}}.",
            "mes_example": "<START>\n{{user}}: Hi\n{{char}}: Hello there."}
    return {"spec": "chara_card_v2", "spec_version": "2.0", "data": {**base, **data}}


def png_chunk(ctype: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + ctype + body + struct.pack(">I", zlib.crc32(ctype + body))


def png_with(*chunks: bytes) -> bytes:
    """A valid 1x1 PNG with extra chunks placed before the image data."""
    ihdr = png_chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0))
    idat = png_chunk(b"IDAT", zlib.compress(b"\x00\x00\x00\x00"))
    return b"\x89PNG\r\n\x1a\n" + ihdr + b"".join(chunks) + idat + png_chunk(b"IEND", b"")


def text_chunk(keyword: str, value: str) -> bytes:
    return png_chunk(b"tEXt", keyword.encode() + b"\0" + value.encode("latin-1"))


# ---------------------------------------------------------------------------------------------
# OpenAI / ShareGPT rows, role spellings


@pytest.mark.parametrize("spelling", ["human", "Human", "USER", "user", "prompter"])
def test_user_spellings(tmp_path, spelling):
    p = write_jsonl(tmp_path / "s.jsonl", [{"conversations": [{"from": spelling, "value": "hi"}, {"from": "gpt", "value": "yo"}]}])
    [conv], _ = read(p)
    assert roles(conv) == ["user", "assistant"]


@pytest.mark.parametrize("spelling", ["gpt", "assistant", "Assistant", "bot", "model", "char", "Character", "AI", "ai"])
def test_assistant_spellings(tmp_path, spelling):
    p = write_jsonl(tmp_path / "s.jsonl", [{"messages": [{"role": "SYSTEM", "content": "s"}, {"role": "user", "content": "hi"},
                                                         {"role": spelling, "content": "yo"}]}])
    [conv], _ = read(p)
    assert roles(conv) == ["system", "user", "assistant"]


def test_role_map_is_case_insensitive_and_consecutive_roles_stay_separate(tmp_path):
    p = write_jsonl(tmp_path / "s.jsonl", [{"conversations": [
        {"from": "Alice", "value": "one"}, {"from": "alice", "value": "two"}, {"from": "NARRATOR", "value": "three"}]}])
    [conv], _ = read(p, role_map={"ALICE": "user", "Narrator": "assistant"})
    assert [(m.role, m.content) for m in conv.messages] == [("user", "one"), ("user", "two"), ("assistant", "three")]


def test_openai_text_parts_and_sharegpt_top_level_system(tmp_path):
    p = write_jsonl(tmp_path / "x.jsonl", [
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                      {"role": "assistant", "content": "c"}]},
        {"system": "Be Vee.", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]},
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
                      {"role": "assistant", "content": "c"}]},
    ])
    (parts, sharegpt), [image] = read(p)
    assert parts.messages[0].content == "a\nb"
    assert sharegpt.messages[0] == Message("system", "Be Vee.")
    assert image.reason == "bad_message" and image.line == 3


# ---------------------------------------------------------------------------------------------
# Parquet and save_to_disk datasets


def test_parquet_rows_are_detected_per_row_with_row_numbers(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [
        json.dumps({"messages": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"}]}),
        json.dumps({"conversations": [{"from": "human", "value": "q2"}, {"from": "gpt", "value": "a2"}]}),
        json.dumps({"text": "no conversation here"}),
        json.dumps({"messages": [{"role": "user", "content": "q4"}, {"role": "assistant", "content": ""}]}),
    ]
    # One table, every column in every row (null where a row lacks it), as mixed exports come.
    table = pa.concat_tables([pa.Table.from_pylist([json.loads(r)]) for r in rows], promote_options="default")
    assert table.num_columns == 3
    pq.write_table(table, tmp_path / "chats.parquet")
    convs, rejections = read(tmp_path / "chats.parquet")
    assert [c.line for c in convs] == [1, 2]
    assert convs[1].messages[-1] == Message("assistant", "a2")
    assert [(r.line, r.reason) for r in rejections] == [(3, "unknown_format"), (4, "empty_content")]
    assert all(r.source.endswith("chats.parquet") for r in rejections)


def test_unreadable_parquet_is_one_rejection(tmp_path):
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet at all")
    rej = only_rejection(bad)
    assert (rej.reason, rej.line) == ("bad_parquet", 0)


def test_save_to_disk_dataset_and_dataset_dict(tmp_path):
    from datasets import Dataset, DatasetDict

    openai = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]} for i in range(3)]
    Dataset.from_list(openai).save_to_disk(str(tmp_path / "ds"))
    convs, rejections = read(tmp_path / "ds")
    assert not rejections and [c.line for c in convs] == [1, 2, 3]
    assert convs[2].messages[-1].content == "a2"

    sharegpt = [{"conversations": [{"from": "human", "value": "hi"}, {"from": "Narrator", "value": "yo"}]}]
    DatasetDict({"train": Dataset.from_list(openai), "extra": Dataset.from_list(sharegpt)}).save_to_disk(str(tmp_path / "dd"))
    convs, [rej] = read(tmp_path / "dd", "hf_dataset")
    assert len(convs) == 3 and {Path(c.source).name for c in convs} == {"train"}
    assert (Path(rej.source).name, rej.line, rej.reason) == ("extra", 1, "unknown_role")
    convs, rejections = read(tmp_path / "dd", role_map={"narrator": "assistant"})
    assert len(convs) == 4 and not rejections


def test_broken_saved_dataset_is_one_rejection(tmp_path):
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "dataset_info.json").write_text("{}")
    rej = only_rejection(tmp_path / "ds")
    assert (rej.reason, rej.line) == ("bad_dataset", 0)


def test_directory_of_chat_files(tmp_path):
    (tmp_path / "chats").mkdir()
    write_jsonl(tmp_path / "chats" / "a.jsonl", [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}])
    (tmp_path / "chats" / "b.jsonl").write_text((DATA / "orin_sillytavern.jsonl").read_text())
    (tmp_path / "chats" / "notes.txt").write_text("ignored: not a chat file")
    convs, rejections = read(tmp_path / "chats")
    assert not rejections and [Path(c.source).name for c in convs] == ["a.jsonl", "b.jsonl"]
    assert convs[1].meta["kind"] == "sillytavern"
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no .jsonl"):
        read(tmp_path / "empty")


# ---------------------------------------------------------------------------------------------
# Character cards: PNG chunks, system turn, placeholders, examples, greetings


def test_sample_png_carries_the_card_as_v2_and_v3():
    texts = read_png_text_chunks(ORIN_PNG.read_bytes(), str(ORIN_PNG))
    v2 = json.loads(base64.b64decode(texts["chara"]))
    v3 = json.loads(base64.b64decode(texts["ccv3"]))
    assert v2 == ORIN
    assert (v3["spec"], v3["spec_version"]) == ("chara_card_v3", "3.0")
    assert {k: v for k, v in v3["data"].items() if k != "group_only_greetings"} == ORIN["data"]
    assert load_card(ORIN_PNG).spec == "chara_card_v3"  # ccv3 preferred
    assert load_card(ORIN_PNG) == CharacterCard(**{**load_card(ORIN_JSON).__dict__, "spec": "chara_card_v3",
                                                    "source": str(ORIN_PNG)})


def test_sample_png_is_reproducible_with_the_embed_helper(tmp_path, capsys):
    out = tmp_path / "orin.png"
    assert cards_main(["--embed", str(ORIN_JSON), str(out)]) == 0
    assert read_png_text_chunks(out.read_bytes(), "new") == read_png_text_chunks(ORIN_PNG.read_bytes(), "committed")
    from PIL import Image

    with Image.open(out) as made, Image.open(ORIN_PNG) as committed:
        assert made.size == committed.size == (64, 64) and list(made.getdata()) == list(committed.getdata())
    assert cards_main(["--extract", str(ORIN_PNG)]) == 0
    assert json.loads(capsys.readouterr().out.split("\n", 1)[1])["spec"] == "chara_card_v3"


def test_ccv3_is_preferred_over_chara_and_v2_alone_works():
    v2 = card_json(name="Vee Two")
    v3 = {"spec": "chara_card_v3", "spec_version": "3.0", "data": {**card_json()["data"], "name": "Vee Three"}}
    both = solid_png([("chara", encode_card_chunk(v2)), ("ccv3", encode_card_chunk(v3))], size=2)
    assert card_json_from_png(both, "x")["data"]["name"] == "Vee Three"
    only_v2 = solid_png([("chara", encode_card_chunk(v2))], size=2)
    assert card_json_from_png(only_v2, "x")["data"]["name"] == "Vee Two"


def test_ztxt_and_itxt_card_chunks(tmp_path):
    value = encode_card_chunk(card_json(name="Zed")).encode()
    ztxt = png_chunk(b"zTXt", b"chara\0\0" + zlib.compress(value))
    (tmp_path / "z.png").write_bytes(png_with(ztxt))
    assert load_card(tmp_path / "z.png").name == "Zed"
    itxt = png_chunk(b"iTXt", b"ccv3\0\x01\0en\0\0" + zlib.compress(encode_card_chunk(card_json(name="Ida")).encode()))
    (tmp_path / "i.png").write_bytes(png_with(itxt))
    assert load_card(tmp_path / "i.png").name == "Ida"


def test_card_system_turn_contents():
    card = load_card(ORIN_JSON)
    system = card_system_prompt(card)
    # {{original}} in the card's system_prompt becomes the default instruction, then the card's line follows.
    default = substitute_placeholders(DEFAULT_SYSTEM_PROMPT, card.name, "User")
    assert system.startswith(default + "\nWrite Orin Thistle's replies in the third person")
    for part in ("round brass spectacles", "Orin Thistle's personality: Gentle, patient",
                 "Scenario: User has wandered into the Thistledown Library",
                 "Example dialogue 1:\nUser: Do you have any books about the stars?\nOrin Thistle: Orin's eyes light up",
                 "Example dialogue 2:\nUser: I'm not sure what I want to read."):
        assert part in system
    assert system.endswith("Stay in character as Orin Thistle, narrate in the third person, and keep replies warm and kind.")
    assert "{{" not in system and "<START>" not in system and "{{original}}" not in system


def test_card_system_prompt_replaces_or_defaults():
    card = CharacterCard(name="Vee", description="d")
    assert card_system_prompt(card).startswith("Write Vee's next reply in a fictional roleplay chat between Vee and User.")
    replaced = CharacterCard(name="Vee", system_prompt="Only this, {{user}}.", description="d")
    assert card_system_prompt(replaced, "Sam") == "Only this, Sam.\n\nd"
    with_original = CharacterCard(name="Vee", system_prompt="Before. {{ORIGINAL}} After.")
    assert card_system_prompt(with_original) == f"Before. {substitute_placeholders(DEFAULT_SYSTEM_PROMPT, 'Vee', 'User')} After."


def test_placeholders_are_substituted_in_any_case():
    text = "{{char}} {{Char}} {{CHAR}} <BOT> <bot> {{ char }} | {{user}} {{User}} <USER> <user>"
    assert substitute_placeholders(text, "Vee", "Sam") == "Vee Vee Vee Vee Vee Vee | Sam Sam Sam Sam"


def test_user_name_is_configurable_through_the_source(tmp_path):
    src = DataSource(path=str(DATA / "orin_chats.jsonl"), card=str(ORIN_PNG), user_name="Juniper")
    convs = [c for c in read_data_source(src) if isinstance(c, Conversation)]
    assert "Juniper has wandered into the Thistledown Library" in convs[0].messages[0].content
    assert "welcome to the Thistledown Library, Juniper." in convs[0].messages[1].content


def test_creator_notes_never_reach_any_prompt(tmp_path):
    assert not hasattr(load_card(ORIN_JSON), "creator_notes")
    card = tmp_path / "card.json"
    card.write_text(json.dumps(card_json(creator_notes="SECRET-NOTES", creator_notes_multilingual={"en": "SECRET-NOTES"})))
    sources = [
        DataSource(card=str(ORIN_PNG), greeting="all"),
        DataSource(card=str(ORIN_JSON)),
        DataSource(path=str(DATA / "orin_chats.jsonl"), card=str(ORIN_PNG)),
        DataSource(path=str(DATA / "orin_sillytavern.jsonl"), card=str(ORIN_JSON), greeting="all"),
        DataSource(card=str(card), greeting="all"),
        DataSource(path=str(DATA / "orin_chats.jsonl"), card=str(card)),
    ]
    convs = [c for s in sources for c in read_data_source(s) if isinstance(c, Conversation)]
    assert len(convs) > 20
    for conv in convs:
        for m in conv.messages:
            assert CREATOR_NOTES not in m.content and "SECRET-NOTES" not in m.content
            assert "Not for prompts" not in m.content


def test_mes_example_split_and_each_block_is_a_conversation(tmp_path):
    assert split_example_blocks("<START>\na\n<start>\n\n<START>\nb") == ["a", "b"]
    card = tmp_path / "card.json"
    card.write_text(json.dumps(card_json(mes_example=(
        "<START>\n{{user}}: Hi\n{{char}}: Hello.\nStill Vee talking.\n{{user}}: Bye\n<BOT>: Farewell."
        "<START>\n<USER>: What is this?\nVee: A lamp."
        "<START>\n{{char}}: I talk alone."
        "<START>\nSome narration first.\n{{user}}: hi\n{{char}}: hey"))))
    convs, rejections = read(card)
    assert [c.line for c in convs] == [1, 2] and [r.line for r in rejections] == [3, 4]
    assert {r.reason for r in rejections} == {"bad_example"}
    first, second = convs
    assert [(m.role, m.content) for m in first.messages[1:]] == [
        ("user", "Hi"), ("assistant", "Hello.\nStill Vee talking."), ("user", "Bye"), ("assistant", "Farewell.")]
    assert [(m.role, m.content) for m in second.messages[1:]] == [("user", "What is this?"), ("assistant", "A lamp.")]
    # The block being trained on is left out of its own system turn; the others stay as examples.
    assert "Farewell" not in first.messages[0].content and "A lamp." in first.messages[0].content
    assert "A lamp." not in second.messages[0].content and "Farewell" in second.messages[0].content
    assert first.meta == {"card": "Vee", "kind": "example", "example": 1, "format": "card"}


def test_card_alone_greeting_first_or_all():
    first, _ = read(ORIN_PNG)
    assert [c.meta["kind"] for c in first] == ["example", "example"]
    assert all(roles(c) == ["system", "user", "assistant"] for c in first)
    every, _ = read(ORIN_PNG, greeting="all")
    greetings = [c for c in every if c.meta["kind"] == "greeting"]
    assert len(greetings) == 3 and all(roles(c) == ["system", "assistant"] for c in greetings)
    assert greetings[0].messages[1].content.startswith("Orin Thistle looks up from a tall stack of ledgers")
    assert "{{user}}" not in greetings[0].messages[1].content and "User." in greetings[0].messages[1].content
    assert [c.line for c in every] == [1, 2, 3, 4, 5]


def test_card_with_chat_logs(tmp_path):
    convs, rejections = read(DATA / "orin_chats.jsonl", card=ORIN_PNG)
    assert len(convs) == 10 and not rejections
    system = card_system_prompt(load_card(ORIN_PNG))
    for conv in convs:
        assert conv.messages[0] == Message("system", system)
        assert conv.messages[1].role == "assistant" and conv.messages[1].content.startswith("Orin Thistle looks up")
        assert conv.messages[2].role == "user" and conv.meta["card"] == "Orin Thistle"
    logs = write_jsonl(tmp_path / "logs.jsonl", [
        {"messages": [{"role": "system", "content": "old prompt"}, {"role": "user", "content": "hi"},
                      {"role": "assistant", "content": "hello"}]},
        {"messages": [{"role": "assistant", "content": "Orin waves from the ladder."}, {"role": "user", "content": "hi"},
                      {"role": "assistant", "content": "hello"}]},
    ])
    (replaced, opened), _ = read(logs, card=ORIN_JSON)
    assert roles(replaced) == ["system", "assistant", "user", "assistant"]
    assert replaced.meta["replaced_system"] == ["old prompt"] and "old prompt" not in replaced.messages[0].content
    assert [m.content for m in opened.messages[1:2]] == ["Orin waves from the ladder."]  # no greeting stacked on top


def test_unreadable_card_with_logs_stops_with_what_and_where(tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(solid_png([("Software", "paint")], size=2))
    with pytest.raises(DataError, match=r"broken\.png.*card_no_chunk.*remove `card:`"):
        read(DATA / "orin_chats.jsonl", card=broken)
    with pytest.raises(DataError, match="card not found"):
        list(read_data_source(DataSource(path=str(DATA / "orin_chats.jsonl"), card=str(tmp_path / "nope.png"))))


def write_card_png(path: Path, *chunks: bytes) -> Path:
    path.write_bytes(png_with(*chunks))
    return path


@pytest.mark.parametrize(("name", "make", "reason"), [
    ("bad_base64.png", lambda p: write_card_png(p, text_chunk("chara", "not*base64!")), "card_bad_base64"),
    ("no_chunk.png", lambda p: write_card_png(p, text_chunk("Software", "paint")), "card_no_chunk"),
    ("not_json.png", lambda p: write_card_png(p, text_chunk("ccv3", base64.b64encode(b"{oops").decode())), "card_bad_json"),
    ("not_a_png.png", lambda p: p.write_bytes(b"GIF89a...."), "card_bad_png"),
    ("bad_crc.png", lambda p: p.write_bytes(png_with(text_chunk("chara", "eA==")).replace(b"chara\0eA==", b"chara\0eB==")),
     "card_bad_png"),
    ("truncated.png", lambda p: p.write_bytes(png_with(text_chunk("chara", encode_card_chunk(card_json())))[:60]),
     "card_bad_png"),
    ("no_data.json", lambda p: p.write_text(json.dumps({"spec": "chara_card_v2", "spec_version": "2.0", "name": "X"})),
     "card_missing_data"),
    ("v3_no_data.json", lambda p: p.write_text(json.dumps({"spec": "chara_card_v3", "data": "X"})), "card_missing_data"),
    ("unknown_spec.json", lambda p: p.write_text(json.dumps({"spec": "chara_card_v9", "data": {}})), "card_unknown_spec"),
    ("no_name.json", lambda p: p.write_text(json.dumps(card_json(name=" "))), "card_missing_name"),
    ("bad_field.json", lambda p: p.write_text(json.dumps(card_json(description=["a"]))), "card_bad_field"),
    ("bad_greetings.json", lambda p: p.write_text(json.dumps(card_json(alternate_greetings="hi"))), "card_bad_field"),
    ("nothing.json", lambda p: p.write_text(json.dumps(card_json(mes_example=""))), "card_nothing_to_train"),
    ("a_directory.png", lambda p: p.mkdir(), "card_unreadable"),
])
def test_card_rejections(tmp_path, name, make, reason):
    path = tmp_path / name
    make(path)
    rej = only_rejection(path, "card")
    assert (rej.reason, rej.line, rej.source) == (reason, 0, str(path))
    assert rej.detail


def test_broken_card_json_file_is_a_rejection(tmp_path):
    p = tmp_path / "card.json"
    p.write_text("{not json")
    assert only_rejection(p, "card").reason == "card_bad_json"


def test_v1_card_is_read(tmp_path):
    p = tmp_path / "v1.json"
    p.write_text(json.dumps(card_json()["data"]))  # V1: the same fields at top level, no spec
    convs, _ = read(p)
    assert len(convs) == 1 and "Vee is a lighthouse keeper." in convs[0].messages[0].content
    assert load_card(p).spec == "chara_card_v1"


# ---------------------------------------------------------------------------------------------
# PIPPA


def test_pippa_sample():
    convs, rejections = read(DATA / "pippa_sample.jsonl")
    assert len(convs) == 5 and not rejections
    brannoch = convs[0]
    system = brannoch.messages[0].content
    assert brannoch.messages[0].role == "system"
    assert "A broad-shouldered dwarven blacksmith" in system and "Brannoch is proud of his work" in system
    assert "User: Can you fix my lantern?" in system and "{{" not in system
    assert roles(brannoch) == ["system", "assistant", "user", "assistant", "user", "assistant"]
    assert brannoch.messages[1].content.startswith("The hammer stops mid-swing")  # greeting not doubled
    # Record 4 opens with the human; the bot's greeting is put first.
    ash = convs[3]
    assert roles(ash)[:3] == ["system", "assistant", "user"] and ash.messages[1].content.startswith("Verity Ash sets down")
    assert ash.meta == {"character": "Verity Ash", "kind": "pippa", "format": "pippa"}


@pytest.mark.parametrize(("row", "reason"), [
    ({"bot_name": "B", "bot_definitions": "d"}, "missing_messages"),
    ({"bot_name": "B", "conversation": []}, "empty_conversation"),
    ({"bot_definitions": "d", "conversation": [{"message": "hi", "is_human": False}]}, "missing_bot_name"),
    ({"bot_name": "B", "conversation": [{"message": "hi", "is_human": "yes"}]}, "bad_message"),
    ({"bot_name": "B", "conversation": [{"message": 3, "is_human": False}]}, "bad_message"),
    ({"bot_name": "B", "bot_description": 5, "conversation": [{"message": "hi", "is_human": False}]}, "bad_message"),
    ({"bot_name": "B", "conversation": [{"message": "  ", "is_human": False}]}, "empty_content"),
    ({"bot_name": "B", "conversation": [{"message": "hi", "is_human": True}]}, "no_assistant_turn"),
])
def test_pippa_rejections(tmp_path, row, reason):
    p = write_jsonl(tmp_path / "p.jsonl", [row])
    rej = only_rejection(p)
    assert (rej.reason, rej.line) == (reason, 1) and rej.row


def test_pippa_forced_format_and_user_name(tmp_path):
    p = write_jsonl(tmp_path / "p.jsonl", [{"bot_name": "B", "bot_definitions": "{{random_user_2}} meets {{char}}",
                                            "conversation": [{"message": "hi", "is_human": True},
                                                             {"message": "yo", "is_human": False}]}])
    [conv], _ = read(p, "pippa", user_name="Kit")
    assert "Kit meets B" in conv.messages[0].content and roles(conv) == ["system", "user", "assistant"]


# ---------------------------------------------------------------------------------------------
# SillyTavern chat exports


def test_sillytavern_export_is_detected_and_read():
    [conv], _ = read(DATA / "orin_sillytavern.jsonl")
    assert roles(conv) == ["assistant", "user", "assistant", "user", "user", "assistant"]  # consecutive users kept
    assert conv.messages[4].content == "Oh, and is there any honey for the tea?"
    assert (conv.line, conv.meta["user_name"], conv.meta["character_name"]) == (1, "Wren", "Orin Thistle")
    assert list(read_source(DATA / "orin_sillytavern.jsonl", "sillytavern")) == [conv]


def test_sillytavern_with_card_uses_the_logs_user_name_and_keeps_its_greeting():
    [conv], _ = read(DATA / "orin_sillytavern.jsonl", card=ORIN_PNG)
    assert roles(conv) == ["system", "assistant", "user", "assistant", "user", "user", "assistant"]
    assert "Wren has wandered into the Thistledown Library" in conv.messages[0].content
    assert conv.messages[1].content.count("Orin Thistle looks up") == 1 and "Wren." in conv.messages[1].content


def st_chat(tmp_path: Path, *messages: dict | str) -> Path:
    header = json.dumps({"user_name": "Sam", "character_name": "Vee", "create_date": "2024-01-01"})
    lines = [header] + [m if isinstance(m, str) else json.dumps(m) for m in messages]
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def st(name: str, mes, is_user: bool, **extra) -> dict:
    return {"name": name, "is_user": is_user, "is_system": False, "mes": mes, **extra}


def test_sillytavern_hidden_messages_and_speaker_role_map(tmp_path):
    p = st_chat(tmp_path, st("Vee", "Hello.", False), st("Sam", "secret aside", True, is_system=True),
                st("Sam", "Hi.", True), st("Narrator", "The wind howls.", False), st("Vee", "Brr.", False))
    [conv], _ = read(p, "sillytavern", role_map={"narrator": "system"})
    assert [(m.role, m.content) for m in conv.messages] == [
        ("assistant", "Hello."), ("user", "Hi."), ("system", "The wind howls."), ("assistant", "Brr.")]
    assert conv.meta["hidden_messages"] == 1


@pytest.mark.parametrize(("messages", "line", "reason"), [
    ((st("Vee", "Hello.", False), '{"name": "Sam", "mes": '), 3, "bad_json"),
    ((st("Vee", "Hello.", False), {"name": "Sam", "is_user": True}), 3, "bad_message"),
    ((st("Vee", "Hello.", False), st("Sam", "", True)), 3, "empty_content"),
    ((st("Vee", "Hello.", False), st("Sam", 5, True)), 3, "bad_message"),
    ((st("Vee", "Hello.", False), "[1, 2]"), 3, "not_an_object"),
    ((st("Sam", "Hi.", True),), 1, "no_assistant_turn"),
    ((), 1, "empty_conversation"),
])
def test_sillytavern_rejections(tmp_path, messages, line, reason):
    rej = only_rejection(st_chat(tmp_path, *messages), "sillytavern")
    assert (rej.reason, rej.line) == (reason, line)
    assert rej.source.endswith("chat.jsonl") and rej.detail


# ---------------------------------------------------------------------------------------------
# Recipe config and the per-source entry point


def test_data_source_fields():
    assert all(f.description for f in DataSource.model_fields.values())
    src = DataSource(card="c.png")
    assert (src.path, src.user_name, src.greeting, src.weight, src.max_samples) == (None, "User", "first", None, None)
    with pytest.raises(ValidationError, match="needs `path`"):
        DataSource()
    with pytest.raises(ValidationError, match="format: card"):
        DataSource(path="c.png", card="d.png", format="card")
    with pytest.raises(ValidationError):
        DataSource(path="x.jsonl", weight=0)
    with pytest.raises(ValidationError):
        DataSource(path="x.jsonl", greeting="some")
    for fmt in ("auto", "openai", "sharegpt", "parquet", "hf_dataset", "card", "pippa", "sillytavern"):
        DataSource(path="x", format=fmt)


def test_read_data_source_resolves_paths():
    def resolve(p: str) -> Path:  # stands in for Recipe.resolve_path
        return DATA / Path(p).name

    items = list(read_data_source(DataSource(card="elsewhere/card_orin.png"), resolve))
    assert len(items) == 2 and all(isinstance(i, Conversation) for i in items)
    items = list(read_data_source(DataSource(path="x/pippa_sample.jsonl"), resolve))
    assert len(items) == 5


# ---------------------------------------------------------------------------------------------
# Quotas


def many(n: int) -> list[Conversation]:
    return [Conversation([Message("user", f"q{i}"), Message("assistant", f"a{i}")], "s.jsonl", i + 1) for i in range(n)]


def test_quota_default_keeps_everything():
    convs = many(5)
    assert apply_source_quota(convs, None, None, seed=1) == (convs, [])


def test_quota_weight_repeats_and_subsamples_deterministically():
    convs = many(40)
    twice, left = apply_source_quota(convs, 2.0, None, seed=3)
    assert len(twice) == 80 and not left
    assert [c.meta.get("copy", 0) for c in twice[:4]] == [0, 1, 0, 1]
    assert twice[1].content_hash == twice[0].content_hash  # copies land in the same split

    half, left = apply_source_quota(convs, 0.5, None, seed=3)
    assert len(half) == 20 and len(left) == 20 and {c.line for c in half} | {c.line for c in left} == set(range(1, 41))
    again, _ = apply_source_quota(list(reversed(convs)), 0.5, None, seed=3)
    assert {c.line for c in again} == {c.line for c in half}  # order-independent
    other, _ = apply_source_quota(convs, 0.5, None, seed=4)
    assert {c.line for c in other} != {c.line for c in half}

    two_and_half, left = apply_source_quota(convs, 2.5, None, seed=3)
    assert len(two_and_half) == 100 and not left


def test_quota_max_samples_caps_first_copies_before_dropping_any_conversation():
    convs = many(10)
    kept, left = apply_source_quota(convs, None, 4, seed=0)
    assert len(kept) == 4 and len(left) == 6
    assert kept == apply_source_quota(convs, None, 4, seed=0)[0]
    kept, left = apply_source_quota(convs, 2.0, 15, seed=0)
    assert len(kept) == 15 and not left  # every conversation once, five of them twice
    kept, left = apply_source_quota(convs, None, 100, seed=0)
    assert len(kept) == 10 and not left
    with pytest.raises(ValueError, match="weight"):
        apply_source_quota(convs, 0.0, None, seed=0)
