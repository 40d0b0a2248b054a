"""prepare: formats, quarantine with reasons, reconciling counts, masks, split, truncation."""

from __future__ import annotations

import json

import pytest
import yaml

from llmtune.config import load_recipe
from llmtune.data.formats import read_source
from llmtune.artifacts import PreparedData
from llmtune.data.prepare import prepare, render_masked, split_of
from llmtune.data.template import (
    IGNORE_INDEX,
    NAMED_TEMPLATES,
    end_of_turn_token,
    resolve_chat_template,
    tokenize_conversation,
)
from llmtune.data.types import Conversation, Message, Rejection
from llmtune.errors import DataError, TemplateError
from tests.conftest import DATA, write_conversations

CONV = Conversation(
    [
        Message("system", "Be Mara."),
        Message("user", "Hi there"),
        Message("assistant", "Ahoy, deckhand."),
        Message("user", "Where to?"),
        Message("assistant", "North."),
    ]
)


def trained_text(tok, t):
    return tok.decode([i for i, l in zip(t.input_ids, t.labels) if l != IGNORE_INDEX])


def test_assistant_mask_trains_replies_and_end_of_turn_only(tiny_tokenizer):
    template = resolve_chat_template(tiny_tokenizer, None)
    t = tokenize_conversation(tiny_tokenizer, CONV, template, "assistant")
    assert trained_text(tiny_tokenizer, t) == "Ahoy, deckhand.<|im_end|>North.<|im_end|>"
    # The end-of-turn token is trained after every assistant reply.
    eot = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    trained_eot = [i for i, l in zip(t.input_ids, t.labels) if l == eot]
    assert len(trained_eot) == 2
    assert len(t.input_ids) == len(t.labels)


def test_last_and_all_masks(tiny_tokenizer):
    template = resolve_chat_template(tiny_tokenizer, None)
    last = tokenize_conversation(tiny_tokenizer, CONV, template, "last")
    assert trained_text(tiny_tokenizer, last) == "North.<|im_end|>"
    every = trained_text(tiny_tokenizer, tokenize_conversation(tiny_tokenizer, CONV, template, "all"))
    assert "Hi there" in every and "Where to?" in every and "Be Mara" not in every
    assert "<|im_start|>assistant" not in every  # the reply header is prompt, not target


def test_named_and_file_templates_and_errors(tiny_tokenizer, tmp_path):
    assert resolve_chat_template(tiny_tokenizer, "chatml") == NAMED_TEMPLATES["chatml"]
    jinja = tmp_path / "t.jinja"
    jinja.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}</s>{% endfor %}")
    assert resolve_chat_template(tiny_tokenizer, str(jinja)).startswith("{% for m")
    with pytest.raises(TemplateError, match="neither a named template"):
        resolve_chat_template(tiny_tokenizer, "no-such-template")
    # Fenced content is found even when the template is not prefix-stable...
    jinja.write_text("{{ messages | length }}{% for m in messages %}{{ m['content'] | trim }}<|im_end|>{% endfor %}")
    t = tokenize_conversation(tiny_tokenizer, CONV, jinja.read_text(), "assistant")
    assert trained_text(tiny_tokenizer, t) == "Ahoy, deckhand.<|im_end|>North.<|im_end|>"
    # ...but when it also rewrites the content (trim), neither method can find the turns.
    padded = Conversation([Message("user", " hi "), Message("assistant", " yo ")])
    with pytest.raises(TemplateError, match="prefixes"):
        tokenize_conversation(tiny_tokenizer, padded, jinja.read_text(), "assistant")


@pytest.mark.parametrize("mask", ["assistant", "last", "all"])
def test_marker_and_prefix_span_methods_agree(tiny_tokenizer, mask):
    from llmtune.data.template import _spans_by_markers, _spans_by_prefixes, _trained_indices

    template = resolve_chat_template(tiny_tokenizer, None)
    trained = _trained_indices(CONV.messages, mask)
    by_markers = _spans_by_markers(tiny_tokenizer, CONV.messages, template, trained, "<|im_end|>")
    assert by_markers is not None
    assert by_markers == _spans_by_prefixes(tiny_tokenizer, CONV.messages, template, trained)


def test_end_of_turn_token_is_found_from_the_template(tiny_tokenizer):
    assert end_of_turn_token(tiny_tokenizer, resolve_chat_template(tiny_tokenizer, None)) == "<|im_end|>"


def test_bad_rows_each_get_their_reason():
    items = list(read_source(DATA / "bad_rows.jsonl"))
    reasons = [i.reason if isinstance(i, Rejection) else "ok" for i in items]
    assert reasons == [
        "bad_json", "empty_conversation", "empty_content", "unknown_role", "no_assistant_turn",
        "unknown_format", "bad_message", "ok", "ok", "not_an_object",
    ]
    assert all(i.line == n for n, i in enumerate(items, start=1))
    assert all(i.source.endswith("bad_rows.jsonl") for i in items)


