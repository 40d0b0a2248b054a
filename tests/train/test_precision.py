"""Training precision per machine (llmtune/hardware.py): the probe's rule, its cache, the recipe override, and a
bf16-autocast run that ends within 2% of the float32 run's eval loss."""

from __future__ import annotations

import pytest
import torch

from llmtune import hardware
from llmtune.config import load_recipe
from llmtune.data.prepare import prepare
from llmtune.train.sft import train
from tests.conftest import MEMORISE, write_conversations


@pytest.fixture
def tiny_config():
    from transformers import AutoConfig

    from llmtune.models import resolve_base

    return AutoConfig.from_pretrained(resolve_base("embedded:tiny-random-llama"))


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """A cache of its own, so no test sees a decision another test (or this machine) cached."""
    monkeypatch.setattr(hardware, "_cache_path", lambda: tmp_path / "hardware" / "precision.json")
    monkeypatch.setattr(hardware.os, "getloadavg", lambda: (0.0, 0.0, 0.0))  # an idle machine, unless a test says otherwise
    monkeypatch.setattr(hardware, "_DECIDED", {})


def decide(config, monkeypatch, fp32: float, bf16: float, native: bool = True):
    calls = []
    monkeypatch.setattr(hardware, "native_bf16", lambda: native)
    monkeypatch.setattr(hardware, "time_training_steps", lambda *a, **k: calls.append(k) or (fp32, bf16))
    return hardware.training_precision(config, lora_rank=8, tokens=256), calls


def test_bf16_only_where_it_measured_clearly_faster(tiny_config, monkeypatch):
    decision, calls = decide(tiny_config, monkeypatch, fp32=1.0, bf16=0.5)
    assert decision.autocast == "bfloat16" and "2.00x" in decision.reason and len(calls) == 1
    hardware._cache_path().unlink()
    decision, _ = decide(tiny_config, monkeypatch, fp32=1.0, bf16=0.95)  # 1.05x: under the 1.1x margin
    assert decision.autocast is None and "1.05x" in decision.reason
    hardware._cache_path().unlink()
    decision, _ = decide(tiny_config, monkeypatch, fp32=1.0, bf16=5.0)  # the lead's MiniLM case: bf16 slower
    assert decision.autocast is None and "0.20x" in decision.reason


def test_no_native_bf16_means_float32_without_probing(tiny_config, monkeypatch):
    decision, calls = decide(tiny_config, monkeypatch, fp32=1.0, bf16=0.1, native=False)
    assert decision.autocast is None and "no native bf16" in decision.reason and calls == []


def test_the_probe_is_cached_per_machine_and_shape(tiny_config, monkeypatch):
    first, calls = decide(tiny_config, monkeypatch, fp32=1.0, bf16=0.5)
    assert not first.cached and len(calls) == 1
    again = hardware.training_precision(tiny_config, lora_rank=8, tokens=256)
    assert again.cached and again.autocast == first.autocast and again.reason == first.reason and len(calls) == 1
    other_shape = hardware.training_precision(tiny_config, lora_rank=8, tokens=512)  # another batch shape: measured anew
    assert not other_shape.cached and len(calls) == 2


def test_a_probe_on_a_busy_machine_is_not_cached(tiny_config, monkeypatch):
    monkeypatch.setattr(hardware.os, "getloadavg", lambda: (9.0, 9.0, 9.0))
    first, calls = decide(tiny_config, monkeypatch, fp32=1.0, bf16=0.5)
    assert first.autocast == "bfloat16" and "not cached" in first.reason
    assert hardware.training_precision(tiny_config, lora_rank=8, tokens=256) == first  # the same process: once
    hardware._DECIDED.clear()  # a new process measures again
    hardware.training_precision(tiny_config, lora_rank=8, tokens=256)
    assert len(calls) == 2 and not hardware._cache_path().exists()


def test_the_recipe_overrides_the_probe(tiny_config, monkeypatch):
    monkeypatch.setattr(hardware, "time_training_steps", lambda *a, **k: pytest.fail("an explicit setting must not probe"))
    assert hardware.training_precision(tiny_config, lora_rank=8, tokens=64, requested="float32").autocast is None
    assert hardware.training_precision(tiny_config, lora_rank=8, tokens=64, requested="bfloat16").autocast == "bfloat16"
    assert hardware.training_precision(tiny_config, lora_rank=8, tokens=64, device="cuda").autocast is None


