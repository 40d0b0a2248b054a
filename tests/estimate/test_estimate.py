"""The memory estimator: shipped recipes fit their tiers offline, breakdowns add up, suggestions
help, `llmtune estimate --json`, and predictions against real measured training steps."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer
import yaml
from typer.testing import CliRunner

from llmtune.config import Recipe, load_recipe
from llmtune.errors import ModelError
from llmtune.estimate import estimate, estimate_command, load_arch
from llmtune.estimate.arch import shipped_configs
from llmtune.estimate.memory import GiB, usable_bytes

REPO = Path(__file__).resolve().parents[2]
GPU_RECIPES = sorted((REPO / "recipes").glob("*-qlora-*gb.yaml"))
MODELS = {
    "llama3.2-1b": "meta-llama/Llama-3.2-1B-Instruct",
    "llama3.2-3b": "meta-llama/Llama-3.2-3B-Instruct",
    "qwen2.5-1.5b": "Qwen/Qwen2.5-1.5B-Instruct",
    "qwen2.5-3b": "Qwen/Qwen2.5-3B-Instruct",
    "qwen2.5-7b": "Qwen/Qwen2.5-7B-Instruct",
    "mistral-7b-v0.3": "mistralai/Mistral-7B-Instruct-v0.3",
    "gemma2-2b": "google/gemma-2-2b-it",
}


def tier_of(path: Path) -> int:
    return int(re.search(r"-(\d+)gb$", path.stem).group(1))


def load_bench():
    spec = importlib.util.spec_from_file_location("estimate_validation", REPO / "bench" / "estimate_validation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def recipe_from(doc: dict) -> Recipe:
    return Recipe.model_validate({"name": "t", "data": {"sources": [{"path": "x.jsonl"}]}, **doc})


# ---------------------------------------------------------------------------------------------
# Shipped architectures and recipes


@pytest.mark.parametrize(
    ("hub_id", "billions"),
    [
        ("meta-llama/Llama-3.2-1B-Instruct", 1.236),
        ("meta-llama/Llama-3.2-3B-Instruct", 3.213),
        ("Qwen/Qwen2.5-1.5B-Instruct", 1.544),
        ("Qwen/Qwen2.5-3B-Instruct", 3.086),
        ("Qwen/Qwen2.5-7B-Instruct", 7.616),
        ("mistralai/Mistral-7B-Instruct-v0.3", 7.248),
        ("google/gemma-2-2b-it", 2.614),
    ],
)
def test_shipped_architectures_have_the_published_parameter_counts(hub_id, billions):
    arch = load_arch(hub_id)
    assert arch.total_params() / 1e9 == pytest.approx(billions, rel=0.005)
    assert arch.source.startswith("llmtune/archs/")


def test_every_model_has_recipes_for_the_tiers_it_fits():
    tiers: dict[str, list[int]] = {}
    for path in GPU_RECIPES:
        slug = path.stem.rsplit("-qlora-", 1)[0]
        tiers.setdefault(slug, []).append(tier_of(path))
    assert set(tiers) == set(MODELS)
    for slug, found in tiers.items():
        assert {12, 16, 24} <= set(found), slug
    # The only tier left out: a 7B Qwen with its fp32 152k-token embeddings does not fit 8 GB.
    assert sorted(tiers["qwen2.5-7b"]) == [12, 16, 24]
    assert estimate(load_recipe(REPO / "recipes/qwen2.5-7b-qlora-12gb.yaml", ["data.max_seq_length=512"]), 8).fits is False


@pytest.mark.parametrize("path", GPU_RECIPES, ids=lambda p: p.stem)
def test_recipe_validates_estimates_offline_and_fits_its_tier(path):
    text = path.read_text()
    assert text.startswith("#!/usr/bin/env -S llmtune run\n")
    assert path.stat().st_mode & 0o111, "recipes are executable scripts"
    assert "Does not fit?" in text and "tokens/s" in text and "Needs:" in text
    recipe = load_recipe(path)
    assert recipe.name == path.stem
    slug = path.stem.rsplit("-qlora-", 1)[0]
    assert recipe.model.base == MODELS[slug]
    assert recipe.model.chat_template is None and recipe.model.dtype == "bfloat16"
    assert recipe.quantization.mode == "nf4" and recipe.quantization.compute_dtype == "bfloat16"
    assert recipe.lora.target_modules == "all-linear"
    assert recipe.training.gradient_checkpointing and recipe.training.optim == "paged_adamw_8bit"
    assert recipe.resolve_path(recipe.data.sources[0].path).exists()
    if "gemma" in slug:
        assert recipe.model.attn_implementation == "eager"

    tier = tier_of(path)
    est = estimate(recipe, tier)
    assert est.fits is True, (est.peak_bytes / GiB, tier)
    assert est.peak_bytes <= usable_bytes(tier) <= tier * GiB
    assert sum(est.breakdown.values()) == est.peak_bytes
    assert est.breakdown["quantized_weights"] > 0 and est.breakdown["cuda_context"] > 0
    assert not est.suggestions


def test_bigger_tiers_train_more_tokens_per_step():
    for slug in MODELS:
        paths = sorted((p for p in GPU_RECIPES if p.stem.startswith(slug + "-qlora-")), key=tier_of)
        tokens = [load_recipe(p).training.micro_batch_size * load_recipe(p).data.max_seq_length for p in paths]
        assert tokens == sorted(tokens), slug
        assert tokens[-1] > tokens[0], slug


def test_estimating_needs_neither_torch_nor_transformers_nor_a_hub(tmp_path):
    code = (
        "import sys; from llmtune.config import load_recipe; from llmtune.estimate import estimate\n"
        "import glob\n"
        "for p in sorted(glob.glob('recipes/*-qlora-*gb.yaml')):\n"
        "    estimate(load_recipe(p), 24)\n"
        "print(sorted(m for m in ('torch', 'transformers', 'huggingface_hub') if m in sys.modules))\n"
    )
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "LLMTUNE_CACHE": str(tmp_path / "empty-cache"),
           "PYTHONPATH": str(REPO)}
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, env=env, timeout=60,
                         check=False)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"


def test_embedded_and_local_models_read_their_config(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMTUNE_CACHE", str(tmp_path / "no-cache"))  # not built: the shipped shape
    arch = load_arch("embedded:smollm2-135m-instruct")
    assert (arch.hidden, arch.layers, arch.vocab) == (576, 30, 49152) and "llmtune/archs" in arch.source
    config = dict(shipped_configs()["mistralai/Mistral-7B-Instruct-v0.3"][0], num_hidden_layers=2)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    local = load_arch(str(tmp_path / "m"))
    assert local.layers == 2 and local.source.endswith("config.json")
    with pytest.raises(ModelError, match="no architecture config for `some/model` offline"):
        load_arch("some/model")
    with pytest.raises(ModelError, match="unknown embedded model"):
        load_arch("embedded:nope")


# ---------------------------------------------------------------------------------------------
# The model of memory


def qlora_doc(**training) -> dict:
    return {
        "model": {"base": "mistralai/Mistral-7B-Instruct-v0.3", "dtype": "bfloat16"},
        "quantization": {"mode": "nf4", "compute_dtype": "bfloat16"},
        "training": {"micro_batch_size": 1, "gradient_checkpointing": True, "optim": "paged_adamw_8bit", **training},
    }


def test_parts_scale_the_way_the_mechanics_say():
    base = estimate(recipe_from(qlora_doc()), None)
    # NF4 with double quant: ~0.516 bytes per linear weight.
    linear = 32 * (4096 * 4096 * 2 + 4096 * 1024 * 2 + 3 * 4096 * 14336)
    assert base.breakdown["quantized_weights"] / linear == pytest.approx(0.5 + 1 / 64 + 4 / 16384, rel=0.01)
    # fp32 embeddings and lm_head after prepare_model_for_kbit_training (untied: two of them).
    assert base.breakdown["unquantized_weights"] >= 2 * 32768 * 4096 * 4
    no_dq = estimate(recipe_from({**qlora_doc(), "quantization": {"mode": "nf4", "double_quant": False}}), None)
    assert no_dq.breakdown["quantized_weights"] > base.breakdown["quantized_weights"]
    # 8-bit AdamW: ~2 bytes per LoRA parameter. torch AdamW keeps two states in the parameter's dtype:
    # bf16 for QLoRA adapters (TRL casts them), fp32 for LoRA on a bf16 base.
    n_lora = base.breakdown["lora_params"] // 2
    assert base.breakdown["optimizer_states"] / n_lora == pytest.approx(2 + 8 / 256, rel=0.01)
    torch_adam = estimate(recipe_from(qlora_doc(optim="adamw_torch")), None)
    assert torch_adam.breakdown["optimizer_states"] == 4 * n_lora
    lora_bf16 = estimate(recipe_from({**qlora_doc(optim="adamw_torch"), "quantization": {"mode": "none"}}), None)
    assert lora_bf16.breakdown["optimizer_states"] == 8 * n_lora
    # Checkpointing, longer sequences, larger rank: each costs memory.
    no_ckpt = estimate(recipe_from(qlora_doc(gradient_checkpointing=False)), None)
    assert no_ckpt.breakdown["activations"] > 5 * base.breakdown["activations"]
    longer = estimate(recipe_from({**qlora_doc(), "data": {"sources": [{"path": "x"}], "max_seq_length": 4096}}), None)
    assert longer.peak_bytes > base.peak_bytes
    rank64 = estimate(recipe_from({**qlora_doc(), "lora": {"rank": 64}}), None)
    assert rank64.breakdown["lora_params"] == 4 * base.breakdown["lora_params"]
    # A CPU run: fp32, no CUDA context.
    cpu = estimate(recipe_from({"model": {"base": "embedded:smollm2-135m-instruct"}}), None, device="cpu")
    assert "cuda_context" not in cpu.breakdown and cpu.breakdown["unquantized_weights"] > 134e6 * 4


@pytest.mark.parametrize("path", GPU_RECIPES[:3] + [REPO / "recipes" / "demo-cpu.yaml"], ids=lambda p: p.stem)
def test_breakdown_sums_to_the_peak_on_every_device(path):
    recipe = load_recipe(path)
    for device in ("cuda", "cpu"):
        est = estimate(recipe, 8, device=device)
        assert sum(est.breakdown.values()) == est.peak_bytes
        assert all(v >= 0 for v in est.breakdown.values())


def test_suggestions_make_a_recipe_fit_step_by_step():
    path = REPO / "recipes" / "qwen2.5-7b-qlora-24gb.yaml"
    overrides = ["training.micro_batch_size=8", "training.gradient_checkpointing=false", "data.max_seq_length=2048"]
    recipe = load_recipe(path, overrides)
    est = estimate(recipe, 16)
    assert est.fits is False and est.suggestions
    peaks = [est.peak_bytes] + [s.peak_bytes for s in est.suggestions]
    assert peaks == sorted(peaks, reverse=True) and len(set(peaks)) == len(peaks)
    assert est.suggestions[-1].fits and not any(s.fits for s in est.suggestions[:-1])
    order = ["micro_batch_size", "gradient_checkpointing", "max_seq_length", "lora.rank", "quantization", "optim"]
    ranks = [next(i for i, key in enumerate(order) if key in s.change) for s in est.suggestions]
    assert ranks == sorted(ranks) and ranks[0] == 0
    # Each suggestion is a real override: applying them reproduces the predicted peak.
    applied = list(overrides)
    for s in est.suggestions:
        applied += s.change.split()
        assert estimate(load_recipe(path, applied), 16).peak_bytes == s.peak_bytes
    # The first change keeps the effective batch.
    first = dict(kv.split("=") for kv in est.suggestions[0].change.split())
    assert int(first["training.micro_batch_size"]) * int(first["training.gradient_accumulation_steps"]) == 8


def test_a_recipe_that_cannot_fit_says_so():
    est = estimate(load_recipe(REPO / "recipes" / "qwen2.5-7b-qlora-12gb.yaml"), 4)
    assert est.fits is False
    assert not est.suggestions or not est.suggestions[-1].fits


# ---------------------------------------------------------------------------------------------
# The command


@pytest.fixture
def cli():
    app = typer.Typer()
    app.command("estimate")(estimate_command)
    app.command("noop")(lambda: None)  # two commands: typer keeps `estimate` as a subcommand, as in llmtune's app
    return lambda *args: CliRunner().invoke(app, ["estimate", *args])


def test_json_output_shape(cli):
    res = cli(str(REPO / "recipes" / "llama3.2-1b-qlora-8gb.yaml"), "--gpu-mem", "8", "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert {"peak_bytes", "fits", "breakdown"} <= set(doc)
    assert doc["fits"] is True and isinstance(doc["peak_bytes"], int)
    assert sum(doc["breakdown"].values()) == doc["peak_bytes"]
    assert {"quantized_weights", "unquantized_weights", "lora_params", "optimizer_states", "gradients",
            "activations", "logits_loss", "cuda_context", "allocator_overhead"} <= set(doc["breakdown"])

    res = cli(str(REPO / "recipes" / "llama3.2-1b-qlora-8gb.yaml"), "training.micro_batch_size=8", "--gpu-mem", "8",
              "--json")
    doc = json.loads(res.stdout)
    assert doc["fits"] is False and doc["suggestions"][0]["change"].startswith("training.micro_batch_size=")


def test_table_output_and_errors(cli, tmp_path):
    res = cli(str(REPO / "recipes" / "mistral-7b-v0.3-qlora-16gb.yaml"), "--gpu-mem", "16")
    assert res.exit_code == 0, res.output
    for text in ("quantized weights", "activations", "CUDA context", "peak", "fits"):
        assert text in res.stdout
    res = cli(str(REPO / "recipes" / "mistral-7b-v0.3-qlora-16gb.yaml"), "training.micro_batch_size=16", "--gpu-mem", "8")
    assert "does not fit" in res.stdout and "Try, in this order" in res.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"name": "b", "model": {"base": "acme/unknown-7b"}, "data": {"sources": [{"path": "x"}]}}))
    res = cli(str(bad), "--gpu-mem", "8")
    assert res.exit_code == 2 and "no architecture config for `acme/unknown-7b`" in res.output


# ---------------------------------------------------------------------------------------------
# Against measurements


def recorded_cpu_rows() -> list[tuple[str, float]]:
    """(case, measured MiB) from the table in docs/memory.md."""
    text = (REPO / "docs" / "memory.md").read_text()
    section = text.split("<!-- cpu-table -->")[1].split("<!-- /cpu-table -->")[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 4 and cells[1].isdigit():
            rows.append((cells[0], float(cells[2])))
    return rows


def test_estimates_stay_within_15_percent_of_the_recorded_cpu_measurements():
    bench = load_bench()
    cases = {c["label"]: c for c in bench.CPU_CASES}
    rows = recorded_cpu_rows()
    assert len(rows) >= 10 and {r[0] for r in rows} == set(cases)
    for label, measured_mib in rows:
        case = cases[label]
        predicted, _ = bench.predict_cpu(bench.case_recipe(case, 2), case.get("autocast", False))
        assert abs(predicted / 2**20 - measured_mib) / measured_mib <= 0.15, (label, predicted / 2**20, measured_mib)


@pytest.mark.slow
def test_estimate_matches_a_real_cpu_training_step_measured_now():
    """Two real TRL steps of the tiny Llama, peak live bytes from torch's allocator (profiler)."""
    bench = load_bench()
    case = {"label": "tiny", "base": "embedded:tiny-random-llama", "b": 2, "s": 96, "r": 8, "drop": 0.05}
    recipe = bench.case_recipe(case, 2)
    predicted, _ = bench.predict_cpu(recipe)
    measured = bench.run_child("cpu", {"recipe": recipe, "profile": True}, timeout=300)["peak_allocated"]
    assert abs(predicted - measured) / measured <= 0.15, (predicted, measured)


