"""Training across machines, tested on one: two `llmtune train --nnodes 2` launches (node ranks 0 and 1,
one CPU process each, gloo on 127.0.0.1), the node handshake's errors, and accelerate's view of the
multi-node command for every shipped engine config."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmtune.distributed import DistributedError, NodeSpec, RankGroup, free_port, handshake, setting_differences
from llmtune.launch import ACCELERATE_CONFIGS, accelerate_command
from tests.conftest import REPO, run_cli

TIMEOUT = 240  # seconds a two-node launch may take here before the test calls it a hang


def start_node(recipe: Path, rank: int, port: int, *extra: str, nnodes: int = 2, rdzv_timeout: int = 60) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "llmtune.cli", "train", str(recipe), *extra, "--nnodes", str(nnodes),
           "--node-rank", str(rank), "--master-addr", "127.0.0.1", "--master-port", str(port), "--nproc", "1",
           "--rdzv-timeout", str(rdzv_timeout)]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def finish(procs: list[subprocess.Popen], timeout: float = TIMEOUT) -> list[tuple[int, str]]:
    """Each node's exit code and output; a node still running after `timeout` is killed and fails the test."""
    deadline = time.time() + timeout
    out = []
    for p in procs:
        try:
            text, _ = p.communicate(timeout=max(1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            for q in procs:
                if q.poll() is None:
                    kill_node(q)
            pytest.fail(f"a node was still running after {timeout} s: a hang")
        out.append((p.returncode, text))
    return out


def two_nodes(recipe: Path, *extra: str, resume: bool = False) -> list[tuple[int, str]]:
    port = free_port()
    flags = [*extra] + (["--resume"] if resume else [])
    return finish([start_node(recipe, 0, port, *flags), start_node(recipe, 1, port, *flags)])


def kill_node(proc: subprocess.Popen) -> None:
    """SIGKILL a node's whole process tree, as if the machine died (torchrun starts its workers in
    sessions of their own, so the launcher's process group is not enough)."""
    import psutil

    tree = psutil.Process(proc.pid)
    for p in [tree, *tree.children(recursive=True)]:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def load_adapter(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


# No packing and no length grouping: a global batch of 4 is then the same 4 conversations whether one
# process takes them at once or two ranks take 2 each. One thread per process: two "nodes" share 2 cores.
TRAINING = {"max_steps": 6, "save_steps": 2, "eval_steps": 1000, "micro_batch_size": 2, "learning_rate": 1e-2,
            "packing": False, "group_by_length": False, "num_threads": 1, "save_total_limit": 3}


@pytest.fixture(scope="module")
def two_node_run(tmp_path_factory):
    """An uninterrupted 2-node run; rank 0 prepares the data (no `llmtune prepare` beforehand)."""
    import yaml

    from tests.conftest import MEMORISE, tiny_recipe_dict, write_conversations

    tmp = tmp_path_factory.mktemp("multinode")
    data = write_conversations(tmp / "chats.jsonl", MEMORISE + [
        [("user", f"How many barrels are in hold {i}?"), ("assistant", f"{i + 2} barrels of cloudberry jam, deckhand.")]
        for i in range(8)])
    recipe = tmp / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe_dict(tmp, data, data={"val_fraction": 0.0}, training=TRAINING)))
    results = two_nodes(recipe)
    return recipe, tmp / "runs" / "tiny", results


@pytest.mark.slow
@pytest.mark.multiproc
def test_two_nodes_train_one_adapter_that_matches_one_process_with_the_same_global_batch(two_node_run):
    recipe, run_dir, results = two_node_run
    for rank, (rc, out) in enumerate(results):
        assert rc == 0, f"node {rank}:\n{out[-4000:]}"
    assert "all 2 nodes agree" in results[0][1]
    both = results[0][1] + results[1][1]
    assert both.count("preparing the data once for all 2 ranks") == 1
    decisions = [[line for line in out.splitlines() if "gradient checkpointing:" in line] for _, out in results]
    assert len(decisions[0]) == 1 and decisions[0] == decisions[1], decisions  # the same on every rank

    ranks = json.loads((run_dir / "ranks.json").read_text())
    assert "train 12 / val 0" in both
    assert ranks["world_size"] == 2 and ranks["identical"] is True
    assert [(r["rank"], r["node"]) for r in ranks["ranks"]] == [(0, 0), (1, 1)]
    assert ranks["ranks"][0]["adapter_sha256"] == ranks["ranks"][1]["adapter_sha256"]
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    assert not (run_dir / "checkpoints" / ".staging").exists()
    assert (run_dir / "loss_curve.png").exists() and (run_dir / "recipe.yaml").exists()

    # One process, micro-batch 4 = 2 nodes x 1 process x micro-batch 2.
    assert run_cli("prepare", str(recipe), "output.name=single").returncode == 0
    res = run_cli("train", str(recipe), "output.name=single", "training.micro_batch_size=4")
    assert res.returncode == 0, res.stderr[-3000:]
    single, multi = load_adapter(run_dir.parent / "single"), load_adapter(run_dir)
    assert any(float(v.abs().sum()) > 0 for k, v in multi.items() if "lora_B" in k), "training moved the adapter"
    diff = max_difference(single, multi)
    assert diff < 1e-4, f"2-node adapter differs from the 1-process one by {diff}"


@pytest.mark.slow
@pytest.mark.multiproc
def test_kill_node_1_mid_run_then_resume_both_matches_the_uninterrupted_run(two_node_run):
    recipe, reference_dir, _ = two_node_run
    name = "output.name=killed"
    run_dir = reference_dir.parent / "killed"
    port = free_port()
    node0, node1 = start_node(recipe, 0, port, name), start_node(recipe, 1, port, name)
    deadline = time.time() + TIMEOUT
    while not (run_dir / "checkpoints" / "checkpoint-2").exists() and node1.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert node1.poll() is None, "node 1 ended before its first checkpoint"
    kill_node(node1)
    (rc0, _), _ = finish([node0, node1])
    assert rc0 != 0, "node 0 must fail when node 1 dies, not hang or finish"
    assert not (run_dir / "adapter").exists(), "the kill came after the end of training"
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("checkpoint-"))
    assert names and "checkpoint-6" not in names
    for ckpt in names:  # every named checkpoint is whole, RNG state of both ranks included
        assert {"adapter_model.safetensors", "optimizer.pt", "trainer_state.json", "rng_state_0.pth",
                "rng_state_1.pth"} <= {p.name for p in (run_dir / "checkpoints" / ckpt).iterdir()}, ckpt

    results = two_nodes(recipe, name, resume=True)
    for rank, (rc, out) in enumerate(results):
        assert rc == 0, f"node {rank} on resume:\n{out[-4000:]}"
    diff = max_difference(load_adapter(reference_dir), load_adapter(run_dir))
    assert diff < 1e-4, f"resumed 2-node adapter differs from the uninterrupted one by {diff}"
    assert json.loads((run_dir / "ranks.json").read_text())["identical"] is True


