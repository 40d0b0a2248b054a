"""Multi-process and multi-node training through `accelerate launch`: DDP, FSDP or DeepSpeed, one
process per device, on one machine or several.

`launch_training(recipe, overrides, nproc, node=NodeSpec(...))` runs, on each machine,

    accelerate launch --num_processes NNODES*NPROC --num_machines NNODES --machine_rank R
        --main_process_ip HOST --main_process_port P [--config_file F] -m llmtune.cli train RECIPE [overrides]

so every rank runs the ordinary train stage and the engine (DDP by default, FSDP or DeepSpeed
ZeRO from a config under recipes/accelerate/) does the distribution; llmtune adds none of its own.
With several machines the nodes first meet in `llmtune.distributed.handshake`, so an unreachable
master, a wrong world size or a different recipe fail at once with the node and setting named.
Data that is not prepared yet is prepared by global rank 0 while the other ranks wait.

On a machine without CUDA the processes share the CPU cores: each gets cores // N threads
(OMP_NUM_THREADS) and the train stage must use the gloo backend.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

from llmtune.distributed import NodeSpec, free_port, handshake
from llmtune.errors import LlmtuneError

ACCELERATE_CONFIGS = Path(__file__).resolve().parents[1] / "recipes" / "accelerate"


def cuda_device_count() -> int:
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def cpu_threads_per_process(nproc: int) -> int:
    return max(1, len(os.sched_getaffinity(0)) // nproc)


def resolve_accelerate_config(config: str | Path | None) -> Path | None:
    """A config path as given, or a name of one under recipes/accelerate/ (`fsdp-qlora` -> fsdp-qlora.yaml)."""
    if config is None:
        return None
    path = Path(config)
    if path.is_file():
        return path
    shipped = ACCELERATE_CONFIGS / (path.name if path.suffix else f"{path.name}.yaml")
    if shipped.is_file():
        return shipped
    names = ", ".join(sorted(p.stem for p in ACCELERATE_CONFIGS.glob("*.yaml")))
    raise LlmtuneError(f"accelerate config {config} not found; give a file or one of: {names}")


def describe_config(config: Path | None) -> str | None:
    """`fsdp-qlora.yaml (sha256 1a2b3c4d)`: the engine config as nodes compare it, by content, not by how it was named."""
    if config is None:
        return None
    import hashlib

    return f"{config.name} (sha256 {hashlib.sha256(config.read_bytes()).hexdigest()[:8]})"


def accelerate_command(
    module_args: list[str],
    nproc: int,
    accelerate_config: str | Path | None = None,
    *,
    cpu: bool | None = None,
    main_process_port: int | None = None,
    node: NodeSpec | None = None,
    rdzv_timeout: float | None = None,
) -> tuple[list[str], dict[str, str]]:
    """The `accelerate launch` command line and environment that run `python -m <module_args>` on
    `nproc` ranks on this machine, or on this machine's share of a multi-node run (`node`)."""
    if nproc < 1:
        raise LlmtuneError(f"--nproc must be at least 1 (got {nproc})")
    cpu = cuda_device_count() == 0 if cpu is None else cpu
    config = resolve_accelerate_config(accelerate_config)
    nnodes = node.nnodes if node else 1
    world = nproc * nnodes  # accelerate's --num_processes counts every machine's processes
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(world), "--num_machines", str(nnodes)]
    env = dict(os.environ)
    if config is not None:
        cmd += ["--config_file", str(config)]
    else:
        # No config: plain DDP. `--multi_gpu` selects accelerate's torchrun launcher, which also spawns
        # CPU ranks (its `--cpu` flag would start a single process unless MPI is set up). Mixed
        # precision is the train stage's choice (bf16/fp16 on GPUs), not the launcher's.
        cmd += (["--multi_gpu"] if world > 1 else []) + ["--mixed_precision", "no", "--dynamo_backend", "no"]
    if node is not None and nnodes > 1:
        # --same_network: torchrun's static rendezvous at MASTER_ADDR:PORT (the shipped configs say so,
        # but a store_true flag on accelerate's command line is never filled from the config file).
        cmd += ["--machine_rank", str(node.node_rank), "--main_process_ip", node.master_addr, "--same_network"]
        main_process_port = node.master_port
        # With a ZeRO config: one launcher per node (torchrun), not DeepSpeed's default of pdsh/ssh from
        # node 0. Other engines ignore the flag.
        cmd += ["--deepspeed_multinode_launcher", "standard"]
        if rdzv_timeout is not None:
            cmd += ["--rdzv_conf", f"timeout={int(rdzv_timeout)}"]
    if main_process_port is None and world > 1:
        main_process_port = free_port()  # accelerate's fixed default (29500) collides with a second run
    if main_process_port is not None:
        cmd += ["--main_process_port", str(main_process_port)]
    if cpu:
        threads = cpu_threads_per_process(nproc)
        cmd += ["--num_cpu_threads_per_process", str(threads)]
        env["OMP_NUM_THREADS"] = str(threads)
    cmd += ["-m", *module_args]
    return cmd, env


def launch_training(
    recipe_path: str | Path,
    overrides: list[str] | None,
    nproc: int,
    accelerate_config: str | Path | None = None,
    resume: bool = False,
    node: NodeSpec | None = None,
    rdzv_timeout: float = 300.0,
) -> int:
    """Train `recipe_path` on `nproc` processes through accelerate (on each of `node.nnodes` machines,
    after the node handshake); returns the launcher's exit code."""
    from llmtune.config import load_recipe

    if node is not None and node.nnodes > 1:
        # Raises DistributedError (what, which node, which setting) instead of a hang in torchrun.
        handshake(node, load_recipe(recipe_path, overrides or []), timeout=rdzv_timeout,
                  accelerate_config=describe_config(resolve_accelerate_config(accelerate_config)))
    args = ["llmtune.cli", "train", str(recipe_path), *(overrides or [])]
    if resume:
        args.append("--resume")
    cmd, env = accelerate_command(args, nproc, accelerate_config, node=node, rdzv_timeout=rdzv_timeout)
    print("launching: " + shlex.join(cmd), file=sys.stderr, flush=True)
    return subprocess.call(cmd, env=env)
