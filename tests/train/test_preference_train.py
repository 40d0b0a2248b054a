"""The preference stage with TRL's real trainers on the tiny random Llama: DPO, KTO, ORPO, SimPO, QLoRA, resume."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from llmtune.config import load_recipe
from llmtune.artifacts import read_metrics
from tests.conftest import MEMORISE, REPO, run_cli, tiny_recipe_dict, write_conversations

pytestmark = [pytest.mark.slow]

SLOP = ["As an AI, I cannot say.", "A shiver runs down my spine as I answer.", "Maybe, just maybe, the answer awaits.",
        "I hope this helps! Is there anything else?"]


def pair_rows() -> list[dict]:
    rows = []
    for i, ((_, question), (_, answer)) in enumerate(MEMORISE):
        for j in range(2):
            rows.append({"prompt": [{"role": "system", "content": "You are Mara."}, {"role": "user", "content": question}],
                         "chosen": [{"role": "assistant", "content": answer}],
                         "rejected": [{"role": "assistant", "content": SLOP[(i + j) % len(SLOP)]}]})
    return rows


def make_recipe(tmp_path, name: str = "pref", **sections):
    data = write_conversations(tmp_path / "m.jsonl", MEMORISE)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in pair_rows()))
    doc = tiny_recipe_dict(
        tmp_path, data, name=name, stages=["prepare", "train", "preference"],
        data={"val_fraction": 0.0}, lora={"rank": 8, "alpha": 16},
        training={"max_steps": 6, "micro_batch_size": 4, "learning_rate": 1e-2, "save_steps": 100, "eval_steps": 100},
        preference={"method": "dpo", "sources": [{"path": str(pairs), "license": "CC0-1.0"}], "val_fraction": 0.0,
                    "max_steps": 3, "micro_batch_size": 2, "learning_rate": 5e-3, "logging_steps": 1,
                    "eval_steps": 100, "save_steps": 100, "warmup_ratio": 0.0, "lr_scheduler": "constant"},
    )
    for key, value in sections.items():
        if isinstance(value, dict):
            doc.setdefault(key, {}).update(value)
        else:
            doc[key] = value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    """A prepared and SFT-trained tiny run with preference pairs (the preference stage not run yet)."""
    from llmtune.data.prepare import prepare
    from llmtune.train.sft import train

    tmp = tmp_path_factory.mktemp("pref")
    path = make_recipe(tmp)
    recipe = load_recipe(path)
    train(recipe, prepare(recipe))
    return path


def logits(model, ids):
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor([ids]), use_cache=False).logits


def test_dpo_on_the_sft_model_the_reference_is_the_adapter_disabled(sft_run, monkeypatch):
    import torch
    from datasets import load_from_disk
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from trl.trainer import dpo_trainer

    from llmtune.artifacts import PreparedPreference
    from llmtune.eval.evaluate import pair_logps, preference_scores
    from llmtune.models import resolve_base
    from llmtune.train.preference import train_preference

    def no_second_model(*args, **kwargs):
        raise AssertionError("DPOTrainer loaded a second copy of the model as reference")

    monkeypatch.setattr(dpo_trainer, "create_model_from_path", no_second_model)
    recipe = load_recipe(sft_run, ["preference.max_steps=12"])
    sft_bytes = (recipe.run_dir / "adapter" / "adapter_model.safetensors").read_bytes()
    result = train_preference(recipe)

    logged = [m for m in read_metrics(result.metrics) if "loss" in m]
    assert [m["step"] for m in logged] == list(range(1, 13))
    # Step 1 runs before any update: the new LoRA is zero, so policy == reference, and every implicit
    # reward is 0. A reference other than "the SFT model, preference adapter disabled" would not give 0.
    assert abs(logged[0]["rewards/chosen"]) < 1e-5 and abs(logged[0]["rewards/rejected"]) < 1e-5
    assert logged[-1]["rewards/margins"] > 0.5 and logged[-1]["loss"] < logged[0]["loss"]

    # The SFT adapter is kept, unchanged, as sft_adapter/; adapter/ is SFT + preference in one adapter.
    run = recipe.run_dir
    assert (run / "sft_adapter" / "adapter_model.safetensors").read_bytes() == sft_bytes
    marker = json.loads((run / "adapter" / "llmtune.json").read_text())
    assert marker == {"stage": "preference", "method": "dpo", "start_from": "sft", "before": "sft_adapter",
                      "preference_adapter": "preference/adapter", "combined": True}
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["r"] == 16  # 8 (SFT) + 8 (preference)
    base_dir = resolve_base(recipe.model.base)
    ids = [1, 9, 42, 7, 300, 5, 2]
    stacked = PeftModel.from_pretrained(
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(run / "sft_adapter")).merge_and_unload(),
        str(run / "preference" / "adapter"))
    combined = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(run / "adapter"))
    sft_only = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(run / "sft_adapter"))
    assert torch.allclose(logits(stacked, ids), logits(combined, ids), atol=1e-4)
    assert not torch.allclose(logits(sft_only, ids), logits(combined, ids), atol=1e-3)

    # The pairs are learned: the combined model prefers the chosen replies over the SFT model.
    pairs = load_from_disk(str(PreparedPreference.load(run).train_tokenized))
    before, after = pair_logps(sft_only, pairs), pair_logps(combined, pairs)
    scores = preference_scores(after, before, recipe.preference.beta)
    assert scores["reward_accuracy"] == 1.0 and scores["reward_margin"] > 0
    assert (run / "preference_curve.png").stat().st_size > 0
    assert list((run / "tensorboard" / "preference").glob("events.out.tfevents.*"))

    # A second preference run starts again from the SFT adapter, not from the combined one.
    again = train_preference(load_recipe(sft_run, ["preference.max_steps=1"]))
    assert again.before_adapter_dir == run / "sft_adapter"
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["r"] == 16


def test_preference_resume_continues_from_the_last_complete_checkpoint(sft_run):
    from llmtune.train.preference import train_preference

    recipe = load_recipe(sft_run, ["preference.max_steps=4", "preference.save_steps=2"])
    train_preference(recipe)
    ckpts = recipe.run_dir / "preference" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir() if p.name.startswith("checkpoint-")) == ["checkpoint-2", "checkpoint-4"]
    shutil.rmtree(ckpts / "checkpoint-4")  # a kill before step 4's checkpoint completed
    result = train_preference(load_recipe(sft_run, ["preference.max_steps=6", "preference.save_steps=2"]), resume=True)
    assert result.global_step == 6
    steps = [m["step"] for m in read_metrics(result.metrics) if "loss" in m]
    assert steps == [1, 2, 3, 4, 3, 4, 5, 6]


@pytest.mark.parametrize("method", ["kto", "orpo", "simpo"])
def test_kto_orpo_and_simpo_train_with_trls_trainers(sft_run, method, tmp_path):
    from llmtune.data.prepare import prepare
    from llmtune.train.preference import train_preference

    recipe = load_recipe(sft_run, [f"preference.method={method}", "preference.max_steps=2", f"output.name=pref-{method}"])
    sft_dir = load_recipe(sft_run).run_dir
    source = sft_dir / "sft_adapter" if (sft_dir / "sft_adapter").exists() else sft_dir / "adapter"
    shutil.copytree(source, recipe.run_dir / "adapter")  # the SFT adapter of the run (kept aside once DPO replaced adapter/)
    prepare(recipe)
    result = train_preference(recipe)
    logged = [m for m in read_metrics(result.metrics) if "loss" in m]
    assert len(logged) == 2 and all(m["loss"] == m["loss"] for m in logged)  # finite
    if method == "kto":
        assert "kl" in logged[0] and abs(logged[0].get("rewards/chosen", 0.0)) < 1e-5  # reference == policy at step 1
    else:
        assert "rewards/margins" in logged[0]  # reference-free: the policy's own (scaled) log-probs
    assert (result.adapter_dir / "adapter_config.json").exists()


def test_qlora_continues_the_sft_adapter_against_a_frozen_copy(tmp_path):
    import bitsandbytes as bnb

    from llmtune.data.prepare import prepare
    from llmtune.models import load_base_model, placement_for
    from llmtune.train.preference import train_preference
    from llmtune.train.sft import train

    path = make_recipe(tmp_path, quantization={"mode": "nf4"}, training={"max_steps": 2},
                       preference={"max_steps": 2})
    recipe = load_recipe(path)
    train(recipe, prepare(recipe))
    result = train_preference(recipe)
    logged = [m for m in read_metrics(result.metrics) if "loss" in m]
    assert abs(logged[0]["rewards/chosen"]) < 1e-5  # the frozen copy equals the policy before the first update
    config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert config["r"] == 8 and json.loads((result.adapter_dir / "llmtune.json").read_text())["combined"] is False
    assert not (result.adapter_dir / "ref").exists()  # only the trained adapter is the run's adapter
    base = load_base_model(recipe, placement_for(recipe))
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in base.modules())
    from peft import PeftModel

    assert any("lora_A" in n for n, _ in PeftModel.from_pretrained(base, str(result.adapter_dir)).named_parameters())


def test_llmtune_run_sft_then_dpo_then_eval_end_to_end(tmp_path):
    """The real CLI: prepare, train, preference, eval; eval measures before and after the stage."""
    path = make_recipe(tmp_path, stages=["prepare", "train", "preference", "eval"],
                       eval={"max_conversations": 2, "max_new_tokens": 6, "over_refusal": False, "red_team": False,
                             "compare_base": False},
                       preference={"val_fraction": 0.5})
    res = run_cli("run", str(path), timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    run = load_recipe(path).run_dir
    result = json.loads((run / "eval.json").read_text())
    assert result["base"] is None and result["sft"] is not None
    for column in ("sft", "finetuned"):
        assert {"preference_accuracy", "reward_margin", "slop_per_1k_words", "cross_reply_4gram_rate"} <= set(result[column]["metrics"])
    assert result["sft"]["metrics"]["reward_margin"] == 0.0  # the reference against itself
    report = (run / "report.md").read_text()
    assert "## Preference tuning" in report and "| metric | before preference | after preference | delta |" in report
    assert "preference accuracy (held-out pairs)" in report and "slop: stock phrases per 1,000 words" in report
    for png in ("preference_curve.png", "eval_preference.png"):
        assert (run / png).stat().st_size > 0 and png in report
    assert "preference" in res.stderr and "reference: the same weights with the preference adapter disabled" in res.stderr


def test_demo_recipe_validates_and_names_its_stages():
    recipe = load_recipe(REPO / "recipes" / "demo-dpo-cpu.yaml")
    assert recipe.stages[:3] == ["prepare", "train", "preference"] and recipe.preference.method == "dpo"
    assert recipe.model.base == "embedded:smollm2-135m-instruct"
    for src in recipe.preference.sources:
        assert recipe.resolve_path(src.path).exists() and src.license