@pytest.mark.slow
@pytest.mark.multiproc
def test_a_different_recipe_on_node_1_is_a_clear_error_on_both_nodes(tiny_recipe):
    path = tiny_recipe()
    port = free_port()
    start = time.time()
    results = finish([start_node(path, 0, port), start_node(path, 1, port, "lora.rank=4")], timeout=120)
    assert time.time() - start < 120
    for rank, (rc, out) in enumerate(results):
        assert rc == 2, f"node {rank}:\n{out[-3000:]}"
        assert "runs a different recipe than node 0" in out and "lora.rank is 4 on node 1, 8 on node 0" in out, out[-3000:]
    assert not (path.parent / "runs" / "tiny" / "checkpoints").exists(), "nothing trained"


@pytest.mark.slow
@pytest.mark.multiproc
def test_a_mismatched_world_size_names_the_setting_on_both_nodes(tiny_recipe):
    path = tiny_recipe()
    port = free_port()
    results = finish([start_node(path, 0, port), start_node(path, 1, port, nnodes=3)], timeout=120)
    for rank, (rc, out) in enumerate(results):
        assert rc == 2, f"node {rank}:\n{out[-3000:]}"
        assert "--nnodes is 3 on node 1" in out and "world size 3 vs 2" in out, out[-3000:]


