"""Survive kills and bad disks: atomic checkpoints, exact resume, clear storage errors."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmtune.config import load_recipe
from llmtune.storage import StorageError, ensure_writable
from tests.conftest import REPO, run_cli

pytestmark = [pytest.mark.slow]

CHECKPOINT_FILES = ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json", "rng_state.pth")


def load_adapter(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def assert_checkpoints_complete(ckpts: Path) -> list[str]:
    names = sorted(p.name for p in ckpts.iterdir() if p.name.startswith("checkpoint-")) if ckpts.exists() else []
    for name in names:
        missing = [f for f in CHECKPOINT_FILES if not (ckpts / name / f).exists()]
        assert not missing, f"{name} looks like a checkpoint but lacks {missing}"
    return names


def test_kill_9_at_random_points_then_resume_matches_an_uninterrupted_run(tmp_path, tiny_recipe):
    path = tiny_recipe(data={"val_fraction": 0.0},
                       training={"max_steps": 12, "save_steps": 2, "eval_steps": 1000, "learning_rate": 1e-2,
                                 "save_total_limit": 2})
    assert run_cli("run", str(path), "output.name=reference", "stages=[prepare,train]").returncode == 0
    assert run_cli("prepare", str(path), "output.name=killed").returncode == 0
    run_dir = tmp_path / "runs" / "killed"
    ckpts = run_dir / "checkpoints"
    rng = random.Random(1234)
    env = {**os.environ, "SLOW_FSYNC_S": "0.2"}
    kills = 0
    for attempt in range(4):
        cmd = [sys.executable, str(REPO / "tests" / "slow_checkpoint_cli.py"), "train", str(path), "output.name=killed"]
        proc = subprocess.Popen(cmd + (["--resume"] if attempt else []), cwd=REPO, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        if attempt % 2 == 0:  # in the middle of a checkpoint write
            deadline = time.time() + 120
            while not (ckpts / ".staging").exists() and proc.poll() is None and time.time() < deadline:
                time.sleep(0.01)
            time.sleep(rng.uniform(0.05, 0.4))
        else:  # at a random point of the run
            time.sleep(rng.uniform(8, 16))
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait()
        assert_checkpoints_complete(ckpts)  # nothing half-written is ever named checkpoint-N
    assert kills >= 3
    res = run_cli("train", str(path), "output.name=killed", "--resume")
    assert res.returncode == 0, res.stderr[-2000:]
    final = assert_checkpoints_complete(ckpts)
    assert final[-1] == "checkpoint-12"
    ref, resumed = load_adapter(tmp_path / "runs" / "reference"), load_adapter(run_dir)
    assert ref.keys() == resumed.keys()
    diff = max(float((ref[k] - resumed[k]).abs().max()) for k in ref)
    assert diff < 1e-4, f"resumed adapter differs from the uninterrupted one by {diff}"


def test_read_only_output_fails_before_any_work(tmp_path, tiny_recipe, monkeypatch):
    import tempfile

    def refuse(*a, **k):
        raise OSError(30, "Read-only file system")

    recipe = load_recipe(tiny_recipe())
    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    from llmtune.data.prepare import prepare

    with pytest.raises(StorageError, match="cannot write to .*Read-only file system.*output.dir"):
        prepare(recipe)
    assert not (recipe.run_dir / "data" / "train.jsonl").exists()


def test_disk_full_fails_before_any_work(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(StorageError, match="MiB free but the merged model needs about"):
        ensure_writable(tmp_path / "x", 50 * 2**20, "the merged model")