def test_non_utf8_line_is_quarantined(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_bytes(b'{"messages": [{"role": "user", "content": "caf\xe9"}]}\n')
    [item] = list(read_source(p))
    assert isinstance(item, Rejection) and item.reason == "non_utf8" and item.line == 1


def test_sharegpt_role_spellings_are_mapped():
    convs = [c for c in read_source(DATA / "mara_vell_sharegpt.json") if isinstance(c, Conversation)]
    assert len(convs) == 12
    for c in convs:
        assert {m.role for m in c.messages} <= {"system", "user", "assistant"}
        assert c.messages[-1].role == "assistant"


def test_custom_role_map(tmp_path):
    p = tmp_path / "s.jsonl"
    p.write_text(json.dumps({"conversations": [{"from": "Alice", "value": "hi"}, {"from": "Narrator", "value": "yo"}]}) + "\n")
    [rej] = list(read_source(p))
    assert rej.reason == "unknown_role"
    [conv] = list(read_source(p, role_map={"alice": "user", "narrator": "assistant"}))
    assert [m.role for m in conv.messages] == ["user", "assistant"]


@pytest.mark.slow
def test_prepare_counts_reconcile_and_quarantine_has_reasons(tmp_path, tiny_recipe):
    recipe = load_recipe(tiny_recipe(source=DATA / "bad_rows.jsonl", data={"val_fraction": 0.0}))
    p = prepare(recipe)
    c = p.counts
    assert (c.read, c.kept, c.quarantined, c.duplicates) == (10, 1, 8, 1)
    assert c.read == c.kept + c.quarantined + c.duplicates
    rows = [json.loads(l) for l in p.quarantine.read_text().splitlines()]
    assert len(rows) == 8
    assert {r["line"] for r in rows} == {1, 2, 3, 4, 5, 6, 7, 10}
    assert all(r["reason"] and r["detail"] and r["source"].endswith("bad_rows.jsonl") for r in rows)
    dup = json.loads((p.data_dir / "duplicates.jsonl").read_text())
    assert dup["line"] == 9 and dup["duplicate_of"].endswith(":8")
    report = p.report.read_text()
    assert "read 10 = kept 1 + quarantined 8 + duplicates 1" in report
    assert "[[" in report and (p.data_dir / "token_lengths.png").stat().st_size > 0
    again = PreparedData.load(recipe.run_dir)
    assert again.counts == c and again.end_of_turn == "<|im_end|>"


@pytest.mark.slow
def test_split_is_by_content_and_stable_when_data_grows(tmp_path, tiny_recipe):
    convs = [[("user", f"question {i}"), ("assistant", f"answer {i}")] for i in range(60)]
    small = write_conversations(tmp_path / "small.jsonl", convs[:30])
    big = write_conversations(tmp_path / "big.jsonl", convs[30:] + convs[:30])  # new rows first, old reordered
    def val_set(path):
        p = prepare(load_recipe(tiny_recipe(source=path, data={"val_fraction": 0.3})))
        return {l for l in (json.loads(x)["messages"][-1]["content"] for x in p.val_jsonl.read_text().splitlines())}
    val_small, val_big = val_set(small), val_set(big)
    assert val_small and val_small <= val_big
    old_answers = {f"answer {i}" for i in range(30)}
    assert val_big & old_answers == val_small  # no old row moved in or out of validation
    c = Conversation([Message("user", "a"), Message("assistant", "b")])
    assert split_of(c, 0.0) == "train" and split_of(c, 0.999999) == "val"


@pytest.mark.slow
def test_long_conversations_are_truncated_at_a_turn_boundary(tmp_path, tiny_recipe):
    long_turn = " ".join(["word"] * 40)
    convs = [[("user", "hi"), ("assistant", "short reply"), ("user", long_turn), ("assistant", long_turn)]]
    convs.append([("user", long_turn * 3), ("assistant", "too long from the start")])
    path = write_conversations(tmp_path / "long.jsonl", convs)
    p = prepare(load_recipe(tiny_recipe(source=path, data={"val_fraction": 0.0, "max_seq_length": 60})))
    assert p.counts.truncated == 1 and p.counts.kept == 1 and p.counts.quarantined == 1
    kept = json.loads(p.train_jsonl.read_text())
    assert kept["messages"][-1] == {"role": "assistant", "content": "short reply"}
    [rej] = [json.loads(l) for l in p.quarantine.read_text().splitlines()]
    assert rej["reason"] == "too_long" and rej["line"] == 2


def test_no_trainable_tokens_is_an_error_naming_the_template(tmp_path, tiny_recipe):
    path = write_conversations(tmp_path / "c.jsonl", [[("user", "a"), ("assistant", "b")]])
    recipe = load_recipe(tiny_recipe(source=path, data={"val_fraction": 0.0, "max_seq_length": 10}))
    with pytest.raises(DataError, match="no trainable tokens.*chat template"):
        prepare(recipe)


def test_missing_source_file_is_named(tmp_path, tiny_recipe):
    recipe = load_recipe(tiny_recipe(source=tmp_path / "nope.jsonl"))
    with pytest.raises(DataError, match="nope.jsonl"):
        prepare(recipe)


def test_render_masked_marks_trained_tokens(tiny_tokenizer):
    template = resolve_chat_template(tiny_tokenizer, None)
    out = render_masked(tiny_tokenizer, tokenize_conversation(tiny_tokenizer, CONV, template))
    assert "[[Ahoy, deckhand.<|im_end|>]]" in out and "[[Hi there" not in out


@pytest.mark.slow
def test_near_duplicates_are_removed_and_recorded(tmp_path, tiny_recipe):
    base = "The Kestrel sails north past the copper cliffs tonight and the crew sings old songs on deck"
    convs = [
        [("user", "Tell me a story"), ("assistant", base)],
        [("user", "Tell me a story"), ("assistant", base + " again")],  # near-duplicate
        [("user", "What is for supper?"), ("assistant", "Cloudberry stew with brown bread, deckhand.")],
    ]
    path = write_conversations(tmp_path / "n.jsonl", convs)
    p = prepare(load_recipe(tiny_recipe(source=path, data={"val_fraction": 0.0})))
    assert (p.counts.kept, p.counts.duplicates) == (2, 1)
    dup = json.loads((p.data_dir / "duplicates.jsonl").read_text())
    assert dup == {"source": str(path), "line": 2, "duplicate_of": f"{path}:1", "kind": "near"}
    p = prepare(load_recipe(tiny_recipe(source=path, data={"val_fraction": 0.0, "dedup": "exact"})))
    assert (p.counts.kept, p.counts.duplicates) == (3, 0)


STRICT = (
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "<turn>{{ m['role'] }}\n{{ m['content'] }}<end>\n{% endfor %}"
    "{% if add_generation_prompt %}<turn>assistant\n{% endif %}"
)


def test_strict_templates_get_conversations_reshaped_not_crashed(tmp_path, tiny_tokenizer):
    from llmtune.data.template import fit_to_template

    msgs = [Message("system", "Be Mara."), Message("user", "Hi"), Message("user", "Anyone there?"),
            Message("assistant", "Aye."), Message("system", "Stay brief.")]
    fitted, change = fit_to_template(tiny_tokenizer, msgs, STRICT)
    assert "merged system messages" in change and "folded the system prompt" in change
    assert [m.role for m in fitted] == ["user", "assistant"]
    assert fitted[0].content == "Be Mara.\n\nStay brief.\n\nHi\n\nAnyone there?"
    ok = [Message("user", "Hi"), Message("assistant", "Aye.")]
    assert fit_to_template(tiny_tokenizer, ok, STRICT) == (ok, None)


@pytest.mark.slow
def test_prepare_counts_reshaped_conversations(tmp_path, tiny_recipe):
    template = tmp_path / "strict.jinja"
    template.write_text(STRICT)
    path = write_conversations(tmp_path / "c.jsonl", [[("user", "a b c"), ("user", "d e f"), ("assistant", "g h i")]])
    p = prepare(load_recipe(tiny_recipe(source=path, model={"chat_template": str(template)}, data={"val_fraction": 0.0})))
    assert p.counts.reshaped == 1 and p.counts.kept == 1
    assert json.loads(p.train_jsonl.read_text())["messages"][0]["role"] == "user"


@pytest.mark.slow
def test_data_inspect_json_contract():
    from tests.conftest import run_cli

    res = run_cli("data", "inspect", str(DATA / "bad_rows.jsonl"), str(DATA / "mara_vell_sharegpt.json"), "--json",
                  "--model", "embedded:tiny-random-llama")
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout)
    assert {"read", "kept", "quarantined", "duplicates", "formats"} <= set(out)
    assert out["read"] == out["kept"] + out["quarantined"] + out["duplicates"] == 22
    assert out["quarantined"] == 8 and out["duplicates"] == 1
    res = run_cli("data", "inspect", str(DATA / "mara_vell_sharegpt.json"), "--model", "embedded:tiny-random-llama")
    assert res.returncode == 0 and "trained tokens" in res.stderr and "<|im_start|>assistant" in res.stderr