def test_auto_gradient_checkpointing_turns_on_only_when_memory_demands_it():
    from llmtune.estimate.memory import checkpointing_decision, estimate
    from llmtune.train.sft import resolve_checkpointing

    demo = load_recipe(REPO / "recipes/demo-cpu.yaml")
    assert demo.training.gradient_checkpointing == "auto"  # the default
    on, why = checkpointing_decision(demo, "cpu", 64 * 2**30)
    assert not on and why.startswith("off (auto: estimated peak")
    on, why = checkpointing_decision(demo, "cpu", 2**30)  # a machine too small for it
    assert on and why.startswith("on (auto")

    big = load_recipe(REPO / "recipes/qwen2.5-7b-qlora-16gb.yaml")
    assert resolve_checkpointing(big, "cuda") == (True, "on")  # an explicit setting is kept, no estimate made
    auto = big.model_copy(update={"training": big.training.model_copy(update={"gradient_checkpointing": "auto"})})
    assert checkpointing_decision(auto, "cuda", 16 * 2**30)[0]
    est = estimate(auto, 16.0)
    assert est.fits and any("auto turns checkpointing on" in n for n in est.notes)
    assert est.peak_bytes == estimate(big, 16.0).peak_bytes  # what training will do: checkpoint

    unknown = demo.model_copy(update={"model": demo.model.model_copy(update={"base": "/nonexistent/model"})})
    on, why = checkpointing_decision(unknown, "cpu", 2**30)
    assert not on and "no memory estimate" in why


