"""Real TRL training steps on the tiny random Llama: LoRA, QLoRA (bitsandbytes 4-bit), resume."""

from __future__ import annotations

import json
import shutil

import pytest

from llmtune.config import load_recipe
from llmtune.data.prepare import prepare
from llmtune.artifacts import read_metrics
from llmtune.train.sft import train
from tests.conftest import MEMORISE, write_conversations

pytestmark = [pytest.mark.slow]


def losses(run_dir):
    return [m["loss"] for m in read_metrics(run_dir / "metrics.jsonl") if "loss" in m]


def test_lora_loss_falls_on_a_memorisation_set(tmp_path, tiny_recipe):
    data = write_conversations(tmp_path / "m.jsonl", MEMORISE)
    recipe = load_recipe(
        tiny_recipe(
            source=data,
            data={"val_fraction": 0.0},
            lora={"rank": 16, "alpha": 32},
            training={"max_steps": 40, "micro_batch_size": 4, "learning_rate": 3e-2, "save_steps": 100},
        )
    )
    result = train(recipe, prepare(recipe))
    curve = losses(recipe.run_dir)
    assert len(curve) == 40
    assert sum(curve[-3:]) / 3 < 0.5 * sum(curve[:3]) / 3, curve
    # The adapter is a PEFT adapter with the training template in its tokenizer.
    assert (result.adapter_dir / "adapter_config.json").exists()
    assert json.loads((result.adapter_dir / "adapter_config.json").read_text())["r"] == 16
    assert "<|im_start|>" in (result.adapter_dir / "chat_template.jinja").read_text()
    assert result.loss_curve.stat().st_size > 0
    assert list((recipe.run_dir / "tensorboard").glob("events.out.tfevents.*"))


def test_qlora_trains_real_4bit_layers(tmp_path, tiny_recipe):
    import bitsandbytes as bnb
    import torch
    from peft import PeftModel

    from llmtune.models import load_base_model, placement_for

    recipe = load_recipe(tiny_recipe(quantization={"mode": "nf4"}, training={"max_steps": 3, "save_steps": 3}))
    where = placement_for(recipe)
    # CPU: fp32 compute, or bf16 where training autocasts to it (measured per machine), never emulated bf16
    assert where.qlora and where.compute_dtype == (where.autocast or torch.float32)
    base = load_base_model(recipe, where)
    four_bit = [m for m in base.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert four_bit and four_bit[0].weight.quant_type == "nf4"

    result = train(recipe, prepare(recipe))
    assert result.global_step == 3 and result.final_eval_loss is not None
    assert len(losses(recipe.run_dir)) == 3
    model = PeftModel.from_pretrained(base, str(result.adapter_dir))
    assert any("lora_A" in n for n, _ in model.named_parameters())


def test_resume_continues_from_the_last_complete_checkpoint(tmp_path, tiny_recipe):
    path = tiny_recipe(training={"max_steps": 4, "save_steps": 2})
    recipe = load_recipe(path)
    prepared = prepare(recipe)
    train(recipe, prepared)
    ckpts = recipe.run_dir / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir() if p.name.startswith("checkpoint-")) == ["checkpoint-2", "checkpoint-4"]

    # A crash mid-save leaves only a staging directory, never a checkpoint-N that looks complete.
    shutil.rmtree(ckpts / "checkpoint-4")
    (ckpts / ".staging" / "checkpoint-6").mkdir(parents=True)
    (ckpts / ".staging" / "checkpoint-6" / "adapter_model.safetensors").write_bytes(b"half")

    longer = load_recipe(path, ["training.max_steps=6"])
    result = train(longer, prepared, resume=True)
    assert result.global_step == 6
    steps = [m["step"] for m in read_metrics(recipe.run_dir / "metrics.jsonl") if "loss" in m]
    # First run logged 1..4; the resumed run restarts after checkpoint-2: 3..6.
    assert steps == [1, 2, 3, 4, 3, 4, 5, 6]
    state = json.loads((ckpts / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["global_step"] == 6
    assert not (ckpts / ".staging").exists()


def test_without_resume_old_checkpoints_are_replaced(tmp_path, tiny_recipe):
    recipe = load_recipe(tiny_recipe(training={"max_steps": 2, "save_steps": 2}))
    prepared = prepare(recipe)
    train(recipe, prepared)
    train(recipe, prepared)
    steps = [m["step"] for m in read_metrics(recipe.run_dir / "metrics.jsonl") if "loss" in m]
    assert steps == [1, 2]


@pytest.mark.parametrize("mask", ["assistant", "last"])
def test_only_masked_tokens_carry_loss_in_the_trainer_batches(tmp_path, tiny_recipe, mask):
    from datasets import load_from_disk

    recipe = load_recipe(tiny_recipe(data={"mask": mask}))
    p = prepare(recipe)
    ds = load_from_disk(str(p.train_tokenized))
    assert set(ds.column_names) == {"input_ids", "labels"}
    for ids, labels in zip(ds["input_ids"], ds["labels"]):
        trained = [l for l in labels if l != -100]
        assert trained and all(l == i for i, l in zip(ids, labels) if l != -100)
        assert labels[0] == -100  # the system prompt never carries loss
