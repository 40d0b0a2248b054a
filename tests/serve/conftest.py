"""A real vLLM server and the real gateway on a tiny model that has memorised a few replies,
one of which turns a scene sexual in clinical words: the reply screen's test subject."""

from __future__ import annotations

import json

import pytest
import yaml

from tests.conftest import MEMORISE, tiny_recipe_dict, write_conversations

TURN_SEXUAL = [("user", "What happens next?"), ("assistant", "Then the scene turns sexual between them.")]
ADULT_CARDS = ["Ren (35) is the captain's apprentice aboard the Kestrel.", "Ren (35) is the ship's navigator."]


@pytest.fixture(scope="session")
def reply_run(tmp_path_factory):
    """A merged tiny run that answers MEMORISE and, to "What happens next?", a sexual turn."""
    from llmtune.config import load_recipe
    from llmtune.data.prepare import prepare
    from llmtune.export.merge import merge
    from llmtune.train.sft import train

    tmp = tmp_path_factory.mktemp("reply-run")
    data = write_conversations(tmp / "m.jsonl", [*MEMORISE, TURN_SEXUAL], system=None)
    # The sexual turn also after adult cards, so the reply survives a card in front of it (the tests
    # put a one-token-different card, "Ren (15)", there: a minor, which the screen must then catch).
    with data.open("a") as f:
        for card in ADULT_CARDS:
            f.write(json.dumps({"messages": [{"role": "system", "content": card},
                                             *({"role": r, "content": c} for r, c in TURN_SEXUAL)]}) + "\n")
    path = tmp / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe_dict(
        tmp, data, name="replies", data={"val_fraction": 0.0}, lora={"rank": 16, "alpha": 32},
        training={"max_steps": 80, "micro_batch_size": 5, "learning_rate": 1e-2, "save_steps": 1000},
        eval={"prompts": ["What is the ship called?"], "max_new_tokens": 16},
    )))
    recipe = load_recipe(path)
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
