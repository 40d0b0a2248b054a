"""Recipe validation: every bad recipe fails with one clear message naming file, line and key."""

from __future__ import annotations

import pytest
import yaml

from llmtune.config import Recipe, load_recipe, save_resolved
from llmtune.errors import RecipeError
from llmtune.schema import apply_overrides
from tests.conftest import REPO, run_cli


def write(tmp_path, text: str):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


BASE = """name: t
data:
  sources:
    - path: data/roleplay/mara_vell.jsonl
lora:
  rank: 8
"""


def test_typo_names_key_file_line_and_suggestion(tmp_path):
    p = write(tmp_path, BASE.replace("rank: 8", "rnak: 8"))
    with pytest.raises(RecipeError) as e:
        load_recipe(p)
    msg = str(e.value)
    assert f"{p}:6" in msg
    assert "`lora.rnak`" in msg
    assert "did you mean `rank`" in msg


def test_typo_through_the_cli_exits_2_with_the_message(tmp_path):
    p = write(tmp_path, BASE.replace("rank: 8", "rnak: 8"))
    res = run_cli("run", str(p))
    assert res.returncode == 2
    assert "rnak" in res.stderr and "rank" in res.stderr and str(p) in res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.parametrize(
    "text, expected",
    [
        (BASE.replace("rank: 8", "rank: eight"), ["`lora.rank`", "integer", ":6"]),
        (BASE.replace("rank: 8", "rank: -1"), ["`lora.rank`", "greater than 0"]),
        ("name: t\n", ["missing required key `data`"]),
        (BASE + "trainin:\n  max_steps: 3\n", ["`trainin`", "did you mean `training`"]),
        (BASE + "stages: [train, prepare]\n", ["stages must keep the order"]),
        (BASE + "quantization:\n  mode: int3\n", ["`quantization.mode`", "'none' or 'nf4'"]),
        ("name: t\ndata:\n  sources: []\n", ["`data.sources`", "at least one"]),
        ("name: t\nlora:\n  rank: 8\n    alpha: 3\n", ["not valid YAML", "r.yaml:4"]),
        ("- a\n- b\n", ["YAML mapping"]),
        (BASE + "training:\n  max_steps: -5\n", ["`training.max_steps`", "greater than or equal to -1", ":8"]),
        (BASE + "training:\n  max_steps: 0\n", ["`training.max_steps`", "-1 to train for `epochs`"]),
    ],
)
def test_malformed_recipes(tmp_path, text, expected):
    p = write(tmp_path, text)
    with pytest.raises(RecipeError) as e:
        load_recipe(p)
    for part in expected:
        assert part in str(e.value), (part, str(e.value))


def test_overrides_apply_and_are_validated(tmp_path):
    p = write(tmp_path, BASE)
    r = load_recipe(p, ["training.max_steps=20", "lora.target_modules=[q_proj, v_proj]", "data.sources.0.license=MIT"])
    assert r.training.max_steps == 20
    assert r.lora.target_modules == ["q_proj", "v_proj"]
    assert r.data.sources[0].license == "MIT"
    with pytest.raises(RecipeError, match="not of the form"):
        load_recipe(p, ["training.max_steps"])
    with pytest.raises(RecipeError, match="did you mean `max_steps`"):
        load_recipe(p, ["training.max_step=3"])
    with pytest.raises(RecipeError, match="is a value, not a section"):
        load_recipe(p, ["name.x=3"])
    with pytest.raises(RecipeError, match="not an index"):
        load_recipe(p, ["data.sources.5.path=x"])


def test_apply_overrides_creates_missing_sections():
    doc = apply_overrides({"name": "x"}, ["training.seed=7"])
    assert doc == {"name": "x", "training": {"seed": 7}}


def test_resolved_recipe_round_trips(tmp_path):
    r = load_recipe(write(tmp_path, BASE), ["training.seed=3"])
    out = save_resolved(r, tmp_path / "run")
    again = Recipe.model_validate(yaml.safe_load(out.read_text()))
    assert again.training.seed == 3 and again.lora.rank == 8
    assert again.model_dump() == r.model_dump()


