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
    from llmtune.data.prepare import PreparedData, prepare
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
