"""The `llmtune` command. It only parses arguments and calls the stage entry points."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from llmtune.config import load_recipe
from llmtune.errors import LlmtuneError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode="markdown",
    help="Fine-tune chat models on roleplay data with recipes. Start with: `llmtune run recipes/demo-cpu.yaml`",
)

RecipeArg = typer.Argument(..., help="Recipe YAML file (or, for `eval`, a run directory holding recipe.yaml).")
OverridesArg = typer.Argument(None, help="Overrides as section.key=value, e.g. training.max_steps=20 lora.rank=8.")




def _recipe(path: Path, overrides: list[str] | None):
    if path.is_dir():
        path = path / "recipe.yaml"  # a run directory: its fully resolved recipe
    return load_recipe(path, overrides or [])


def _call(fn, *args, **kwargs):
    """Run a stage; turn user-facing errors into one red line and exit code 2 (no traceback)."""
    try:
        return fn(*args, **kwargs)
    except (LlmtuneError, FileNotFoundError) as exc:
        _exit_with(str(exc))


def _exit_with(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise typer.Exit(2)


@app.command(epilog="Example: `llmtune run recipes/demo-cpu.yaml training.max_steps=20`")
def run(
    recipe: Path = RecipeArg,
    overrides: list[str] = OverridesArg,
    resume: bool = typer.Option(False, "--resume", help="Continue training from the last complete checkpoint."),
) -> None:
    """Run every stage the recipe enables (prepare, train, eval) into runs/NAME."""
    from llmtune.run import run_recipe

    _call(lambda: run_recipe(_recipe(recipe, overrides), resume=resume))


@app.command(epilog="Example: `llmtune prepare recipes/demo-cpu.yaml data.val_fraction=0.2`")
def prepare(recipe: Path = RecipeArg, overrides: list[str] = OverridesArg) -> None:
    """Read, validate, dedup, template and split the recipe's data into runs/NAME/data."""
    from llmtune.config import save_resolved
    from llmtune.data.prepare import prepare as prepare_stage

    def go():
        r = _recipe(recipe, overrides)
        save_resolved(r, r.run_dir)
        prepare_stage(r)

    _call(go)


@app.command(epilog="Example: `llmtune train recipes/demo-cpu.yaml --resume` or `llmtune train RECIPE --nproc 2`")
def train(
    recipe: Path = RecipeArg,
    overrides: list[str] = OverridesArg,
    resume: bool = typer.Option(False, "--resume", help="Continue from the last complete checkpoint."),
    nproc: int = typer.Option(1, "--nproc", help="Processes to train on (one per GPU; CPU ranks share the cores), via accelerate launch."),
    accelerate_config: str = typer.Option(None, "--accelerate-config", help="accelerate config file, or ddp/fsdp/fsdp-qlora/zero2/zero3 (recipes/accelerate/)."),
) -> None:
    """Fine-tune (LoRA or QLoRA) on data prepared by `llmtune prepare` (run it first)."""
    from llmtune.config import save_resolved
    from llmtune.data.prepare import PreparedData
    from llmtune.train.sft import train as train_stage

    def go():
        r = _recipe(recipe, overrides)
        if not (r.run_dir / "data" / "prepared.json").exists():
            raise FileNotFoundError(f"no prepared data in {r.run_dir / 'data'}; run `llmtune prepare {recipe}` first")
        if nproc > 1 or accelerate_config:
            from llmtune.launch import launch_training

            rc = launch_training(recipe, overrides or [], nproc, accelerate_config, resume)
            if rc:
                raise typer.Exit(rc)
            return
        save_resolved(r, r.run_dir)
        train_stage(r, PreparedData.load(r.run_dir), resume=resume)

    _call(go)


@app.command("eval", epilog="Example: `llmtune eval runs/demo-cpu --json`")
def eval_(
    recipe: Path = RecipeArg,
    overrides: list[str] = OverridesArg,
    as_json: bool = typer.Option(False, "--json", help="Print eval.json to stdout."),
) -> None:
    """Compare the fine-tune with its base on the held-back split: eval loss and sample replies."""
    from llmtune.eval.evaluate import evaluate

    result = _call(lambda: evaluate(_recipe(recipe, overrides)))
    if as_json:
        print(json.dumps(result.to_json(), indent=2, ensure_ascii=False))


