"""Multi-process training through accelerate: the launch command, the shipped engine configs, and
a real 2-process DDP run on the CPU (gloo) whose ranks must end with identical LoRA adapters."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from llmtune.distributed import free_port
from llmtune.errors import LlmtuneError
from llmtune.launch import ACCELERATE_CONFIGS, accelerate_command, launch_training, resolve_accelerate_config

REPO = Path(__file__).resolve().parents[2]


def test_launch_command_on_cpu_splits_the_cores():
    cmd, env = accelerate_command(["llmtune.cli", "train", "r.yaml", "lora.rank=8"], 2, cpu=True)
    assert cmd[1:3] == ["-m", "accelerate.commands.launch"]
    assert cmd[cmd.index("--num_processes") + 1] == "2" and "--multi_gpu" in cmd
    threads = max(1, len(os.sched_getaffinity(0)) // 2)
    assert env["OMP_NUM_THREADS"] == str(threads)
    assert cmd[cmd.index("--num_cpu_threads_per_process") + 1] == str(threads)
    assert cmd[cmd.index("-m", 3):] == ["-m", "llmtune.cli", "train", "r.yaml", "lora.rank=8"]


def test_launch_command_with_an_engine_config():
    cmd, _ = accelerate_command(["llmtune.cli", "train", "r.yaml"], 4, "fsdp-qlora", cpu=False)
    assert cmd[cmd.index("--config_file") + 1] == str(ACCELERATE_CONFIGS / "fsdp-qlora.yaml")
    assert "--multi_gpu" not in cmd and "--num_cpu_threads_per_process" not in cmd
    assert cmd[cmd.index("--num_processes") + 1] == "4"
    assert resolve_accelerate_config(ACCELERATE_CONFIGS / "zero3.yaml") == ACCELERATE_CONFIGS / "zero3.yaml"
    with pytest.raises(LlmtuneError, match="ddp, fsdp, fsdp-qlora, zero2, zero3"):
        resolve_accelerate_config("zero4")
    with pytest.raises(LlmtuneError, match="at least 1"):
        accelerate_command(["x"], 0)


def test_shipped_accelerate_configs_load_and_carry_what_each_engine_needs():
    from accelerate.commands.config.config_args import load_config_from_file

    configs = {p.stem: p for p in ACCELERATE_CONFIGS.glob("*.yaml")}
    assert set(configs) == {"ddp", "fsdp", "fsdp-qlora", "zero2", "zero3"}
    loaded = {name: load_config_from_file(str(path)) for name, path in configs.items()}
    assert loaded["ddp"].distributed_type.value == "MULTI_GPU"
    fsdp_qlora = loaded["fsdp-qlora"].fsdp_config
    assert loaded["fsdp-qlora"].distributed_type.value == "FSDP"
    assert fsdp_qlora["fsdp_cpu_ram_efficient_loading"] is True and fsdp_qlora["fsdp_sync_module_states"] is True
    assert fsdp_qlora["fsdp_use_orig_params"] is False
    assert "bnb_4bit_quant_storage" in configs["fsdp-qlora"].read_text()
    assert loaded["fsdp"].fsdp_config["fsdp_use_orig_params"] is True
    for name, stage in (("zero2", 2), ("zero3", 3)):
        assert loaded[name].distributed_type.value == "DEEPSPEED"
        ds_file = REPO / loaded[name].deepspeed_config["deepspeed_config_file"]
        ds = json.loads(ds_file.read_text())
        assert ds["zero_optimization"]["stage"] == stage
        assert ds["train_micro_batch_size_per_gpu"] == "auto" and ds["gradient_accumulation_steps"] == "auto"
    assert loaded["zero3"].deepspeed_config["zero3_init_flag"] is True


@pytest.mark.slow
@pytest.mark.multiproc
def test_two_process_ddp_on_cpu_keeps_the_adapters_identical(tmp_path):
    """A real 2-rank DDP training (gloo) of the tiny Llama with TRL + PEFT, launched by accelerate."""
    import torch
    from safetensors.torch import load_file

    cmd, env = accelerate_command(["tests.ddp_worker", str(tmp_path), "4"], 2, cpu=True,
                                  main_process_port=free_port())
    env["PYTHONPATH"] = str(REPO)
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stderr[-4000:]

    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2] and {r["backend"] for r in ranks} == {"gloo"}
    assert [r["global_step"] for r in ranks] == [4, 4]
    assert set(ranks[0]["batches"]).isdisjoint(ranks[1]["batches"]), "each rank trains on its own shard"
    assert all(r["threads"] == max(1, len(os.sched_getaffinity(0)) // 2) for r in ranks)

    a, b = (load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1))
    assert a.keys() == b.keys() and any("lora_B" in k for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert any(a[k].abs().sum() > 0 for k in a if "lora_B" in k), "training moved the adapter off its zero init"


@pytest.mark.slow
@pytest.mark.multiproc
def test_launch_training_runs_the_train_stage_on_two_processes(tiny_recipe):
    """`launch_training` end to end: `llmtune train` on 2 CPU ranks writes one adapter."""
    from tests.conftest import run_cli

    path = tiny_recipe(data={"val_fraction": 0.0}, training={"max_steps": 2, "save_steps": 2, "eval_steps": 2})
    assert run_cli("prepare", str(path)).returncode == 0
    assert launch_training(path, ["training.logging_steps=1"], 2) == 0
    run_dir = path.parent / "runs" / "tiny"
    assert (run_dir / "adapter" / "adapter_config.json").exists()
    assert (run_dir / "checkpoints" / "checkpoint-2").is_dir()
    assert yaml.safe_load((run_dir / "recipe.yaml").read_text())["training"]["logging_steps"] == 1
