"""GGUF export: files llama.cpp loads, that compute what the merged model computes and stop at end-of-turn.

The runtime is llama.cpp itself through llama-cpp-python (`make install` builds it); the
family tests use tiny random models of Llama 3.2, Qwen2.5, Mistral and Gemma 2 with a
tokenizer of each family's kind, so tensor mapping, hyperparameters and vocabulary are
checked in llama.cpp, not only written.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from llmtune.config import load_recipe
from tests import gguf_families
from tests.conftest import copy_run

pytestmark = [pytest.mark.slow]

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is installed by `make install` (pip install '.[gguf]')")

CHAT = [
    {"role": "system", "content": "You are Mara."},
    {"role": "user", "content": "Hello! It's 2026: 12345 coins, naïve café, 漢字."},
    {"role": "assistant", "content": "Aye,  deckhand.\n\n\tWelcome aboard the Kestrel."},
    {"role": "user", "content": "Where to?"},
]


def metadata(path) -> dict:
    """The GGUF's key/values as llama.cpp reads them (strings; arrays such as the token list left out)."""
    llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    try:
        return dict(llm.metadata)
    finally:
        llm.close()


def tensor_types(path) -> dict:
    from gguf import GGUFReader

    return {t.name: t.tensor_type.name for t in GGUFReader(path).tensors}


def load(path, **kwargs):
    return llama_cpp.Llama(str(path), n_ctx=512, n_threads=1, verbose=False, logits_all=True, **kwargs)


@pytest.fixture(scope="module")
def gguf_run(merged_run, tmp_path_factory):
    """The memorised tiny run (embedded:tiny-random-llama, SmolLM2 tokenizer), merged, copied and exported."""
    from llmtune.export.presets import export_for_apps

    recipe = copy_run(merged_run, tmp_path_factory.mktemp("gguf-run"), ["export.gguf_threads=1"])
    return recipe, export_for_apps(recipe)


def test_export_writes_gguf_files_that_llama_cpp_runs_like_the_merged_model(gguf_run):
    recipe, result = gguf_run
    export = result.export_dir
    by_type = {f["type"]: f for f in result.gguf}
    assert set(by_type) == {"f16", "q8_0", "q4_k_m"}
    for t in by_type:
        assert (export / f"tiny-{t}.gguf").is_file()
    assert not (export / ".gguf-staging").exists()
    f16, q8 = by_type["f16"]["verification"], by_type["q8_0"]["verification"]
    assert f16["runtime"].startswith("llama.cpp") and f16["failures"] == []
    assert f16["greedy_tokens_matched"] == f16["greedy_tokens_compared"] and f16["greedy_tokens_compared"][0] > 3
    assert q8["top1_agreement"] >= 0.9 and q8["failures"] == []
    assert all(v["verification"]["tokenizer_matches"] for v in by_type.values())
    assert all(v["verification"]["metadata_matches"] for v in by_type.values())
    assert all(v["verification"]["template_prompt_matches"] for v in by_type.values())
    assert q8["readback"]["top1_agreement"] >= 0.9
    report = json.loads((export / "gguf_report.json").read_text())
    assert report["limits"] == {"greedy_tokens": 32, "min_top1_agreement": 0.9}


def test_gguf_metadata_carries_the_training_template_and_end_of_turn(gguf_run, tiny_tokenizer):
    recipe, result = gguf_run
    prepared = json.loads((recipe.run_dir / "data" / "prepared.json").read_text())
    eot = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    for t in ("f16", "q8_0", "q4_k_m"):
        meta = metadata(result.export_dir / f"tiny-{t}.gguf")
        assert meta["general.architecture"] == "llama" and meta["general.name"] == "tiny"
        assert meta["tokenizer.chat_template"] == prepared["chat_template"]
        assert meta["tokenizer.ggml.eos_token_id"] == meta["tokenizer.ggml.eot_token_id"] == str(eot)
        assert meta["tokenizer.ggml.bos_token_id"] == str(tiny_tokenizer.bos_token_id)
        assert meta["tokenizer.ggml.padding_token_id"] == str(tiny_tokenizer.pad_token_id)
        assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.add_bos_token"] == "false"


