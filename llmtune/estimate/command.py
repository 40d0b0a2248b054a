"""`llmtune estimate RECIPE [overrides] [--gpu-mem 12] [--json]`: will this recipe fit my GPU?"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from llmtune.console import exit_with, user_errors

GiB = 1024**3


def _gib(n: int) -> str:
    return f"{n / GiB:.2f} GiB"


def local_gpu_mem_gb() -> float | None:
    """This machine's first CUDA device, in GiB, or None without one."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(0).total_memory / GiB


def render(est) -> None:
    """The estimate as a rich table on stdout, then the verdict and the changes that would make it fit."""
    from rich.console import Console
    from rich.table import Table

    from llmtune.estimate.memory import BREAKDOWN_LABELS

    out = Console(file=sys.stdout, soft_wrap=True)
    arch = est.arch
    title = f"{est.recipe}: {est.model}"
    if arch is not None:
        title += f" ({arch.layers} layers, hidden {arch.hidden}, vocab {arch.vocab:,}) on {est.device}"
    table = Table(title=title, show_footer=True, caption=f"peak moment: {est.moment}")
    table.add_column("part", footer="peak", no_wrap=True)
    table.add_column("memory", justify="right", footer=_gib(est.peak_bytes), no_wrap=True)
    table.add_column("share", justify="right", footer="100%")
    for key, value in est.breakdown.items():
        if value:
            label = BREAKDOWN_LABELS.get(key, key)
            if key == "unquantized_weights" and not est.breakdown.get("quantized_weights"):
                label = "weights (not quantized)"
            table.add_row(label, _gib(value), f"{100 * value / est.peak_bytes:.0f}%")
    out.print(table)
    if est.fits is None:
        what = "N GiB of RAM" if est.device == "cpu" else "a card of N GiB"
        out.print(f"Nothing to compare with: pass --gpu-mem N to check against {what} (e.g. --gpu-mem 12).")
    elif est.fits:
        out.print(f"[green]fits[/] {est.gpu_mem_bytes / GiB:g} GiB: {_gib(est.peak_bytes)} of "
                  f"{_gib(est.usable_bytes)} usable ({_gib(est.usable_bytes - est.peak_bytes)} to spare).")
    else:
        out.print(f"[red]does not fit[/] {est.gpu_mem_bytes / GiB:g} GiB: {_gib(est.peak_bytes)} needed, "
                  f"{_gib(est.usable_bytes)} usable.")
        if est.suggestions:
            out.print("Try, in this order (each on top of the ones before):")
            for s in est.suggestions:
                verdict = "[green]fits[/]" if s.fits else "still too big"
                out.print(f"  {s.change}  -> {_gib(s.peak_bytes)} ({verdict}): {s.why}")
        else:
            out.print("No recipe change makes it fit this card; pick a smaller model or a larger card.")
    for note in est.notes:
        out.print(f"[dim]note: {note}[/]")


RecipeArg = typer.Argument(..., help="Recipe YAML file (or a run directory holding recipe.yaml).")
OverridesArg = typer.Argument(None, help="Overrides as section.key=value, e.g. training.micro_batch_size=2.")
GpuMemOpt = typer.Option(None, "--gpu-mem", help="Card memory in GiB to check against (default: this machine's GPU, if any).")
JsonOpt = typer.Option(False, "--json", help="Print {peak_bytes, fits, breakdown, ...} as JSON (with `preference`: the same for that stage).")
DeviceOpt = typer.Option("cuda", "--device", help="`cuda` (predict a GPU run) or `cpu` (fp32 CPU run, in RAM).")


def estimate_command(
    recipe: Path = RecipeArg,
    overrides: list[str] = OverridesArg,
    gpu_mem: float | None = GpuMemOpt,
    as_json: bool = JsonOpt,
    device: str = DeviceOpt,
) -> None:
    """Predict peak GPU memory of training RECIPE (and of its preference stage), broken down, and whether it fits (no GPU or download needed)."""
    from llmtune.config import load_recipe
    from llmtune.estimate.memory import estimate

    if device not in ("cuda", "cpu"):
        exit_with(f"--device must be cuda or cpu, not {device!r}")
    with user_errors():
        path = recipe / "recipe.yaml" if recipe.is_dir() else recipe
        r = load_recipe(path, overrides or [])
        mem = gpu_mem if gpu_mem is not None else (local_gpu_mem_gb() if device == "cuda" else None)
        est = estimate(r, mem, device=device)  # type: ignore[arg-type]
        # The preference stage's batches (chosen + rejected, padded) have their own peak.
        pref = estimate(r, mem, device=device, stage="preference") if r.preference and "preference" in r.stages else None  # type: ignore[arg-type]
    if as_json:
        out = est.to_json()
        if pref is not None:
            out["preference"] = pref.to_json()
        print(json.dumps(out, indent=2))
    else:
        render(est)
        if pref is not None:
            render(pref)
