"""`llmtune run`: every stage a recipe enables, in order, into one run directory."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


from llmtune.console import console
from llmtune.config import Recipe, save_resolved



@dataclass
class RunSummary:
    run_dir: Path
    stages: list[str]
    final_eval_loss: float | None
    base_eval_loss: float | None


def run_recipe(recipe: Recipe, resume: bool = False) -> RunSummary:
    from llmtune.artifacts import PreparedData
    from llmtune.data.prepare import prepare
    from llmtune.eval.evaluate import evaluate
    from llmtune.report import write_run_report
    from llmtune.train.sft import train

    run_dir = recipe.run_dir
    resolved = save_resolved(recipe, run_dir)
    console.print(f"[bold]llmtune run[/] {recipe.name}: stages {', '.join(recipe.stages)} -> {run_dir} (resolved recipe: {resolved})")

    prepared = prepare(recipe) if "prepare" in recipe.stages else PreparedData.load(run_dir)
    final_loss = base_loss = None
    if "train" in recipe.stages:
        final_loss = train(recipe, prepared, resume=resume).final_eval_loss
    if "preference" in recipe.stages:
        from llmtune.train.preference import train_preference

        train_preference(recipe, resume=resume)
    if "eval" in recipe.stages:
        result = evaluate(recipe)
        final_loss = result.finetuned.eval_loss
        base_loss = result.base.eval_loss if result.base else None
    if "merge" in recipe.stages:
        from llmtune.export.merge import merge

        merge(recipe)
    if "export" in recipe.stages:
        from llmtune.export.presets import export_for_apps

        export_for_apps(recipe)
    report = write_run_report(recipe)
    console.print(f"[bold green]done[/]: run directory {run_dir.resolve()} (report: {report})")
    return RunSummary(run_dir, list(recipe.stages), final_loss, base_loss)


def prepare_once(recipe: Recipe, group):
    """Prepared data for a run on several ranks: global rank 0 prepares it unless `llmtune prepare`
    already did, the others wait, and every rank must then read the same splits."""
    from llmtune.artifacts import PreparedData, RunDir
    from llmtune.data.prepare import prepare
    from llmtune.distributed import DistributedError

    run = RunDir(recipe.run_dir)
    data_dir = run.data
    failure = None
    if group.is_main and not run.prepared.exists():
        console.print(f"rank 0: preparing the data once for all {group.world_size} ranks (the others wait)")
        try:
            prepare(recipe)
        except Exception as exc:  # noqa: BLE001 (the other ranks must not wait for data that will never come)
            failure = f"{type(exc).__name__}: {exc}"
    failure = group.gather(failure)[0]
    if failure:
        raise DistributedError(f"rank 0 could not prepare the data: {failure}")
    seen = PreparedData.load(recipe.run_dir).fingerprint() if run.prepared.exists() else "none"
    group.agree(f"the prepared data in {data_dir}", seen,
                hint="output.dir must be on storage every node shares (or run `llmtune prepare` on every node "
                     "with the same data before training)")
    return PreparedData.load(recipe.run_dir)


def train_on_ranks(recipe: Recipe, resume: bool = False):
    """The train stage as one rank of a multi-process or multi-node run (launched by accelerate,
    torchrun or SLURM): join the ranks, check they run one recipe, prepare the data once, train."""
    from llmtune.distributed import join_group
    from llmtune.models import device_type
    from llmtune.train.sft import train

    group = join_group(cpu=device_type() == "cpu")
    group.check_recipe(recipe)
    if group.is_main:
        save_resolved(recipe, recipe.run_dir)
    return train(recipe, prepare_once(recipe, group), resume=resume)
