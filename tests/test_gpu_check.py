"""bench/gpu_check.py (issue 21): the plan a GPU run follows, the commands it builds, the report it writes,
and its cheapest rehearsal step for real. The GPU run itself is a bench script, never a test."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import gpu_check  # noqa: E402


def test_gpu_plan_fits_nine_minutes_at_the_issue_shapes(tmp_path):
    from llmtune.config import load_recipe
    from llmtune.estimate import estimate
    from llmtune.estimate.arch import shipped_configs

    plan = gpu_check.make_plan(rehearse=False, work=str(tmp_path))
    assert plan.device == "cuda" and plan.seq == 2048
    assert plan.budget_s <= gpu_check.TOTAL_BUDGET_S <= 540
    assert [s.name for s in plan.steps] == ["memory", "speed", "equal", "serve"]
    cases = next(s for s in plan.steps if s.name == "memory").spec["cases"]
    assert {c["hub_id"] for c in cases} == {"Qwen/Qwen2.5-7B-Instruct", "meta-llama/Llama-3.2-3B-Instruct"}
    for case in cases:
        assert "24gb" in case["recipe"] and case["hub_id"] in shipped_configs()
        recipe = load_recipe(REPO / case["recipe"], [*case["overrides"], f"training.max_steps={case['steps']}"])
        # QLoRA r16, NF4, bf16 compute, sequence 2048, the 24 GB tier's micro-batch (3 for 7B, 5 for 3B)
        assert recipe.lora.rank == 16 and recipe.quantization.mode == "nf4"
        assert recipe.quantization.compute_dtype == "bfloat16" and recipe.data.max_seq_length == 2048
        assert recipe.training.micro_batch_size == (3 if "7b" in case["recipe"] else 5)
        est = estimate(recipe, 24)  # what the run compares against, computable with no GPU
        assert 0 < est.torch_allocated_bytes <= est.peak_bytes < 24 * 2**30
    rehearsal = gpu_check.make_plan(rehearse=True, work=str(tmp_path))
    assert rehearsal.device == "cpu" and rehearsal.seq < 2048
    assert [s.name for s in rehearsal.steps] == [s.name for s in plan.steps]


def test_rehearsal_shapes_keep_the_architecture(tmp_path):
    for _, _, hub in gpu_check.MEMORY_CASES:
        full, small = gpu_check.model_config(hub, False), gpu_check.model_config(hub, True)
        assert small["model_type"] == full["model_type"] and small["vocab_size"] == full["vocab_size"]
        assert small["num_hidden_layers"] == 2 < full["num_hidden_layers"]


def test_trl_sft_command_has_the_recipes_hyper_parameters(tmp_path):
    from trl.scripts.sft import make_parser

    plan = gpu_check.make_plan(rehearse=False, work=str(tmp_path))
    spec = next(s for s in plan.steps if s.name == "speed").spec
    cmd = gpu_check.trl_command(asdict(plan), spec, tmp_path / "model", tmp_path / "out", liger=True)
    assert cmd[1] == "sft"
    at = cmd.index("--bf16")
    assert cmd[at + 1] == "True"  # on the GPU; SFTConfig refuses bf16 without one, so parse it as a CPU run here
    args = [*cmd[2:at], "--bf16", "False", *cmd[at + 2:], "--use_cpu", "True"]
    # TRL's own parser accepts every flag (an unknown one would fail the GPU run after minutes).
    script, sft, model, *_ = make_parser().parse_args_and_config(args)
    assert (model.lora_r, model.lora_alpha, model.load_in_4bit, model.bnb_4bit_quant_type) == (16, 32, True, "nf4")
    assert model.use_bnb_nested_quant and model.dtype == "bfloat16" and model.use_peft
    assert (sft.per_device_train_batch_size, sft.max_length, sft.learning_rate) == (5, 2048, 2e-4)
    assert sft.packing and sft.gradient_checkpointing and sft.use_liger_kernel
    assert sft.optim == "paged_adamw_8bit" and sft.lr_scheduler_type == "cosine"


def test_a_step_past_its_time_box_is_stopped_and_recorded(tmp_path):
    import time

    plan = gpu_check.make_plan(rehearse=True, work=str(tmp_path))
    step = next(s for s in plan.steps if s.name == "equal")
    start = time.time()
    result = gpu_check.run_child(plan, step, timeout=2, log_path=tmp_path / "equal.log")
    assert "timed out after 2s" in result["error"] and time.time() - start < 30


def test_report_table_shows_figures_and_failures(tmp_path):
    report = {
        "rehearsal": False, "started": "2026-12-01T00:00:00Z", "seconds": 500.0,
        "plan": {"seq": 2048},
        "environment": {"device": "NVIDIA H200", "device_memory_gib": 139.8, "driver": "580.1", "cuda": "13.0",
                        "torch": "2.11.0", "transformers": "5.17.0", "trl": "1.16.0", "peft": "0.21.2",
                        "bitsandbytes": "0.50.2", "vllm": None, "liger_kernel": "0.7.0"},
        "steps": {
            "memory": {"qwen2.5-7b": {"micro_batch": 3, "max_allocated_mib": 10000.0, "predicted_allocated_mib": 10500.0,
                                      "allocated_error_pct": 5.0, "max_reserved_mib": 11000.0, "predicted_peak_mib": 12000.0,
                                      "step_seconds": 2.0},
                       "llama3.2-3b": {"error": "OutOfMemoryError: CUDA out of memory"}},
            "speed": {"error": "timed out after 150s (time box)"},
            "equal": {"device": "cuda", "dtype": "bfloat16",
                      "packed_attention": {"loss_rel_diff": 0.001, "loss_within_1pct": True, "grad_rel_err_max": 0.01,
                                           "grad_tolerance": 0.05, "grads_within_tol": True}},
            "serve": {"error": "not importable here: vllm"},
        },
    }
    text = gpu_check.markdown(report)
    assert "NVIDIA H200" in text and "580.1" in text and "10000 MiB measured, 10500 MiB predicted (+5.0%" in text
    assert "CUDA out of memory" in text and "timed out after 150s" in text and "not importable here: vllm" in text
    assert "loss diff 0.100% (ok)" in text
    paths = gpu_check.write_report(report, tmp_path / "out", docs=False)
    assert json.loads(paths[0].read_text())["steps"]["memory"]["qwen2.5-7b"]["allocated_error_pct"] == 5.0
    assert not (tmp_path / "docs").exists()


@pytest.mark.slow
def test_rehearsal_equality_step_runs_and_writes_only_its_out_dir(tmp_path):
    docs_before = (REPO / "docs" / "gpu.md").read_text()
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu_check.py"), "--rehearse", "--only", "equal",
         "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=180, cwd=REPO, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "REHEARSAL" in proc.stdout
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert report["rehearsal"] and set(report["steps"]) == {"equal"}
    eq = report["steps"]["equal"]
    assert eq["device"] == "cpu" and "no CUDA" in eq["note"]  # says what it skipped
    for key in ("packed_attention", "packed_chunked"):
        assert eq[key]["loss_within_1pct"] and eq[key]["grads_within_tol"], eq[key]
    assert (REPO / "docs" / "gpu.md").read_text() == docs_before  # a rehearsal never writes docs/

