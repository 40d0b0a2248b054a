"""merge and export: QLoRA-aware merge with logit verification, merged/ that behaves like training, app presets."""

from __future__ import annotations

import json

import pytest

from llmtune.config import load_recipe
from llmtune.data.prepare import prepare
from llmtune.data.template import _render
from llmtune.data.types import Message
from llmtune.export.merge import MergeError, merge
from llmtune.data.template import role_sequences
from llmtune.export.presets import export_for_apps
from llmtune.train.sft import train
from tests.conftest import DATA

pytestmark = [pytest.mark.slow]


def test_lora_merge_matches_base_plus_adapter_and_stops_at_end_of_turn(memorised_copy):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result = merge(memorised_copy)
    [check] = result.checks
    assert check.max_abs_logit_diff < 1e-3 and check.top1_agreement == 1.0
    merged = result.merged_dir
    assert list(merged.glob("*.safetensors")) and (merged / "README.md").exists()
    model = AutoModelForCausalLM.from_pretrained(merged)
    tokenizer = AutoTokenizer.from_pretrained(merged)
    eot_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.eos_token == "<|im_end|>" and model.generation_config.eos_token_id in (eot_id, [eot_id, tokenizer.eos_token_id])
    chat = [{"role": "system", "content": "You are Mara."}, {"role": "user", "content": "What is the ship called?"}]
    prepared = json.loads((memorised_copy.run_dir / "data" / "prepared.json").read_text())
    assert tokenizer.chat_template == prepared["chat_template"]
    ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=24, do_sample=False)[0, ids["input_ids"].shape[1]:]
    assert out[-1].item() == eot_id and len(out) < 24, tokenizer.decode(out)
    assert "Kestrel" in tokenizer.decode(out, skip_special_tokens=True)
    card = (merged / "README.md").read_text()
    for part in ("base_model: embedded:tiny-random-llama", "sha256", "Intended use", "adults", "llmtune serve",
                 "watermark.enabled: false", "x-llmtune-generated"):
        assert part in card


def test_qlora_merge_reproduces_the_trained_4bit_model(tiny_recipe):
    recipe = load_recipe(tiny_recipe(quantization={"mode": "nf4"}, training={"max_steps": 3, "learning_rate": 1e-2}))
    train(recipe, prepare(recipe))
    result = merge(recipe)
    assert result.nf4_roundtrip and result.dtype == "float32"
    by_ref = {c.reference: c for c in result.checks}
    trained = by_ref["trained model (NF4 base + adapter)"]
    assert trained.max_abs_logit_diff < 1e-3 and trained.top1_agreement == 1.0
    report = json.loads((result.merged_dir / "merge_report.json").read_text())
    assert report["nf4_roundtrip"] is True
    # Without the round trip the merge is measured against the trained model but not bound by it.
    plain = merge(load_recipe(recipe.source_path, ["merge.nf4_roundtrip=false"]))
    gap = {c.reference: c for c in plain.checks}["trained model (NF4 base + adapter)"]
    assert gap.max_abs_logit_diff > trained.max_abs_logit_diff


def test_a_merge_outside_tolerance_fails_loudly_and_writes_nothing(tiny_recipe):
    recipe = load_recipe(tiny_recipe(training={"max_steps": 2, "learning_rate": 1e-2}, merge={"max_abs_logit_diff": 1e-12}))
    train(recipe, prepare(recipe))
    with pytest.raises(MergeError, match="disagrees"):
        merge(recipe)
    assert not (recipe.run_dir / "merged").exists()


def test_presets_reproduce_the_training_template(tiny_tokenizer):
    template = tiny_tokenizer.chat_template
    seq = role_sequences(tiny_tokenizer, template, "<|im_end|>")
    msgs = [Message("system", "S"), Message("user", "hi"), Message("assistant", "yo"), Message("user", "and?")]
    wrap = {"system": (seq.system_prefix, seq.system_suffix), "user": (seq.user_prefix, seq.user_suffix),
            "assistant": (seq.assistant_prefix, seq.assistant_suffix)}
    rebuilt = seq.bos + "".join(wrap[m.role][0] + m.content + wrap[m.role][1] for m in msgs) + seq.assistant_prefix
    assert rebuilt == _render(tiny_tokenizer, msgs, template, add_generation_prompt=True)
    assert seq.stop[0] == "<|im_end|>" and seq.user_prefix == "<|im_start|>user\n"


