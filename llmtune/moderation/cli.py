"""`llmtune moderate` and `llmtune moderation train|eval`: thin shells over the moderation package.

The lead registers them on the main app:
    app.command("moderate")(moderate_command)
    app.add_typer(moderation_app, name="moderation")
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from llmtune.console import exit_with, user_errors
from llmtune.errors import LlmtuneError


moderation_app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode="markdown",
    help="Train and measure the moderation adapter. Screen text with `llmtune moderate`.",
)


def _config(adapter: str | None, policy_file: Path | None, names_file: Path | None, recipe: Path | None):
    """A ModerationConfig from a recipe's `moderation:` section, with CLI flags on top."""
    from llmtune.moderation.policy import ModerationConfig
    from llmtune.schema import read_yaml_mapping, validate

    section: dict = {}
    text = ""
    if recipe is not None:
        doc, text = read_yaml_mapping(recipe, "recipe", LlmtuneError)
        section = dict(doc.get("moderation") or {})
    if adapter:
        section["adapter"] = adapter
    if policy_file:
        section["policy_file"] = str(policy_file)
    if names_file:
        section["real_person_names_file"] = str(names_file)
    where = str(recipe) if recipe else "--adapter/--policy-file/--names-file"
    return validate(ModerationConfig, section, where, LlmtuneError, text, prefix=("moderation",))


def moderate_command(
    text: Annotated[str | None, typer.Option("--text", help="One text to screen.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the decision as one JSON object on stdout.")] = False,
    input_path: Annotated[Path | None, typer.Option(
        "--input", help="JSONL rows: {\"text\"}, {\"messages\"} (a conversation; card text as system messages, `name` fields) "
                        "or {\"messages\", \"output\"} (a reply screened in its conversation).")] = None,
    output_path: Annotated[
        Path | None, typer.Option("--output", help="Where to write the rows back with `allowed`, `categories` and `evidence` added.")
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Texts per adapter batch.")] = 64,
    adapter: Annotated[str | None, typer.Option("--adapter", help="Adapter directory (default: the shipped `embedded` one).")] = None,
    policy_file: Annotated[Path | None, typer.Option("--policy-file", help="A platform policy YAML (extra categories, names).")] = None,
    names_file: Annotated[Path | None, typer.Option("--names-file", help="Extra real people's names, one per line.")] = None,
    recipe: Annotated[
        Path | None, typer.Option("--recipe", help="Take the `moderation:` section of this recipe as the config.")
    ] = None,
    threads: Annotated[int | None, typer.Option("--threads", min=1, help="CPU threads for torch (default: every core).")] = None,
) -> None:
    """Screen text against the moderation policy (hard floor always on).

    `llmtune moderate --text "..." --json` prints {"allowed", "categories", "scores", "layer"};
    `llmtune moderate --input rows.jsonl --output out.jsonl` screens a JSONL file: texts, conversations,
    or replies in their conversation; each row comes back unchanged with `allowed`, `categories`
    and `evidence` (which facts were found, and where) added.
    """
    from llmtune.distributed import configure_threads
    from llmtune.moderation.screener import load_screener

    if (text is None) == (input_path is None):
        exit_with("give exactly one of --text or --input (with --output)")
    if input_path is not None and output_path is None:
        exit_with("--input needs --output: where to write the screened rows")
    with user_errors():
        configure_threads(threads)
        screener = load_screener(_config(adapter, policy_file, names_file, recipe))
        if text is not None:
            decision = screener.screen(text)
            if as_json:
                print(json.dumps(decision.to_json(), ensure_ascii=False))
            else:
                verdict = "allowed" if decision.allowed else f"blocked: {', '.join(decision.categories)} (layer: {decision.layer})"
                print(verdict)
                for reason in decision.reasons:
                    print(f"  {reason}")
            return
        _moderate_file(screener, input_path, output_path, batch_size)


def _row_item(row, where: str):
    """One input row as what to screen: ("text", text) | ("messages", messages) | ("reply", messages, output)."""
    if isinstance(row.get("messages"), list):
        messages = row["messages"]
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("content", ""), (str, list)):
                raise LlmtuneError(f"{where}: messages[{i}] must be an object with a `content` string")
        if "output" in row:
            if not isinstance(row["output"], str):
                raise LlmtuneError(f'{where}: "output" must be a string (the reply to screen in the conversation)')
            return ("reply", messages, row["output"])
        return ("messages", messages)
    if isinstance(row.get("text"), str):
        return ("text", row["text"])
    raise LlmtuneError(f'{where}: a row needs "text" (a string), "messages" (a conversation), or "messages" and "output"')