def test_the_q8_0_file_stops_at_end_of_turn_by_itself_in_llama_cpp(gguf_run):
    """Independently of the stage's own report: llama.cpp, the GGUF's chat template, no stop strings."""
    recipe, result = gguf_run
    llm = load(result.export_dir / "tiny-q8_0.gguf", chat_format="chat_template.default")
    try:
        out = llm.create_chat_completion(
            messages=[{"role": "system", "content": "You are Mara."}, {"role": "user", "content": "What is the ship called?"}],
            max_tokens=64, temperature=0.0, top_k=1, repeat_penalty=1.0,
        )
    finally:
        llm.close()
    choice = out["choices"][0]
    assert choice["finish_reason"] == "stop" and out["usage"]["completion_tokens"] < 64
    assert "Kestrel" in choice["message"]["content"] and "<|im_end|>" not in choice["message"]["content"]


def test_modelfile_and_guides_point_at_the_gguf(gguf_run):
    recipe, result = gguf_run
    export = result.export_dir
    modelfile = (export / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./tiny-q8_0.gguf\n") and 'PARAMETER stop "<|im_end|>"' in modelfile
    guide = (export / "CONNECT.md").read_text()
    assert "llama-server -m tiny-q8_0.gguf --jinja" in guide
    assert "koboldcpp --model tiny-q8_0.gguf" in guide and "--chatcompletionsadapter koboldcpp-adapter.json" in guide
    assert "sillytavern-instruct.json" in guide and "nothing screens" in guide
    adapter = json.loads((export / "koboldcpp-adapter.json").read_text())
    assert adapter["assistant_start"] == "<|im_start|>assistant\n" and adapter["assistant_end"] == "<|im_end|>\n"
    assert "CONNECT.md" in (export / "CONNECT_SILLYTAVERN.md").read_text()


def test_a_gguf_outside_the_limits_is_not_moved_into_export(gguf_run):
    from llmtune.export.gguf_convert import GGUFError
    from llmtune.export.presets import export_for_apps

    recipe, _ = gguf_run
    strict = load_recipe(recipe.source_path, ["export.gguf_threads=1", "export.gguf_types=[q8_0]",
                                              "export.gguf_min_top1_agreement=1.0", "output.name=tiny-strict"])
    shutil.copytree(recipe.run_dir, strict.run_dir, ignore=shutil.ignore_patterns("export"))
    with pytest.raises(GGUFError, match=r"top-1 agreement 0\.\d+ with the merged model \(limit 1\.0\)"):
        export_for_apps(strict)
    assert not (strict.run_dir / "export" / "tiny-q8_0.gguf").exists()
    assert (strict.run_dir / "export" / ".gguf-staging" / "gguf_report.json").exists()


def test_without_llama_cpp_it_verifies_with_transformers_and_says_so(gguf_run, monkeypatch, capsys):
    from llmtune.export import gguf_convert
    from llmtune.export.presets import export_for_apps

    recipe, _ = gguf_run
    monkeypatch.setattr(gguf_convert, "llama_cpp_version", lambda: None)
    bare = load_recipe(recipe.source_path, ["export.gguf_types=[q8_0,q4_k_m]", "output.name=tiny-bare"])
    shutil.copytree(recipe.run_dir, bare.run_dir, ignore=shutil.ignore_patterns("export"))
    result = export_for_apps(bare)
    by_type = {f["type"]: f for f in result.gguf}
    assert set(by_type) == {"q8_0"}  # no Q4_K quantizer without llama.cpp
    q8 = by_type["q8_0"]["verification"]
    assert q8["runtime"] is None and q8["readback"]["top1_agreement"] >= 0.9 and q8["failures"] == []
    assert q8["readback"]["tokenizer"] == {"chat_template_matches": True, "eos_token": "<|im_end|>", "eos_is_end_of_turn": True}
    err = capsys.readouterr().err
    assert "q4_k_m skipped" in err and "llama.cpp runtime not installed" in err


@pytest.mark.parametrize("family", gguf_families.CASES)
def test_each_recipe_family_maps_to_llama_cpp(family, tmp_path):
    """Tiny random Llama 3.2 / Qwen2.5 / Mistral / Gemma 2: metadata, tensor names, and llama.cpp's logits."""
    import gguf
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from llmtune.export.gguf_convert import special_tokens, write_gguf

    src, case = gguf_families.build(family, tmp_path / "hf")
    tokenizer, config = AutoTokenizer.from_pretrained(src), AutoConfig.from_pretrained(src)
    special = special_tokens(tokenizer, config, case.end_of_turn, case.template)
    path = write_gguf(src, tmp_path / f"{family}-f32.gguf", "f32", tokenizer, special, name=family).path
    write_gguf(src, tmp_path / f"{family}-q8_0.gguf", "q8_0", tokenizer, special, name=family)

    meta = metadata(path)
    arch = case.gguf_arch
    assert meta["general.architecture"] == arch
    assert meta[f"{arch}.block_count"] == "2" and meta[f"{arch}.attention.head_count_kv"] == "2"
    assert meta[f"{arch}.attention.key_length"] == "16" and meta[f"{arch}.vocab_size"] == str(config.vocab_size)
    eot = tokenizer.convert_tokens_to_ids(case.end_of_turn)
    assert meta["tokenizer.ggml.eos_token_id"] == meta["tokenizer.ggml.eot_token_id"] == str(eot)
    assert meta["tokenizer.chat_template"] == case.template
    assert meta["tokenizer.ggml.model"] == ("gpt2" if case.tokenizer == "bpe" else "llama")
    known = {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[gguf.MODEL_ARCH[arch.upper()]]}
    tensors = tensor_types(path)
    for name in tensors:
        base = name.rsplit(".", 1)[0]
        assert (base if not base.startswith("blk.") else "blk.{bid}." + base.split(".", 2)[2]) in known, name
    assert ("output.weight" in tensors) == (family == "mistral")  # the only untied one
    assert ("rope_freqs.weight" in tensors) == (family == "llama3.2")
    assert ("blk.0.attn_q.bias" in tensors) == (family == "qwen2.5")
    assert tensors["blk.0.attn_norm.weight"] == "F32"
    q8 = tensor_types(tmp_path / f"{family}-q8_0.gguf")
    assert q8["blk.0.attn_q.weight"] == "Q8_0" and q8["blk.0.attn_norm.weight"] == "F32"
    if family == "gemma2":
        assert float(meta["gemma2.final_logit_softcapping"]) == 30.0 and "blk.1.post_ffw_norm.weight" in tensors

    text = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    ids = list(tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, return_dict=True)["input_ids"])
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].numpy()
    for name, (max_rel, min_top1) in {path.name: (0.01, 1.0), f"{family}-q8_0.gguf": (0.25, 0.9)}.items():
        llm = load(tmp_path / name)
        try:
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids, "llama.cpp tokenizes differently"
            llm.eval(ids)
            got = np.array(llm.scores[: len(ids)])
        finally:
            llm.close()
        rel = np.abs(got - want).max() / np.abs(want).max()
        top1 = (got.argmax(-1) == want.argmax(-1)).mean()
        assert rel < max_rel and top1 >= min_top1, f"{name}: max |diff| / max |logit| {rel:.4f}, top-1 {top1:.3f}"