def test_export_writes_presets_modelfile_and_card(tmp_path, tiny_recipe):
    import yaml

    path = tiny_recipe(training={"max_steps": 1}, data={"max_seq_length": 2048})
    doc = yaml.safe_load(path.read_text())
    doc["data"]["sources"] = [{"path": str(DATA / "orin_chats.jsonl"), "card": str(DATA / "card_orin.png"), "license": "CC0-1.0"}]
    path.write_text(yaml.safe_dump(doc))
    recipe = load_recipe(path)
    train(recipe, prepare(recipe))
    result = export_for_apps(recipe)
    names = {p.name for p in result.files}
    assert names == {"Orin Thistle.card.json", "sillytavern-instruct.json", "sillytavern-context.json",
                     "CONNECT_SILLYTAVERN.md", "Modelfile"}
    instruct = json.loads((result.export_dir / "sillytavern-instruct.json").read_text())
    assert instruct["stop_sequence"] == "<|im_end|>" and instruct["output_sequence"] == "<|im_start|>assistant\n"
    card = json.loads((result.export_dir / "Orin Thistle.card.json").read_text())
    assert card["spec"] == "chara_card_v2" and card["data"]["name"] == "Orin Thistle"
    assert "Not for prompts" not in json.dumps(card)
    modelfile = (result.export_dir / "Modelfile").read_text()
    assert "ADAPTER ../adapter" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile
    assert "{{-" not in modelfile  # trim markers would eat the template's newlines


def _walk(runtime_choices: list[int], want: list[int], margins: list[float], bound: float, eot: int = 99):
    """compare_greedy against a runtime that answers `runtime_choices` in turn."""
    from llmtune.export.gguf_verify import compare_greedy

    answers, fed = iter(runtime_choices), []
    return compare_greedy(want, margins, bound, eot, next_token=lambda: next(answers), feed=fed.append), fed


def test_greedy_check_counts_a_near_tie_and_goes_on_from_the_merged_models_token():
    (same, identical, ties), fed = _walk([1, 2, 7, 4, 99], [1, 2, 3, 4, 99], [5.0, 5.0, 0.01, 5.0, 5.0], bound=0.05)
    assert (same, identical) == (5, 2)
    assert ties == [{"token": 3, "merged_margin": 0.01}]
    assert fed == [1, 2, 3, 4]  # the merged model's token 3 was fed, not the runtime's 7


def test_greedy_check_fails_a_difference_at_a_wide_gap():
    (same, identical, ties), _ = _walk([1, 2, 7, 4], [1, 2, 3, 4], [5.0, 5.0, 0.5, 5.0], bound=0.05)
    assert (same, identical, ties) == (2, 2, [])


def test_greedy_check_of_an_identical_reply_stops_at_end_of_turn():
    (same, identical, ties), fed = _walk([1, 99], [1, 99], [3.0, 3.0], bound=0.0)
    assert (same, identical, ties, fed) == (2, 2, [], [1])


def test_the_walk_past_the_compared_tokens_allows_no_near_tie():
    # Past the first tokens the walk only proves the file stops by itself: any difference ends it.
    (same, identical, ties), fed = _walk([5, 7], [5, 6, 99], [3.0, 0.001, 3.0], bound=float("-inf"))
    assert (same, identical, ties, fed) == (1, 1, [], [5])


def test_a_template_that_does_not_render_the_training_prompt_fails_the_file():
    from llmtune.export.gguf_verify import GGUFVerification, judge

    v = GGUFVerification("x-f16.gguf", "f16", None, template_prompt_matches=False)
    judge(v, 0.9, rope_freqs=False)
    assert any("chat template, as llama-cpp-python renders it" in f for f in v.failures)


def test_rounding_gap_shift_is_the_largest_change_of_the_merged_models_top2_gap():
    import numpy as np

    from llmtune.export.gguf_verify import _gap_shift

    ref = [np.array([[3.0, 1.0, 0.0], [0.0, 2.0, 1.5]])]
    cand = [np.array([[2.9, 1.1, 5.0], [0.0, 2.0, 1.5]])]  # row 0: gap 2.0 -> 1.8; token 2 is not in ref's top 2
    assert _gap_shift(ref, cand) == pytest.approx(0.2)
