"""Fuzz prepare with random and mutated rows of every supported format: it never crashes, counts reconcile."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmtune.config import DataConfig, DataSource, ModelConfig, Recipe
from llmtune.data.prepare import collect

TEXT = st.text(min_size=0, max_size=40)
ROLE = st.sampled_from(["user", "assistant", "system", "human", "gpt", "bot", "USER", "narrator", "", None, 3])
VALUE = st.one_of(TEXT, st.none(), st.integers(), st.lists(st.dictionaries(st.sampled_from(["type", "text"]), TEXT), max_size=2))
TURN = st.fixed_dictionaries({}, optional={"role": ROLE, "content": VALUE, "from": ROLE, "value": VALUE, "name": TEXT})
OPENAI = st.fixed_dictionaries({"messages": st.lists(TURN, max_size=5)})
SHAREGPT = st.fixed_dictionaries({"conversations": st.lists(TURN, max_size=5)}, optional={"system": TEXT})
PIPPA = st.fixed_dictionaries({"bot_name": st.one_of(TEXT, st.none()), "conversation": st.lists(
    st.fixed_dictionaries({}, optional={"message": VALUE, "is_human": st.one_of(st.booleans(), st.none())}), max_size=5)},
    optional={"bot_definitions": TEXT, "bot_description": TEXT, "bot_greeting": TEXT})
JUNK = st.one_of(st.dictionaries(TEXT, VALUE, max_size=3), st.lists(VALUE, max_size=3), st.integers(), TEXT)
ROW = st.one_of(OPENAI, SHAREGPT, PIPPA, JUNK)


def mutate(line: str, cut: int, garbage: str) -> str:
    """Mutations seen in real exports: truncation, stray bytes, broken escapes."""
    return (line[:cut] + garbage) if cut < len(line) else line


@pytest.mark.slow
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(st.tuples(ROW, st.integers(0, 400), st.sampled_from(["", "\\", "\u0000", "{", "\ufffd", "\"]"])),
                     min_size=1, max_size=12))
def test_prepare_never_crashes_and_counts_reconcile(rows, tmp_path_factory, tiny_tokenizer):
    tmp = tmp_path_factory.mktemp("fuzz")
    path = tmp / "rows.jsonl"
    path.write_text("\n".join(mutate(json.dumps(r), cut, g) for r, cut, g in rows) + "\n", encoding="utf-8", errors="surrogatepass")
    recipe = Recipe(name="fuzz", model=ModelConfig(base="embedded:tiny-random-llama"),
                    data=DataConfig(sources=[DataSource(path=str(path))], max_seq_length=64))
    found = collect(recipe, tiny_tokenizer, tiny_tokenizer.chat_template)
    [s] = found.sources
    assert s.read == s.kept + s.quarantined + s.duplicates
    assert len(found.rejections) == s.quarantined
    assert all(r.reason and r.line >= 0 for r in found.rejections)
    assert all(t.trained_tokens > 0 and len(t.input_ids) <= 64 for _, t in found.kept)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(card=st.fixed_dictionaries({"spec": st.sampled_from(["chara_card_v2", "chara_card_v3", "nope", None])},
                                  optional={"data": st.dictionaries(st.sampled_from(
                                      ["name", "description", "first_mes", "mes_example", "system_prompt", "creator_notes"]),
                                      st.one_of(TEXT, st.none(), st.integers()), max_size=6)}))
def test_random_cards_never_crash(card, tmp_path_factory, tiny_tokenizer):
    tmp = tmp_path_factory.mktemp("card")
    path = tmp / "card.json"
    path.write_text(json.dumps(card))
    recipe = Recipe(name="fuzz", model=ModelConfig(base="embedded:tiny-random-llama"),
                    data=DataConfig(sources=[DataSource(card=str(path))], max_seq_length=256))
    try:
        found = collect(recipe, tiny_tokenizer, tiny_tokenizer.chat_template)
    except Exception as exc:  # a card that cannot be read is one clear DataError, nothing else
        from llmtune.errors import DataError

        assert isinstance(exc, DataError), repr(exc)
        return
    [s] = found.sources
    assert s.read == s.kept + s.quarantined + s.duplicates