def test_the_real_probe_times_both_precisions(tiny_config):
    fp32, bf16 = hardware.time_training_steps(tiny_config, lora_rank=8, tokens=64, repeats=1)
    assert fp32 > 0 and bf16 > 0
    assert hardware.probe_config(tiny_config).num_hidden_layers == 2


def test_probe_config_keeps_the_head_share(tiny_config):
    cfg = tiny_config.__class__(**{**tiny_config.to_dict(), "num_hidden_layers": 30, "vocab_size": 49152})
    small = hardware.probe_config(cfg)
    assert small.num_hidden_layers == 2 and small.vocab_size == round(49152 * 2 / 30)


def test_placement_follows_training_autocast(tmp_path, tiny_recipe, monkeypatch):
    from llmtune.models import placement_for

    monkeypatch.setattr(hardware, "time_training_steps", lambda *a, **k: pytest.fail("an explicit setting must not probe"))
    data = write_conversations(tmp_path / "chats.jsonl", MEMORISE)
    bf16 = placement_for(load_recipe(tiny_recipe(source=data, training={"autocast": "bfloat16"})))
    assert bf16.autocast == torch.bfloat16 and bf16.dtype == torch.float32 and "recipe" in bf16.precision
    nf4 = placement_for(load_recipe(tiny_recipe(source=data, training={"autocast": "bfloat16"}, quantization={"mode": "nf4"})))
    assert nf4.compute_dtype == torch.bfloat16  # QLoRA's 4-bit matmuls follow the autocast dtype
    fp32 = placement_for(load_recipe(tiny_recipe(source=data, training={"autocast": "float32"})))
    assert fp32.autocast is None and fp32.compute_dtype == torch.float32


@pytest.mark.skipif(not hardware.native_bf16(), reason="bf16 autocast is emulated (far too slow) without AVX512-BF16/AMX")
def test_bf16_autocast_run_ends_within_two_percent_of_float32(tmp_path, tiny_recipe):
    """The same full-batch run in float32 and under bf16 autocast (fp32 master weights): the final eval loss,
    and the fp32 eval loss of the saved adapters, agree within 2%; the bf16 run really ran in bf16."""
    from tests.train.test_train_speed_equivalence import run_losses, token_weighted_eval_loss

    data = write_conversations(
        tmp_path / "chats.jsonl",
        MEMORISE + [[("user", f"Say {i}, please"), ("assistant", f"{i}, deckhand. " * (1 + i % 4))] for i in range(12)],
    )
    out = {}
    for autocast in ("float32", "bfloat16"):
        recipe = load_recipe(tiny_recipe(
            source=data, name=autocast, eval={"prompts": []},
            training={"max_steps": -1, "epochs": 6, "micro_batch_size": 16, "learning_rate": 1e-2, "eval_steps": 3,
                      "save_steps": 100, "seed": 7, "autocast": autocast},
        ))
        prepared = prepare(recipe)
        result = train(recipe, prepared)
        out[autocast] = (result, token_weighted_eval_loss(prepared, result.adapter_dir), run_losses(recipe.run_dir)[0])
    (fp32, fp32_loss, fp32_train), (bf16, bf16_loss, bf16_train) = out["float32"], out["bfloat16"]
    assert fp32_train[-1] < 0.8 * fp32_train[0]  # the loss moved
    assert bf16.final_eval_loss == pytest.approx(fp32.final_eval_loss, rel=0.02)
    assert bf16_loss == pytest.approx(fp32_loss, rel=0.02)
    assert bf16_train != fp32_train  # bf16 arithmetic leaves its trace: the runs are not bit-identical


@pytest.mark.skipif(not hardware.native_bf16(), reason="bf16 autocast is emulated (far too slow) without AVX512-BF16/AMX")
def test_qlora_under_bf16_autocast_keeps_fp32_master_weights(tmp_path, tiny_recipe):
    """QLoRA gets the same treatment: 4-bit matmuls in bf16 under autocast, the adapter trained and saved in fp32."""
    from safetensors.torch import load_file

    data = write_conversations(tmp_path / "chats.jsonl", MEMORISE)
    recipe = load_recipe(tiny_recipe(source=data, quantization={"mode": "nf4"},
                                     training={"max_steps": 3, "save_steps": 3, "autocast": "bfloat16"}))
    result = train(recipe, prepare(recipe))
    assert result.global_step == 3 and result.final_eval_loss is not None
    weights = load_file(str(result.adapter_dir / "adapter_model.safetensors"))
    assert weights and all(w.dtype == torch.float32 for w in weights.values())
    assert any(float(w.abs().sum()) > 0 for k, w in weights.items() if "lora_B" in k)  # it trained