# ---------------------------------------------------------------------------------------------
# The preference stage


def preference_recipe(path: Path, **preference) -> Recipe:
    doc = load_recipe(path).model_dump(mode="json")  # the resolved recipe (GPU recipes extend recipes/base/)
    doc["preference"] = {"sources": [{"path": "pairs.jsonl"}], **preference}
    doc["stages"] = ["prepare", "train", "preference", "eval"]
    return Recipe.model_validate(doc)


def test_preference_stage_estimate_follows_its_batches():
    path = REPO / "recipes/qwen2.5-7b-qlora-16gb.yaml"
    dpo = estimate(preference_recipe(path, micro_batch_size=1), 16.0, stage="preference")
    assert "preference: dpo" in dpo.recipe and any("adapter disabled" in n for n in dpo.notes)
    assert sum(dpo.breakdown.values()) == dpo.peak_bytes
    bigger = estimate(preference_recipe(path, micro_batch_size=4), 16.0, stage="preference")
    assert bigger.breakdown["activations"] > 2 * dpo.breakdown["activations"]
    kto = estimate(preference_recipe(path, micro_batch_size=1, method="kto"), 16.0, stage="preference")
    assert kto.breakdown["activations"] < dpo.breakdown["activations"]  # one sequence per row, not two
    orpo = estimate(preference_recipe(path, micro_batch_size=1, method="orpo"), 16.0, stage="preference")
    assert orpo.breakdown["logits_loss"] > dpo.breakdown["logits_loss"]  # full logits, not TRL's fused head
    # QLoRA on top of SFT keeps TRL's frozen copy of the adapter for DPO/KTO; from the base it does not.
    base = estimate(preference_recipe(path, micro_batch_size=1, start_from="base"), 16.0, stage="preference")
    assert dpo.breakdown["lora_params"] == 2 * base.breakdown["lora_params"]
    # The suggestions speak of the stage's own keys.
    tight = estimate(preference_recipe(path, micro_batch_size=8), 8.0, stage="preference")
    assert tight.suggestions and tight.suggestions[0].change.startswith("preference.micro_batch_size=")


