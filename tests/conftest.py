"""Shared fixtures: tiny recipes on the embedded tiny random Llama (SmolLM2 tokenizer)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data" / "roleplay"

MEMORISE = [
    [("user", "What is the ship called?"), ("assistant", "The Kestrel, deckhand.")],
    [("user", "Who is the captain?"), ("assistant", "Captain Mara Vell, at your service.")],
    [("user", "Where are we going?"), ("assistant", "North, past the copper cliffs.")],
    [("user", "What is for supper?"), ("assistant", "Cloudberry stew, as always.")],
]


def write_conversations(path: Path, convs, system: str | None = "You are Mara.") -> Path:
    with path.open("w") as f:
        for turns in convs:
            msgs = ([{"role": "system", "content": system}] if system else []) + [
                {"role": r, "content": c} for r, c in turns
            ]
            f.write(json.dumps({"messages": msgs}) + "\n")
    return path


def tiny_recipe_dict(tmp_path: Path, data_path: Path, **sections) -> dict:
    recipe = {
        "name": "tiny",
        "model": {"base": "embedded:tiny-random-llama"},
        "data": {"sources": [{"path": str(data_path), "license": "CC0-1.0"}], "val_fraction": 0.25, "max_seq_length": 128},
        "lora": {"rank": 8, "alpha": 16, "dropout": 0.0},
        "training": {
            "max_steps": 4, "micro_batch_size": 2, "learning_rate": 1e-3, "logging_steps": 1,
            "eval_steps": 2, "save_steps": 2, "warmup_ratio": 0.0, "lr_scheduler": "constant",
        },
        "eval": {"prompts": ["What is the ship called?"], "max_new_tokens": 8},
        "output": {"dir": str(tmp_path / "runs")},
    }
    for key, value in sections.items():
        if isinstance(value, dict):
            recipe.setdefault(key, {}).update(value)
        else:
            recipe[key] = value
    return recipe


@pytest.fixture
def tiny_recipe(tmp_path):
    """Write a tiny recipe (memorisation data) and return its path; kwargs update sections."""

    def make(source: Path | None = None, **sections) -> Path:
        source = source or write_conversations(tmp_path / "chats.jsonl", MEMORISE + [[("user", f"Say {i}"), ("assistant", f"{i}, deckhand.")] for i in range(8)])
        path = tmp_path / "recipe.yaml"
        path.write_text(yaml.safe_dump(tiny_recipe_dict(tmp_path, source, **sections), sort_keys=False))
        return path

    return make


def run_cli(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """The real `llmtune` console entry point in a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "llmtune.cli", *args],
        capture_output=True, text=True, timeout=timeout, cwd=REPO, env={**os.environ, **(env or {})},
    )


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from llmtune.models import load_tokenizer, resolve_base

    return load_tokenizer(resolve_base("embedded:tiny-random-llama"))


@pytest.fixture(scope="session")
def memorised_run(tmp_path_factory):
    """A tiny LoRA run that has learned to answer MEMORISE and to stop."""
    from llmtune.config import load_recipe
    from llmtune.data.prepare import prepare
    from llmtune.train.sft import train

    tmp = tmp_path_factory.mktemp("memorised")
    data = write_conversations(tmp / "m.jsonl", MEMORISE)
    recipe_path = tmp / "r.yaml"
    recipe_path.write_text(yaml.safe_dump(tiny_recipe_dict(
        tmp, data, data={"val_fraction": 0.0}, lora={"rank": 16, "alpha": 32},
        training={"max_steps": 60, "micro_batch_size": 4, "learning_rate": 1e-2, "save_steps": 100},
        eval={"prompts": ["What is the ship called?"], "max_new_tokens": 16},
    )))
    recipe = load_recipe(recipe_path)
    train(recipe, prepare(recipe))
    return recipe


def copy_run(recipe, parent: Path, overrides: list[str] | None = None):
    """A private copy of a run directory under `parent`, as the recipe that points at it: tests that
    write into a run (merge, export, review) work on a copy, never on a session fixture."""
    from llmtune.config import load_recipe

    shutil.copytree(recipe.run_dir, parent / recipe.run_dir.name)
    return load_recipe(recipe.source_path, [f"output.dir={parent}", *(overrides or [])])


@pytest.fixture
def memorised_copy(memorised_run, tmp_path):
    """memorised_run copied for one test that writes into it."""
    return copy_run(memorised_run, tmp_path / "runs")


@pytest.fixture(scope="session")
def merged_run(memorised_run, tmp_path_factory):
    """A copy of memorised_run with merged/ (read it; tests that write into a run take their own copy)."""
    from llmtune.export.merge import merge

    recipe = copy_run(memorised_run, tmp_path_factory.mktemp("merged-run"))
    merge(recipe)
    return recipe


@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL server on loopback for the session; `postgres.new_database()` per test."""
    from tests.servers import PostgresServer

    with PostgresServer() as server:
        yield server


@pytest.fixture(scope="session")
def redis_server():
    """A real Redis server on loopback for the session."""
    from tests.servers import RedisServer

    with RedisServer() as server:
        yield server