@app.command(epilog="Example: `llmtune merge runs/demo-cpu`")
def merge(
    run: Path = typer.Argument(..., help="Run directory (or its recipe file)."),
    overrides: list[str] = OverridesArg,
) -> None:
    """Merge the adapter into a 16/32-bit base (QLoRA-aware), verify logits, write merged/."""
    from llmtune.export.merge import merge as merge_stage

    _call(lambda: merge_stage(_recipe(run, overrides)))


@app.command(epilog="Example: `llmtune export runs/demo-cpu export.gguf_types=[f16,q8_0]`")
def export(
    run: Path = typer.Argument(..., help="Run directory (or its recipe file)."),
    overrides: list[str] = OverridesArg,
) -> None:
    """Write chat-app presets, a KoboldCpp adapter, an Ollama Modelfile and verified GGUF files into RUN/export."""
    from llmtune.export.presets import export_for_apps

    _call(lambda: export_for_apps(_recipe(run, overrides)))


@app.command(epilog="Example: `llmtune serve runs/demo-cpu --config serve/gateway.example.yaml --port 8000`")
def serve(
    target: Path = typer.Argument(..., help="Run directory (serves merged/ or base + adapter/) or model directory."),
    adapter: list[str] = typer.Option(None, "--adapter", help="Extra LoRA adapter as name=path (repeatable)."),
    config: Path = typer.Option(None, "--config", help="Gateway config YAML (see serve/gateway.example.yaml)."),
    port: int = typer.Option(None, help="Gateway port (overrides the config)."),
    host: str = typer.Option(None, help="Gateway bind address (overrides the config)."),
    eager: bool = typer.Option(True, "--eager/--no-eager", help="vLLM --enforce-eager (CPU: ready in ~30 s)."),
    tensor_parallel_size: int = typer.Option(1, "--tp", help="vLLM tensor-parallel size (GPUs)."),
    max_model_len: int = typer.Option(2048, help="vLLM context length."),
) -> None:
    """Serve a model: vLLM on loopback behind the moderated, authenticated OpenAI-compatible gateway."""
    from llmtune.serve.config import load_serve_config
    from llmtune.serve.run import ServeRequest, serve as serve_stage

    def go():
        cfg = load_serve_config(config)
        if port:
            cfg.port = port
        if host:
            cfg.host = host
        extra = {}
        for item in adapter or []:
            name, sep, path = item.partition("=")
            if not sep or not name or not Path(path).is_dir():
                _exit_with(f"--adapter {item}: expected name=path to an adapter directory")
            extra[name] = path
        serve_stage(ServeRequest(target, cfg, extra, enforce_eager=eager, tensor_parallel_size=tensor_parallel_size,
                                 max_model_len=max_model_len))

    _call(go)


@app.command(epilog="Example: `llmtune chat runs/demo-cpu --card data/roleplay/card_orin.png`")
def chat(
    target: str = typer.Argument(..., help="Run directory (starts vLLM + gateway for the session) or gateway URL."),
    card: Path = typer.Option(None, "--card", help="Character card (PNG/JSON): its persona and greeting."),
    key: str = typer.Option(None, "--key", help="API key for a URL (default: $LLMTUNE_API_KEY)."),
    model: str = typer.Option(None, "--model", help="Model name (default: the first the server lists)."),
    system: str = typer.Option(None, "--system", help="System prompt when there is no card."),
    max_tokens: int = typer.Option(200, help="Reply token limit."),
    temperature: float = typer.Option(0.8, help="Sampling temperature."),
    message: list[str] = typer.Option(None, "--message", "-m", help="Send this message (repeatable), print the reply, exit."),
) -> None:
    """Chat in the terminal with streaming replies; /reset, /save FILE, /system TEXT, /quit."""
    from llmtune.serve.chat import run_chat

    _call(lambda: run_chat(target, card, key, model, system, max_tokens, temperature, message))


keys_app = typer.Typer(no_args_is_help=True, help="API keys of the gateway (stored hashed, bound to age verification).")
app.add_typer(keys_app, name="keys")
KeysFile = typer.Option("serve/keys.json", "--keys-file", help="Key store (the serve config's keys_file).")