def test_estimate_command_prints_the_preference_stage(cli):
    from llmtune.estimate.memory import checkpointing_decision

    path = REPO / "recipes/demo-dpo-cpu.yaml"
    res = cli(str(path), "--json", "--device", "cpu")
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["recipe"] == "demo-dpo-cpu" and out["preference"]["recipe"] == "demo-dpo-cpu (preference: dpo)"
    assert out["preference"]["peak_bytes"] > 0
    res = cli(str(path), "--device", "cpu")
    assert res.exit_code == 0 and "demo-dpo-cpu (preference: dpo)" in res.output
    on, why = checkpointing_decision(load_recipe(path), "cpu", 64 * 2**30, "preference")
    assert not on and "estimated peak" in why


@pytest.mark.slow
def test_preference_estimate_bounds_a_measured_dpo_run(tmp_path):
    """Two real DPO steps of the tiny Llama under torch's profiler: the prediction is an upper bound
    (it scores every token; DPO scores the replies only) and not a wild one."""
    import random

    import torch
    from torch.profiler import ProfilerActivity, profile

    from llmtune.data.prepare import prepare
    from llmtune.estimate.memory import estimate as estimate_stage
    from llmtune.train.preference import train_preference

    bench = load_bench()
    rng = random.Random(0)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    say = lambda n: " ".join(rng.choice(words) for _ in range(n))  # noqa: E731
    (tmp_path / "p.jsonl").write_text("".join(
        json.dumps({"prompt": f"{i} {say(1)}", "chosen": say(70), "rejected": say(70)}) + "\n" for i in range(8)))
    (tmp_path / "c.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                                               {"role": "assistant", "content": "yo"}]}) + "\n")
    doc = {"name": "m", "stages": ["prepare", "preference"], "model": {"base": "embedded:tiny-random-llama"},
           "data": {"sources": [{"path": str(tmp_path / "c.jsonl")}], "max_seq_length": 128, "val_fraction": 0,
                    "dedup": "none"},
           # float32 pinned: the estimate models fp32 CPU training, and `auto` would run the precision
           # probe (a throwaway model of its own) inside the profiled region.
           "lora": {"rank": 8, "alpha": 16, "dropout": 0.0},
           "training": {"gradient_checkpointing": False, "autocast": "float32"},
           "preference": {"start_from": "base", "sources": [{"path": str(tmp_path / "p.jsonl")}], "val_fraction": 0,
                          "max_steps": 2, "micro_batch_size": 2, "eval_steps": 1000, "save_steps": 1000},
           "eval": {"prompts": []}, "output": {"dir": str(tmp_path / "runs")}}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(doc))
    recipe = load_recipe(path)
    prepare(recipe)
    torch.set_num_threads(2)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        train_preference(recipe)
    prof.export_chrome_trace(str(tmp_path / "trace.json"))
    measured = bench.peak_from_trace(str(tmp_path / "trace.json"))
    predicted = estimate_stage(recipe, None, device="cpu", stage="preference").peak_bytes
    assert measured <= predicted <= 2.5 * measured, (measured, predicted)