def _moderate_file(screener, input_path: Path, output_path: Path, batch_size: int) -> None:
    from rich.progress import track

    from llmtune.console import console

    from llmtune.jsonl import json_objects

    rows, items = [], []
    for _, where, row in json_objects(input_path, "--input"):
        items.append(_row_item(row, where))
        rows.append(row)
    decisions = [None] * len(rows)
    texts = [i for i, item in enumerate(items) if item[0] == "text"]
    for i, d in zip(texts, screener.screen_batch([items[i][1] for i in texts], batch_size=batch_size, progress=len(texts) > 200)):
        decisions[i] = d
    others = [i for i, item in enumerate(items) if item[0] != "text"]
    for i in track(others, description="conversations", console=console, transient=True, disable=len(others) < 20):
        item = items[i]
        decisions[i] = screener.screen_conversation(item[1], reply=item[2] if item[0] == "reply" else None)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = output_path.with_name(output_path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for row, d in zip(rows, decisions):
            f.write(json.dumps({**row, "allowed": d.allowed, "categories": d.categories, "evidence": d.evidence},
                               ensure_ascii=False) + "\n")
    tmp.replace(output_path)
    blocked = sum(not d.allowed for d in decisions)
    console.print(f"screened {len(rows)} rows: {len(rows) - blocked} allowed, {blocked} blocked -> {output_path}")


@moderation_app.command("train", epilog="Example: `llmtune moderation train recipes/moderation.yaml training.epochs=2`")
def train_command(
    recipe: Annotated[Path, typer.Argument(help="Moderation recipe YAML (recipes/moderation.yaml).")],
    overrides: Annotated[list[str] | None, typer.Argument(help="Overrides as section.key=value, e.g. training.epochs=2.")] = None,
) -> None:
    """Train the moderation adapter (LoRA + multi-label head on MiniLM) and calibrate its thresholds on dev."""
    from llmtune.moderation.train import load_moderation_recipe, train_moderation

    with user_errors():
        train_moderation(load_moderation_recipe(recipe, overrides or []))


@moderation_app.command("calibrate", epilog="Example: `llmtune moderation calibrate recipes/moderation.yaml "
                        "--adapter runs/moderation/adapter calibration.max_fpr.minor_sexual=0.01`")
def calibrate_command(
    recipe: Annotated[Path, typer.Argument(help="The moderation recipe the adapter was trained with.")],
    adapter: Annotated[Path, typer.Option("--adapter", help="Adapter directory to recalibrate in place (runs/NAME/adapter).")],
    overrides: Annotated[list[str] | None, typer.Argument(help="Overrides, e.g. calibration.max_fpr.minor_sexual=0.01.")] = None,
) -> None:
    """Recalibrate a trained adapter's thresholds (other over-blocking budgets or recall targets) without retraining."""
    from llmtune.moderation.train import load_moderation_recipe, recalibrate_moderation

    with user_errors():
        recalibrate_moderation(load_moderation_recipe(recipe, overrides or []), adapter)


@moderation_app.command("eval", epilog="Example: `llmtune moderation eval --split heldout --json`")
def eval_command(
    split: Annotated[str, typer.Option("--split", help="`heldout` (frozen, aggregates only), `dev` (under --eval-dir) or a JSONL path.")] = "heldout",
    adapter: Annotated[str, typer.Option("--adapter", help="Adapter directory, or `embedded` for the shipped one.")] = "embedded",
    as_json: Annotated[bool, typer.Option("--json", help="Print metrics.json to stdout.")] = False,
    out: Annotated[Path | None, typer.Option("--out", help="Output directory (default runs/moderation-eval/SPLIT).")] = None,
    eval_dir: Annotated[Path, typer.Option("--eval-dir", help="Where the named sets live.")] = Path("data/moderation/eval"),
    threads: Annotated[int | None, typer.Option("--threads", min=1, help="CPU threads for torch (default: every core).")] = None,
) -> None:
    """Recall per category, false-positive rates on adult requests and tame roleplay, per kind, language and obfuscation."""
    from llmtune.moderation.evaluate import evaluate_moderation
    from llmtune.distributed import configure_threads

    with user_errors():
        configure_threads(threads)
        result = evaluate_moderation(split, adapter, out, eval_dir)
    if as_json:
        print(json.dumps(result.to_json(), indent=2))
