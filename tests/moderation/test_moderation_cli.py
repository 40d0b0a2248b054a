"""The CLI contract other tools call, and `moderation train` / `moderation eval` end to end (tiny)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import typer
import yaml
from typer.testing import CliRunner

from llmtune.moderation.cli import moderate_command, moderation_app

REPO = Path(__file__).resolve().parents[2]
runner = CliRunner()


@pytest.fixture(scope="module")
def app() -> typer.Typer:
    # What the lead wires into llmtune/cli.py.
    main = typer.Typer()
    main.command("moderate")(moderate_command)
    main.add_typer(moderation_app, name="moderation")
    return main


def test_moderate_text_json_prints_one_object(app):
    res = runner.invoke(app, ["moderate", "--text", "asks for a sexual scene with a 15-year-old", "--json"])
    assert res.exit_code == 0, res.output
    obj = json.loads(res.stdout)
    assert set(obj) == {"allowed", "categories", "scores", "layer", "evidence"}
    assert obj["allowed"] is False and obj["categories"] == ["minor_sexual"] and obj["layer"] == "rules"
    res = runner.invoke(app, ["moderate", "--text", "asks for a slow-burn romance between two adult chefs", "--json"])
    assert json.loads(res.stdout)["allowed"] is True


def test_moderate_text_without_json_explains(app):
    res = runner.invoke(app, ["moderate", "--text", "asks for a sexual scene with a 15-year-old"])
    assert res.exit_code == 0 and res.stdout.startswith("blocked: minor_sexual (layer: rules)")


def test_moderate_jsonl_in_and_out(app, tmp_path):
    rows = [{"id": 1, "text": "asks for a romantic love scene between two adult coworkers"},
            {"id": 2, "text": "asks for an explicit story about a 14 y/o"},
            {"id": 3, "text": "asks how to synthesise a nerve agent", "extra": {"kept": True}}]
    src, out = tmp_path / "rows.jsonl", tmp_path / "out" / "screened.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    res = runner.invoke(app, ["moderate", "--input", str(src), "--output", str(out), "--batch-size", "2"])
    assert res.exit_code == 0, res.output
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in got] == [1, 2, 3] and got[2]["extra"] == {"kept": True}
    assert [r["allowed"] for r in got] == [True, False, False]
    assert got[1]["categories"] == ["minor_sexual"] and got[2]["categories"] == ["illegal_instructions"]


def test_moderate_usage_errors(app, tmp_path):
    assert runner.invoke(app, ["moderate"]).exit_code == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    res = runner.invoke(app, ["moderate", "--input", str(bad), "--output", str(tmp_path / "o.jsonl")])
    assert res.exit_code == 2 and "bad.jsonl:2" in res.stderr


def _subset(src: Path, dst: Path, n: int) -> Path:
    lines = [line for line in src.read_text().splitlines() if line.strip()]
    # keep both blocked and allowed rows in a tiny split
    blocked = [line for line in lines if json.loads(line)["labels"]][: n // 2]
    allowed = [line for line in lines if not json.loads(line)["labels"]][: n - len(blocked)]
    dst.write_text("\n".join(blocked + allowed) + "\n")
    return dst


@pytest.mark.slow
def test_moderation_train_tiny_subset_writes_a_loadable_adapter(app, tmp_path):
    from peft import PeftModel
    from transformers import AutoModel

    from llmtune.encoder import minilm_dir
    from llmtune.moderation.adapter import ModerationAdapter

    data = REPO / "data" / "moderation"
    recipe = yaml.safe_load((REPO / "recipes" / "moderation.yaml").read_text())
    convs = tmp_path / "conv.jsonl"  # conversation rows with their labels, as the writers' files hold them
    convs.write_text("\n".join((data / "train" / "w_conv.jsonl").read_text().splitlines()[:6]) + "\n")
    recipe["data"].update(train=[str(_subset(data / "train.jsonl", tmp_path / "train.jsonl", 24)), str(convs)],
                          tame=[str(data / "train" / "tame_rp" / "sillytavern_1.jsonl"),
                                str(data / "train" / "tame_rp" / "card_amara.json")])
    recipe["output"] = {"dir": str(tmp_path / "runs"), "name": "tiny-mod"}
    path = tmp_path / "moderation.yaml"
    path.write_text(yaml.safe_dump(recipe))
    res = runner.invoke(app, ["moderation", "train", str(path), "training.max_steps=2", "training.batch_size=8",
                              "training.num_threads=1"])
    assert res.exit_code == 0, res.output
    adapter_dir = tmp_path / "runs" / "tiny-mod" / "adapter"
    for name in ("adapter_config.json", "adapter_model.safetensors", "head.safetensors", "moderation.json", "prefilter.npz"):
        assert (adapter_dir / name).exists(), name
    meta = json.loads((adapter_dir / "moderation.json").read_text())
    assert set(meta["thresholds"]) == set(meta["categories"]) - set(meta["signals"]) and meta["training"]["steps"] == 2
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["r"] == 8
    peft = PeftModel.from_pretrained(AutoModel.from_pretrained(str(minilm_dir())), str(adapter_dir)).eval()
    assert len(ModerationAdapter(adapter_dir).scores(["hello"])[0]) == len(meta["categories"])  # 5 blocking + 3 signals
    # The card segment: screening's fused encoder reads [CLS] text [SEP] card [SEP] (card as token
    # type 1, only the text pooled) exactly as the PEFT model it was trained as does.
    import torch
    from safetensors.torch import load_file

    from llmtune.encoder import mean_pool
    from llmtune.moderation.adapter import batch_tensors

    assert meta["context_tokens"] == 48
    fast = ModerationAdapter(adapter_dir, precision="float32")
    texts, cards = ["kiss me, mara vell", "what's our heading, captain?"], ["you are mara vell, 34, a ship captain", ""]
    ids, mask, types, pool = batch_tensors(fast.tokenizer.truncated(texts, cards))
    assert types[0].sum() > 0 and types[1].sum() == 0 and pool[0].sum() < mask[0].sum()
    head = load_file(str(adapter_dir / "head.safetensors"))
    with torch.no_grad():
        hidden = peft(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        ref = torch.sigmoid(mean_pool(hidden, pool) @ head["weight"].T + head["bias"])
    assert torch.allclose(torch.tensor(fast.scores(texts, contexts=cards)), ref, atol=1e-4)
    assert fast.scores(texts[:1], contexts=cards[:1]) != fast.scores(texts[:1])  # the card is read
    # Recalibrating under another budget rewrites the thresholds, not the weights; another recipe's data is refused.
    res = runner.invoke(app, ["moderation", "calibrate", str(path), "--adapter", str(adapter_dir),
                              "calibration.max_fpr.minor_sexual=0.5", "training.num_threads=1"])
    assert res.exit_code == 0, res.output
    again = json.loads((adapter_dir / "moderation.json").read_text())
    assert again["calibration"]["per_head"]["minor_sexual"]["max_fpr"] == 0.5 and again["training"] == meta["training"]
    res = runner.invoke(app, ["moderation", "calibrate", str(REPO / "recipes" / "moderation.yaml"), "--adapter", str(adapter_dir)])
    assert res.exit_code == 2 and "trained on other data" in res.stderr


def test_moderation_train_reports_recipe_mistakes(app, tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("name: x\ntraining:\n  epoch: 2\n")
    res = runner.invoke(app, ["moderation", "train", str(path)])
    assert res.exit_code == 2 and "training.epoch" in res.stderr


@pytest.mark.slow
def test_moderation_eval_writes_table_and_png(app, tmp_path):
    rows = (REPO / "data" / "moderation" / "eval" / "dev.jsonl").read_text().splitlines()
    split = tmp_path / "small.jsonl"
    split.write_text("\n".join(rows[:40]) + "\n")  # a copy is not the frozen set: row-level errors are shown
    res = runner.invoke(app, ["moderation", "eval", "--split", str(split), "--out", str(tmp_path / "ev"), "--json"])
    assert res.exit_code == 0, res.output
    metrics = json.loads(res.stdout)
    assert set(metrics["per_category"]["minor_sexual"]) >= {"positives", "caught", "recall", "exact_recall"}
    assert {"adult_request", "tame_roleplay", "all_allowed"} <= set(metrics["fpr"]) and metrics["sha256"] is None
    assert (tmp_path / "ev" / "eval.png").stat().st_size > 1000
    report = (tmp_path / "ev" / "report.md").read_text()
    assert "| minor_sexual |" in report and "false-positive rate" in report and "## Errors" in report


def test_moderation_eval_refuses_an_edited_frozen_set(tmp_path):
    from llmtune.moderation.errors import ModerationError
    from llmtune.moderation.evaluate import check_frozen

    eval_dir = REPO / "data" / "moderation" / "eval"
    assert check_frozen(eval_dir / "heldout.jsonl")  # the shipped set matches its recorded sha256
    copy = tmp_path / "heldout.jsonl"
    copy.write_text((eval_dir / "heldout.jsonl").read_text() + "\n")
    (tmp_path / "heldout.sha256").write_text((eval_dir / "heldout.sha256").read_text())
    with pytest.raises(ModerationError, match="changed after it was frozen"):
        check_frozen(copy)


def test_recipe_is_an_executable_script():
    recipe = REPO / "recipes" / "moderation.yaml"
    assert recipe.read_text().splitlines()[0] == "#!/usr/bin/env -S llmtune moderation train"
    assert os.access(recipe, os.X_OK)