@keys_app.command("add", epilog="Example: `llmtune keys add alice --age-verified-by id-document --verifier ops@example.org`")
def keys_add(
    name: str = typer.Argument(..., help="Who the key is for."),
    age_verified_by: str = typer.Option(None, "--age-verified-by", help="How the holder's adult age was verified."),
    verifier: str = typer.Option("operator", help="Who verified it."),
    date: str = typer.Option(None, help="When (ISO date; default today)."),
    keys_file: Path = KeysFile,
) -> None:
    """Create a key; prints it once. Without --age-verified-by the key is refused (403) until replaced."""
    import datetime as dt

    from llmtune.serve.keys import AgeVerification, KeyStore

    def go():
        verification = None
        if age_verified_by:
            verification = AgeVerification(age_verified_by, verifier, date or dt.date.today().isoformat())
        key, record = KeyStore(keys_file).add(name, verification)
        print(key)
        err_note = "" if verification else " (no age verification: requests with it get 403)"
        print(f"key {record.id} for {name} stored hashed in {keys_file}{err_note}; it is not shown again", file=sys.stderr)

    _call(go)


@keys_app.command("list", epilog="Example: `llmtune keys list`")
def keys_list(keys_file: Path = KeysFile) -> None:
    """Keys with their ids, status and age-verification records (never the keys themselves)."""
    from llmtune.serve.keys import KeyStore

    for r in _call(lambda: KeyStore(keys_file)).records:
        av = r.age_verification
        verified = f"verified by {av.method} ({av.verifier}, {av.date})" if av else "NOT age-verified"
        print(f"{r.id}\t{r.name}\t{'revoked' if r.revoked else 'live'}\t{verified}\tcreated {r.created}")


@keys_app.command("revoke", epilog="Example: `llmtune keys revoke alice`")
def keys_revoke(name_or_id: str = typer.Argument(...), keys_file: Path = KeysFile) -> None:
    """Revoke a key by name or id (requests with it get 401)."""
    from llmtune.serve.keys import KeyStore

    r = _call(lambda: KeyStore(keys_file).revoke(name_or_id))
    print(f"revoked {r.id} ({r.name})", file=sys.stderr)


from llmtune.estimate.command import estimate_command  # noqa: E402  (light: no torch import)

app.command("estimate", epilog="Example: `llmtune estimate recipes/qwen2.5-7b-qlora-16gb.yaml --gpu-mem 16`")(estimate_command)


from llmtune.moderation.cli import moderate_command, moderation_app  # noqa: E402  (light until used)

app.command("moderate", epilog='Example: `llmtune moderate --text "a tavern scene between two adults" --json`')(moderate_command)
app.add_typer(moderation_app, name="moderation")


data_app = typer.Typer(no_args_is_help=True, help="Look at data files before training on them.")
app.add_typer(data_app, name="data")


@data_app.command("inspect", epilog="Example: `llmtune data inspect data/roleplay/*.jsonl --json`")
def data_inspect(
    files: list[Path] = typer.Argument(..., help="Data files (any supported format)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object with the counts."),
    model: str = typer.Option("embedded:smollm2-135m-instruct", help="Base whose tokenizer and template to use."),
    chat_template: str = typer.Option(None, help="`chatml` or a Jinja file instead of the tokenizer's template."),
    mask: str = typer.Option("assistant", help="assistant | all | last"),
) -> None:
    """Detect formats, validate, dedup and count rows; show one rendered sample with its trained tokens."""
    from llmtune.data.inspect import inspect_files, print_inspection

    missing = [str(f) for f in files if not f.exists()]
    if missing:
        _exit_with(f"no such file: {', '.join(missing)}")
    result, tokenizer = _call(lambda: inspect_files(files, model, chat_template, mask))
    if as_json:
        print(json.dumps(result.to_json()))
    else:
        print_inspection(result, tokenizer)


@app.command(epilog="Example: `llmtune validate recipes/demo-cpu.yaml lora.rank=8`")
def validate(recipe: Path = RecipeArg, overrides: list[str] = OverridesArg) -> None:
    """Check a recipe (and overrides) and print it fully resolved, without running anything."""
    r = _call(lambda: _recipe(recipe, overrides))
    print(r.to_yaml(), end="")


@app.command(epilog="Example: `llmtune models`")
def models() -> None:
    """List the embedded base models (no hub needed)."""
    from llmtune.models import EMBEDDED_MODELS

    for name, desc in EMBEDDED_MODELS.items():
        print(f"embedded:{name}\t{desc}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
