"""Multi-process training through `accelerate launch`: DDP, FSDP or DeepSpeed, one process per device.

`launch_training(recipe, overrides, nproc)` runs

    accelerate launch --num_processes N [--config_file F] -m llmtune.cli train RECIPE [overrides] [--resume]

so every rank runs the ordinary train stage and the engine (DDP by default, FSDP or DeepSpeed
ZeRO from a config under recipes/accelerate/) does the distribution; llmtune adds none of its own.
Prepare the data first (`llmtune prepare RECIPE`): ranks must not race to write it.

On a machine without CUDA the processes share the CPU cores: each gets cores // N threads
(OMP_NUM_THREADS) and the train stage must use the gloo backend.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

from llmtune.errors import LlmtuneError

ACCELERATE_CONFIGS = Path(__file__).resolve().parents[1] / "recipes" / "accelerate"


def cuda_device_count() -> int:
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def accelerate_command(
    module_args: list[str],
    nproc: int,
    accelerate_config: str | Path | None = None,
    *,
    cpu: bool | None = None,
    main_process_port: int | None = None,
) -> tuple[list[str], dict[str, str]]:
    """The `accelerate launch` command line and environment that run `python -m <module_args>` on N ranks."""
    if nproc < 1:
        raise LlmtuneError(f"--nproc must be at least 1 (got {nproc})")
    cpu = cuda_device_count() == 0 if cpu is None else cpu
    config = resolve_accelerate_config(accelerate_config)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(nproc), "--num_machines", "1"]
    env = dict(os.environ)
    if config is not None:
        cmd += ["--config_file", str(config)]
    else:
        # No config: plain DDP. `--multi_gpu` selects accelerate's torchrun launcher, which also spawns
        # CPU ranks (its `--cpu` flag would start a single process unless MPI is set up). Mixed
        # precision is the train stage's choice (bf16/fp16 on GPUs), not the launcher's.
        cmd += (["--multi_gpu"] if nproc > 1 else []) + ["--mixed_precision", "no", "--dynamo_backend", "no"]
    if main_process_port is None and nproc > 1:
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
) -> int:
    """Train `recipe_path` on `nproc` processes through accelerate; returns the launcher's exit code."""
    args = ["llmtune.cli", "train", str(recipe_path), *(overrides or [])]
    if resume:
        args.append("--resume")
    cmd, env = accelerate_command(args, nproc, accelerate_config)
    print("launching: " + shlex.join(cmd), file=sys.stderr, flush=True)
    return subprocess.call(cmd, env=env)