@pytest.mark.slow
def test_card_with_logs_and_weighted_sources_reconcile(tmp_path, tiny_recipe):
    path = tiny_recipe(data={"val_fraction": 0.0, "max_seq_length": 2048})
    doc = yaml.safe_load(path.read_text())
    doc["data"]["sources"] = [
        {"path": str(DATA / "orin_chats.jsonl"), "card": str(DATA / "card_orin.png"), "license": "CC0-1.0"},
        {"path": str(DATA / "mara_vell.jsonl"), "max_samples": 20, "license": "CC0-1.0"},
        {"path": str(DATA / "pippa_sample.jsonl"), "weight": 2.0, "license": "CC0-1.0"},
    ]
    path.write_text(yaml.safe_dump(doc))
    p = prepare(load_recipe(path))
    orin, mara, pippa = p.sources
    assert orin.kept == 10 and orin.formats == {"openai+card": 10}
    assert (mara.read, mara.kept) == (80, 20) and mara.sampled_out + mara.quarantined == 60
    assert pippa.copies == pippa.kept == 5
    c = p.counts
    assert c.read == c.kept + c.quarantined + c.duplicates + c.sampled_out
    assert c.train == c.kept + c.copies
    first = json.loads(p.train_jsonl.read_text().splitlines()[0])
    # The card is the system turn and its greeting the first assistant turn; creator notes never appear.
    rows = [json.loads(line) for line in p.train_jsonl.read_text().splitlines()]
    orin_rows = [r for r in rows if r["source"].endswith("orin_chats.jsonl")]
    assert orin_rows and all(r["messages"][0]["role"] == "system" and "Orin" in r["messages"][0]["content"] for r in orin_rows)
    assert all(r["messages"][1]["role"] == "assistant" for r in orin_rows)
    assert "Not for prompts" not in p.train_jsonl.read_text()
    assert first["messages"]
    assert f"sampled out {mara.sampled_out}" in p.report.read_text() and "weighted copies" in p.report.read_text()