def test_every_shipped_recipe_validates_and_is_executable():
    recipes = sorted((REPO / "recipes").glob("*.yaml"))
    assert recipes
    for path in recipes:
        first = path.read_text().splitlines()[0]
        assert first.startswith("#!/usr/bin/env -S llmtune "), path
        assert path.stat().st_mode & 0o111, f"{path} is not executable"
        if first == "#!/usr/bin/env -S llmtune run":  # fine-tune recipes (moderation.yaml has its own schema)
            load_recipe(path)


def test_data_paths_resolve_beside_the_recipe_or_from_the_working_dir(tmp_path, monkeypatch):
    (tmp_path / "local.jsonl").write_text("")
    r = load_recipe(write(tmp_path, BASE))
    assert r.resolve_path("local.jsonl") == (tmp_path / "local.jsonl").resolve()
    monkeypatch.chdir(REPO)
    assert r.resolve_path("data/roleplay/mara_vell.jsonl") == (REPO / "data/roleplay/mara_vell.jsonl").resolve()


def test_recipe_reference_doc_is_current():
    from llmtune.recipe_docs import render

    assert (REPO / "docs" / "recipes.md").read_text() == render(), "run: python -m llmtune.recipe_docs > docs/recipes.md"


def test_an_override_is_checked_like_the_file(tmp_path):
    with pytest.raises(RecipeError, match="`training.max_steps`"):
        load_recipe(write(tmp_path, BASE), ["training.max_steps=-5"])


def test_serve_and_moderation_files_go_through_the_same_loader(tmp_path):
    from llmtune.errors import ModerationError
    from llmtune.moderation.train import load_moderation_recipe
    from llmtune.serve.config import ServeConfigError, load_serve_config

    serve = tmp_path / "gateway.yaml"
    serve.write_text("port: 8000\nrate_limit:\n  requests_per_minut: 5\n")
    with pytest.raises(ServeConfigError) as e:
        load_serve_config(serve)
    assert f"{serve}:3" in str(e.value) and "did you mean `requests_per_minute`" in str(e.value)
    moderation = tmp_path / "moderation.yaml"
    moderation.write_text("name: m\ntraining:\n  max_steps: -5\n")
    with pytest.raises(ModerationError, match=r"moderation.yaml:3: `training.max_steps`"):
        load_moderation_recipe(moderation)


def test_serve_port_from_the_cli_is_validated(tmp_path):
    res = run_cli("serve", str(tmp_path), "--port", "70000")
    assert res.returncode == 2 and "--port" in res.stderr and "less than 65536" in res.stderr
    assert "Traceback" not in res.stderr


def test_a_recipe_extends_a_base_file_and_errors_name_the_file_that_set_the_key(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "b.yaml").write_text("lora:\n  rank: 8\ntraining:\n  epochs: 2\n")
    child = tmp_path / "c.yaml"
    child.write_text("extends: base/b.yaml\nname: t\ndata:\n  sources:\n    - path: x.jsonl\ntraining:\n  epochs: 5\n")
    r = load_recipe(child)
    assert (r.lora.rank, r.training.epochs, r.lora.alpha) == (8, 5, 32)  # base, child on top, default
    (tmp_path / "base" / "b.yaml").write_text("lora:\n  rank: 8\n  rnak: 3\n")
    with pytest.raises(RecipeError, match=r"b\.yaml:3: unknown key `lora.rnak`"):
        load_recipe(child)
    child.write_text("extends: c.yaml\nname: t\n")
    with pytest.raises(RecipeError, match="comes back to a file already in the chain"):
        load_recipe(child)


def test_gpu_recipes_state_only_their_model_and_memory_tier():
    for path in sorted((REPO / "recipes").glob("*-qlora-*gb.yaml")):
        doc = yaml.safe_load(path.read_text())
        assert doc["extends"] == "base/qlora-gpu.yaml", path
        assert set(doc) <= {"extends", "name", "description", "model", "data", "training"}, path
        assert set(doc["data"]) == {"max_seq_length"} and set(doc["training"]) <= {"micro_batch_size", "gradient_accumulation_steps"}