def test_unsupported_model_types_fail_with_what_to_do(tmp_path, tiny_tokenizer):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from llmtune.export.gguf_convert import GGUFError, write_gguf

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=len(tiny_tokenizer))).save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    with pytest.raises(GGUFError, match="supports the model types llama, mistral, qwen2, gemma2.*export.gguf=false"):
        write_gguf(tmp_path, tmp_path / "x.gguf", "f16", tiny_tokenizer, None, name="x")


def test_the_embedded_smollm2_exports_end_to_end(tmp_path, tiny_recipe):
    """The demo's base: a one-step SmolLM2-135M run, merged, exported, verified in llama.cpp."""
    import yaml

    from llmtune.data.prepare import prepare
    from llmtune.export.merge import merge
    from llmtune.export.presets import export_for_apps
    from llmtune.train.sft import train

    path = tiny_recipe(model={"base": "embedded:smollm2-135m-instruct"}, training={"max_steps": 1},
                       export={"gguf_types": ["f16", "q8_0"], "gguf_threads": 1, "gguf_greedy_tokens": 16})
    doc = yaml.safe_load(path.read_text())
    doc["eval"]["prompts"] = ["Hello! Who are you?"]
    path.write_text(yaml.safe_dump(doc))
    recipe = load_recipe(path)
    train(recipe, prepare(recipe))
    merge(recipe)
    result = export_for_apps(recipe)
    by_type = {f["type"]: f["verification"] for f in result.gguf}
    assert by_type["f16"]["greedy_tokens_matched"] == by_type["f16"]["greedy_tokens_compared"] == [16]
    assert by_type["q8_0"]["top1_agreement"] >= 0.9
    assert all(v["stops_at_end_of_turn"] == [True] and v["tokenizer_matches"] for v in by_type.values())
    assert metadata(result.export_dir / "tiny-q8_0.gguf")["tokenizer.ggml.pre"] == "gpt-2"