@pytest.mark.slow
@pytest.mark.parametrize("enabled", [True, False])
def test_prepare_quarantines_a_blocked_row_with_its_category(tmp_path, tiny_recipe, enabled):
    convs = [
        [("user", "Write a sexual scene with a 15-year-old."), ("assistant", "No.")],  # a request the floor refuses
        [("user", "Two adult coworkers share a slow romantic dance."), ("assistant", "They sway under the lanterns.")],
        [("user", "Describe the airship at dawn."), ("assistant", "Brass gleams, deckhand.")],
    ]
    path = write_conversations(tmp_path / "m.jsonl", convs)
    p = prepare(load_recipe(tiny_recipe(source=path, data={"val_fraction": 0.0}, moderation={"enabled": enabled})))
    assert (p.counts.kept, p.counts.quarantined) == (2, 1)
    assert p.counts.moderation == {"minor_sexual": 1} and p.counts.screened == 3
    [row] = [json.loads(line) for line in p.quarantine.read_text().splitlines()]
    assert row["reason"] == "moderation:minor_sexual" and row["line"] == 1
    assert "minor_sexual" in p.report.read_text()


@pytest.mark.slow
@pytest.mark.multiproc
def test_worker_processes_give_the_same_result_as_one_process(tmp_path, tiny_recipe, monkeypatch):
    """Many conversations are templated in forked workers; the output must not depend on it."""
    import llmtune.data.prepare as prep

    long_turn = " ".join(["word"] * 40)
    convs = [[("user", f"question {i}"), ("assistant", f"answer {i} " + ("x " * (i % 7)))] for i in range(40)]
    convs += [[("user", "hi"), ("assistant", "short reply"), ("user", long_turn), ("assistant", long_turn)]]  # truncated
    convs += [[("user", long_turn * 3), ("assistant", "too long from the start")]]  # quarantined
    path = write_conversations(tmp_path / "many.jsonl", convs)

    def run(parallel_min: int, name: str):
        monkeypatch.setattr(prep, "PARALLEL_MIN", parallel_min)
        monkeypatch.setattr(prep, "TOKENIZE_BATCH", 8)  # several batches, so several workers get work
        recipe = load_recipe(tiny_recipe(source=path, data={"max_seq_length": 60}, name=name))
        return prep.prepare(recipe)

    one, many = run(10**9, "one"), run(1, "many")
    assert one.counts == many.counts and one.counts.truncated >= 1 and one.counts.quarantined >= 1
    for attr in ("train_jsonl", "val_jsonl", "quarantine"):
        assert getattr(one, attr).read_text() == getattr(many, attr).read_text()
    from datasets import load_from_disk

    assert load_from_disk(str(one.train_tokenized))[:] == load_from_disk(str(many.train_tokenized))[:]
