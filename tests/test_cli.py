"""End to end through the real `llmtune` command: run, eval --json, executable recipes, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import run_cli


@pytest.mark.slow
def test_run_end_to_end_writes_a_complete_run_directory(tmp_path, tiny_recipe):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    path = tiny_recipe(training={"max_steps": 6, "save_steps": 3, "eval_steps": 3, "learning_rate": 1e-2})
    # f16 only: a tiny random model's near-uniform logits make q8_0's top-1 agreement a coin toss
    # (tests/export/test_gguf.py checks q8_0 and Q4_K_M on the embedded SmolLM2).
    res = run_cli("run", str(path), "training.seed=7", "export.gguf_types=[f16]")
    assert res.returncode == 0, res.stderr[-3000:]
    run_dir = tmp_path / "runs" / "tiny"
    for name in ("recipe.yaml", "report.md", "loss_curve.png", "eval.json", "metrics.jsonl", "samples.jsonl",
                 "data/train.jsonl", "data/val.jsonl", "data/quarantine.jsonl", "data/data_report.md",
                 "adapter/adapter_config.json", "checkpoints/checkpoint-6/trainer_state.json"):
        assert (run_dir / name).exists(), name
    resolved = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    assert resolved["training"]["seed"] == 7 and resolved["lora"]["rank"] == 8
    result = json.loads((run_dir / "eval.json").read_text())
    assert result["finetuned"]["eval_loss"] < result["base"]["eval_loss"]
    assert len(result["finetuned"]["replies"]) == 1
    report = (run_dir / "report.md").read_text()
    assert "| eval loss |" in report and "fine-tune" in report
    assert "done: run directory" in res.stderr and str(run_dir) in res.stderr.replace("\n", "")
    samples = [json.loads(l) for l in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert {s["step"] for s in samples} == {3, 6}

    base = AutoModelForCausalLM.from_pretrained(json.loads((run_dir / "adapter/adapter_config.json").read_text())["base_model_name_or_path"])
    PeftModel.from_pretrained(base, str(run_dir / "adapter"))

    # eval on the run directory, as JSON on stdout.
    res = run_cli("eval", str(run_dir), "--json")
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads(res.stdout)["finetuned"]["eval_loss"] == result["finetuned"]["eval_loss"]


@pytest.mark.slow
def test_stage_commands_and_train_without_prepare(tmp_path, tiny_recipe):
    path = tiny_recipe(training={"max_steps": 2})
    res = run_cli("train", str(path))
    assert res.returncode == 2 and "run `llmtune prepare" in res.stderr
    assert run_cli("prepare", str(path)).returncode == 0
    res = run_cli("train", str(path))
    assert res.returncode == 0, res.stderr[-2000:]
    assert (tmp_path / "runs" / "tiny" / "adapter" / "adapter_config.json").exists()


@pytest.mark.slow
def test_recipe_files_are_executable_scripts(tmp_path, tiny_recipe):
    path = tiny_recipe(stages=["prepare"])
    path.write_text("#!/usr/bin/env -S llmtune run\n" + path.read_text())
    path.chmod(0o755)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    res = subprocess.run([str(path), "data.val_fraction=0.5"], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "prepare: read 12" in res.stderr.replace("\n", " ")


@pytest.mark.slow
def test_offline_hub_id_says_how_to_use_a_local_directory(tiny_recipe):
    path = tiny_recipe(model={"base": "some-org/some-model"})
    res = run_cli("prepare", str(path), env={"HF_HUB_OFFLINE": "1"})
    assert res.returncode == 2
    err = " ".join(res.stderr.split())
    assert "some-org/some-model" in err and "model.base: ./models/some-model" in err
    assert "Traceback" not in res.stderr


def test_missing_local_model_dir_and_unknown_embedded(tiny_recipe):
    res = run_cli("prepare", str(tiny_recipe(model={"base": "./no/such/dir"})))
    assert res.returncode == 2 and "does not exist" in res.stderr
    res = run_cli("prepare", str(tiny_recipe(model={"base": "embedded:nope"})))
    assert res.returncode == 2 and "embedded:smollm2-135m-instruct" in res.stderr


@pytest.mark.slow
def test_every_command_has_help_with_an_example():
    for cmd in ("run", "prepare", "train", "eval", "validate", "models"):
        res = run_cli(cmd, "--help")
        assert res.returncode == 0 and "Example" in res.stdout, cmd
