"""A real vLLM server and the real gateway on a tiny model that has memorised a few replies,
one of which turns a scene sexual in clinical words: the reply screen's test subject."""

from __future__ import annotations

import pytest
import yaml

from tests.conftest import MEMORISE, tiny_recipe_dict, write_conversations

TURN_SEXUAL = [("user", "What happens next?"), ("assistant", "Then the scene turns sexual between them.")]


@pytest.fixture(scope="session")
def reply_run(tmp_path_factory):
    """A merged tiny run that answers MEMORISE and, to "What happens next?", a sexual turn."""
    from llmtune.config import load_recipe, save_resolved
    from llmtune.data.prepare import prepare
    from llmtune.export.merge import merge
    from llmtune.train.sft import train

    tmp = tmp_path_factory.mktemp("reply-run")
    data = write_conversations(tmp / "m.jsonl", [*MEMORISE, TURN_SEXUAL], system=None)
    path = tmp / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe_dict(
        tmp, data, name="replies", data={"val_fraction": 0.0}, lora={"rank": 16, "alpha": 32},
        training={"max_steps": 80, "micro_batch_size": 5, "learning_rate": 1e-2, "save_steps": 1000},
        eval={"prompts": ["What is the ship called?"], "max_new_tokens": 16},
    )))
    recipe = load_recipe(path)
    save_resolved(recipe, recipe.run_dir)  # a run directory `llmtune serve` accepts
    train(recipe, prepare(recipe))
    merge(recipe)
    return recipe


@pytest.fixture(scope="session")
def served(reply_run, tmp_path_factory):
    """vLLM (with its key) on the merged run: yields (server, config)."""
    from llmtune.serve.vllm_server import VLLMConfig, VLLMServer

    tmp = tmp_path_factory.mktemp("served")
    vcfg = VLLMConfig(model=str(reply_run.run_dir / "merged"), served_name="mara", dtype="float32", max_model_len=2048)
    with VLLMServer(vcfg, log_path=tmp / "vllm.log") as server:
        yield server