@pytest.mark.slow
@pytest.mark.multiproc
def test_an_unreachable_master_fails_within_the_timeout(tiny_recipe):
    path = tiny_recipe()
    start = time.time()
    (rc, out), = finish([start_node(path, 1, free_port(), rdzv_timeout=3)], timeout=90)
    assert rc == 2 and "cannot reach the master at 127.0.0.1:" in out and "--rdzv-timeout" in out, out[-3000:]
    assert time.time() - start < 90


@pytest.mark.slow
@pytest.mark.multiproc
def test_node_0_names_the_nodes_that_never_joined(tiny_recipe):
    from llmtune.config import load_recipe

    node = NodeSpec(nnodes=3, node_rank=0, master_addr="127.0.0.1", master_port=free_port(), nproc=1)
    with pytest.raises(DistributedError, match=r"node\(s\) 1, 2 did not join within 1 s \(--nnodes 3"):
        handshake(node, load_recipe(tiny_recipe()), timeout=1, log=lambda s: None)


def test_node_flags_are_checked_before_anything_starts():
    with pytest.raises(DistributedError, match="--node-rank 2 is outside 0..1"):
        NodeSpec(2, 2, "h", 29500, 1).validate()
    with pytest.raises(DistributedError, match="needs --master-addr"):
        NodeSpec(2, 1, "", 29500, 1).validate()


def test_rank_group_names_the_rank_and_the_setting_that_differ(tiny_recipe, monkeypatch):
    """The in-process check every rank runs, whatever launched it (torchrun, SLURM): simulated gather."""
    from llmtune.config import load_recipe
    from llmtune.distributed import fingerprint, recipe_settings

    path = tiny_recipe()
    mine, theirs = load_recipe(path), load_recipe(path, ["training.max_steps=9"])
    other = recipe_settings(theirs)
    group = RankGroup(rank=0, world_size=2, host="a")
    monkeypatch.setattr(group, "gather", lambda v: [v, ("rank 1 on node 1 (b)", (fingerprint(other), other))])
    with pytest.raises(DistributedError, match=r"recipe differs across ranks: training.max_steps is 9 on rank 1 on node 1 \(b\), 4 on rank 0 on node 0 \(a\)"):
        group.check_recipe(mine)
    assert "training.max_steps is 9 on x, 4 on y" in setting_differences(other, recipe_settings(mine), "x", "y")


@pytest.mark.parametrize("config", [None, "ddp", "fsdp", "fsdp-qlora", "zero2", "zero3"])
def test_every_shipped_engine_config_becomes_a_multi_node_torchrun_launch(config):
    """The command llmtune builds, read back by accelerate's own parser and multi-node preparation."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    node = NodeSpec(nnodes=2, node_rank=1, master_addr="10.0.0.1", master_port=29511, nproc=4)
    cmd, _ = accelerate_command(["llmtune.cli", "train", "r.yaml"], 4, config, cpu=False, node=node, rdzv_timeout=120)
    args = launch_command_parser().parse_args(cmd[3:])
    args, _, _ = _validate_launch_command(args)
    assert (args.num_machines, args.machine_rank, args.num_processes) == (2, 1, 8)
    if args.use_deepspeed:
        assert args.deepspeed_multinode_launcher == "standard"
        args.deepspeed_fields_from_accelerate_config = ""  # what accelerate's launch_command sets first
        prepare_deepspeed_cmd_env(args)
    else:
        prepare_multi_gpu_env(args)
    assert (args.nnodes, args.node_rank, args.nproc_per_node) == ("2", 1, "4")
    assert (args.master_addr, args.master_port, args.rdzv_backend) == ("10.0.0.1", "29511", "static")
    assert args.rdzv_conf == "timeout=120"
    if config:
        assert args.config_file == str(ACCELERATE_CONFIGS / f"{config}.yaml")


def test_slurm_example_launches_one_llmtune_train_per_node():
    text = (REPO / "recipes" / "slurm" / "train.sbatch").read_text()
    assert "--ntasks-per-node=1" in text and "srun" in text
    for flag in ("--nnodes", "--node-rank", "--master-addr", "--master-port", "--nproc"):
        assert flag in text, flag
    assert subprocess.run(["bash", "-n", str(REPO / "recipes" / "slurm" / "train.sbatch")], check=False).returncode == 0
