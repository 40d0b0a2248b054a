"""The `llmtune` command. It only parses arguments and calls the stage entry points."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from llmtune.config import load_recipe
from llmtune.console import call as _call
from llmtune.console import exit_with as _exit_with
from llmtune.serve.vllm_server import VLLMConfig

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


@app.command(epilog="Example: `llmtune run recipes/demo-cpu.yaml training.max_steps=20`")
def run(
    recipe: Path = RecipeArg,
    overrides: list[str] = OverridesArg,
    resume: bool = typer.Option(False, "--resume", help="Continue training from the last complete checkpoint."),
) -> None:
    """Run every stage the recipe enables (prepare, train, preference, eval, merge, export) into runs/NAME."""
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


@app.command(epilog="Example: `llmtune train recipes/demo-cpu.yaml --resume`, `llmtune train RECIPE --nproc 2`, or on "
                    "each of two machines `llmtune train RECIPE --nnodes 2 --node-rank R --master-addr NODE0 --nproc 8` "
                    "(docs/distributed.md)")
def train(
    recipe: Path = RecipeArg,
    overrides: list[str] = OverridesArg,
    resume: bool = typer.Option(False, "--resume", help="Continue from the last complete checkpoint."),
    nproc: int = typer.Option(1, "--nproc", help="Processes to train on per machine (one per GPU; CPU ranks share the cores), via accelerate launch."),
    accelerate_config: str = typer.Option(None, "--accelerate-config", help="accelerate config file, or ddp/fsdp/fsdp-qlora/zero2/zero3 (recipes/accelerate/)."),
    nnodes: int = typer.Option(1, "--nnodes", help="Machines in the run; start `llmtune train` on each with its own --node-rank."),
    node_rank: int = typer.Option(0, "--node-rank", help="This machine's rank, 0..nnodes-1; node 0 hosts the rendezvous."),
    master_addr: str = typer.Option(None, "--master-addr", help="Address of node 0 that every node can reach (needed with --nnodes > 1)."),
    master_port: int = typer.Option(29500, "--master-port", help="TCP port on node 0 for the rendezvous."),
    rdzv_timeout: float = typer.Option(300.0, "--rdzv-timeout", help="Seconds the nodes wait for each other before failing."),
) -> None:
    """Fine-tune (LoRA or QLoRA) on data prepared by `llmtune prepare` (on several processes or machines,
    rank 0 prepares it if that has not been done)."""
    import os

    from llmtune.config import save_resolved
    from llmtune.artifacts import PreparedData, RunDir
    from llmtune.train.sft import train as train_stage

    def go():
        r = _recipe(recipe, overrides)
        if nproc > 1 or accelerate_config or nnodes > 1:
            from llmtune.distributed import NodeSpec
            from llmtune.launch import launch_training

            node = NodeSpec(nnodes, node_rank, master_addr or "", master_port, nproc)
            node.validate()
            rc = launch_training(recipe, overrides or [], nproc, accelerate_config, resume,
                                 node=node if nnodes > 1 else None, rdzv_timeout=rdzv_timeout)
            if rc:
                raise typer.Exit(rc)
            return
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # one rank of a run that accelerate/torchrun launched
            from llmtune.run import train_on_ranks

            train_on_ranks(r, resume=resume)
            return
        if not RunDir(r.run_dir).prepared.exists():
            raise FileNotFoundError(f"no prepared data in {RunDir(r.run_dir).data}; run `llmtune prepare {recipe}` first")
        save_resolved(r, r.run_dir)
        train_stage(r, PreparedData.load(r.run_dir), resume=resume)

    _call(go)


@app.command(epilog="Example: `llmtune preference recipes/demo-dpo-cpu.yaml preference.max_steps=10` (after prepare and train)")
def preference(
    recipe: Path = RecipeArg,
    overrides: list[str] = OverridesArg,
    resume: bool = typer.Option(False, "--resume", help="Continue from the last complete preference checkpoint."),
) -> None:
    """Preference-tune (DPO, KTO, ORPO, SimPO) on the pairs `llmtune prepare` made, on top of the SFT adapter."""
    from llmtune.artifacts import RunDir
    from llmtune.config import save_resolved
    from llmtune.train.preference import train_preference

    def go():
        r = _recipe(recipe, overrides)
        run = RunDir(r.run_dir)
        if not run.preference_prepared.exists():
            raise FileNotFoundError(f"no prepared preference data in {run.preference_data}; "
                                    f"run `llmtune prepare {recipe}` first (the recipe needs a `preference:` section)")
        save_resolved(r, r.run_dir)
        train_preference(r, resume=resume)

    _call(go)


@app.command("eval", epilog="Example: `llmtune eval runs/demo-cpu --json`")
def eval_(
    recipe: Path = RecipeArg,
    overrides: list[str] = OverridesArg,
    as_json: bool = typer.Option(False, "--json", help="Print eval.json to stdout."),
) -> None:
    """Compare the fine-tune with its base on the held-back split: eval loss and sample replies."""
    from llmtune.eval.evaluate import evaluate
    from llmtune.report import write_run_report

    def go():
        r = _recipe(recipe, overrides)
        result = evaluate(r)
        write_run_report(r)
        return result

    result = _call(go)
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


StoreOpt = typer.Option(None, "--store", envvar="LLMTUNE_STORE",
                        help="Keys and audit: a SQLite file or a database URL (default: the config's `store`).")
ServeConfigOpt = typer.Option(None, "--config", help="Gateway config YAML whose `store` (and retention) to use.")


@app.command(epilog="Example: `llmtune serve runs/demo-cpu --config serve/gateway.example.yaml --port 8000`")
def serve(
    target: Path = typer.Argument(None, help="Run directory (serves merged/ or base + adapter/) or model directory."),
    adapter: list[str] = typer.Option(None, "--adapter", help="Extra LoRA adapter as name=path (repeatable)."),
    config: Path = typer.Option(None, "--config", help="Gateway config YAML (see serve/gateway.example.yaml)."),
    port: int = typer.Option(None, help="Gateway port (overrides the config)."),
    host: str = typer.Option(None, help="Gateway bind address (overrides the config)."),
    store: str = typer.Option(None, "--store", envvar="LLMTUNE_STORE", help="Keys and audit store (overrides the config)."),
    rate_limit_storage: str = typer.Option(None, "--rate-limit-storage", envvar="LLMTUNE_RATE_LIMIT_STORAGE",
                                           help="memory:// or redis://HOST:6379/0 (overrides the config)."),
    upstream: str = typer.Option(None, "--upstream", help="Run only the gateway, in front of this vLLM URL (no TARGET)."),
    eager: bool = typer.Option(VLLMConfig.enforce_eager, "--eager/--no-eager", help="vLLM --enforce-eager (CPU: ready in ~30 s)."),
    tensor_parallel_size: int = typer.Option(VLLMConfig.tensor_parallel_size, "--tp", min=1, help="vLLM tensor-parallel size (GPUs)."),
    max_model_len: int = typer.Option(VLLMConfig.max_model_len, min=1, help="vLLM context length."),
) -> None:
    """Serve a model: vLLM on loopback behind the moderated, authenticated OpenAI-compatible gateway."""
    from llmtune.schema import assign
    from llmtune.serve.config import ServeConfigError, load_serve_config
    from llmtune.serve.run import ServeRequest, serve as serve_stage, serve_gateway

    def go():
        cfg = load_serve_config(config)
        for name, value in (("port", port), ("host", host), ("store", store), ("rate_limit_storage", rate_limit_storage)):
            if value is not None:  # checked like the same key in the config file
                assign(cfg, name, value, f"--{name.replace('_', '-')}", ServeConfigError)
        if (target is None) == (upstream is None):
            _exit_with("give a run or model directory to serve, or --upstream URL of a running vLLM (not both)")
        if upstream:
            return serve_gateway(cfg, upstream)
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


def _serve_config(config: Path | None):
    from llmtune.serve.config import load_serve_config

    return load_serve_config(config)


def _store(store: str | None, config: Path | None):
    """The key and audit store: --store / $LLMTUNE_STORE, else the config's `store`, else serve/llmtune.db."""
    from llmtune.serve.store import open_store

    return open_store(store or _serve_config(config).store)
@app.command(
    epilog="Examples: `llmtune review runs/demo-cpu base` (judge, on http://127.0.0.1:8765/), "
    "`llmtune review runs/a runs/b review.max_conversations=40`, `llmtune review export runs/demo-cpu`",
)
def review(
    args: list[str] = typer.Argument(..., help="RUN_A [RUN_B | base] [section.key=value ...], or: export RUN_A [RUN_B | base]."),
    port: int = typer.Option(8765, help="Port on 127.0.0.1 (0: any free port). The page never listens beyond loopback."),
    fresh: bool = typer.Option(False, "--fresh", help="Generate new replies even if a review exists (the old file is kept)."),
    out: Path = typer.Option(None, "--out", help="export: folder for preferences.jsonl and kto.jsonl (default: the review's)."),
) -> None:
    """Judge two models blind, side by side (RUN_A against RUN_B or its base), in a local web page.

    Replies are generated first (batched, seeded, screened by the moderation screen), then
    served on loopback; verdicts are saved in SQLite as you make them, so reopening resumes.
    `llmtune review export RUN_A [RUN_B|base]` writes the verdicts as TRL preference pairs and
    "both bad" as KTO rows.
    """
    if args[0] == "export":
        if len(args) not in (2, 3):
            _exit_with("usage: llmtune review export RUN_A [RUN_B | base] [--out DIR]")
        return _review_export(Path(args[1]), args[2] if len(args) == 3 else None, out)
    positional = [a for a in args if "=" not in a]
    overrides = [a for a in args if "=" in a]
    if len(positional) not in (1, 2) or args[: len(positional)] != positional:
        _exit_with("usage: llmtune review RUN_A [RUN_B | base] [section.key=value ...]")
    from llmtune.report import write_run_report
    from llmtune.review.generate import BASE, open_review
    from llmtune.review.server import serve_review

    def go():
        r = open_review(Path(positional[0]), positional[1] if len(positional) == 2 else BASE, overrides, fresh)
        serve_review(r, port, on_results=lambda _results: write_run_report(r.recipe_a))

    _call(go)


def _review_export(run_a: Path, opponent: str | None, out: Path | None) -> None:
    from llmtune.report import write_run_report
    from llmtune.review.export import export_judgments
    from llmtune.review.generate import find_review, load_run
    from llmtune.review.results import write_results
    from llmtune.review.store import ReviewStore

    def go():
        path = find_review(run_a, opponent)
        store = ReviewStore.open(path)
        result = export_judgments(store, out or path.parent)
        write_results(store, path.parent)
        write_run_report(load_run(run_a))
        print(result.summary(), file=sys.stderr)

    _call(go)


keys_app = typer.Typer(no_args_is_help=True, help="API keys of the gateway (stored hashed, bound to age verification).")
app.add_typer(keys_app, name="keys")


@keys_app.command("add", epilog="Example: `llmtune keys add alice --age-verified-by id-document --verifier ops@example.org`")
def keys_add(
    name: str = typer.Argument(..., help="Who the key is for (an account id rather than a person's name)."),
    age_verified_by: str = typer.Option(None, "--age-verified-by", help="How the holder's adult age was verified."),
    verifier: str = typer.Option("operator", help="Who verified it."),
    date: str = typer.Option(None, help="When (ISO date; default today)."),
    requests_per_minute: int = typer.Option(None, "--requests-per-minute", min=1, help="The key's own rate limit (with --burst)."),
    burst: int = typer.Option(None, "--burst", min=1, help="The key's own burst (with --requests-per-minute)."),
    store: str = StoreOpt,
    config: Path = ServeConfigOpt,
) -> None:
    """Create a key; prints it once. Without --age-verified-by the key is refused (403) until replaced."""
    import datetime as dt

    from llmtune.serve.keys import AgeVerification

    def go():
        verification = None
        if age_verified_by:
            verification = AgeVerification(age_verified_by, verifier, date or dt.date.today().isoformat())
        s = _store(store, config)
        key, record = s.add(name, verification, requests_per_minute, burst)
        print(key)
        err_note = "" if verification else " (no age verification: requests with it get 403)"
        print(f"key {record.id} for {name} stored hashed in {s.display}{err_note}; it is not shown again", file=sys.stderr)

    _call(go)


@keys_app.command("list", epilog="Example: `llmtune keys list --store postgresql://llmtune@db/llmtune`")
def keys_list(store: str = StoreOpt, config: Path = ServeConfigOpt,
              as_json: bool = typer.Option(False, "--json", help="One JSON object per key.")) -> None:
    """Keys with their ids, status, limits and age-verification records (never the keys themselves)."""
    from dataclasses import asdict

    for r in _call(lambda: _store(store, config).records):
        if as_json:
            print(json.dumps({k: v for k, v in asdict(r).items() if k != "sha256"}))
            continue
        av = r.age_verification
        verified = f"verified by {av.method} ({av.verifier}, {av.date})" if av else "NOT age-verified"
        status = f"revoked {r.revoked_at}" + (f" ({r.revoke_reason})" if r.revoke_reason else "") if r.revoked else "live"
        limit = f"{r.requests_per_minute}/min burst {r.burst}" if r.burst else "default limit"
        print(f"{r.id}\t{r.name}\t{status}\t{verified}\t{limit}\tcreated {r.created}")


@keys_app.command("revoke", epilog="Example: `llmtune keys revoke alice --reason \"verification withdrawn\"`")
def keys_revoke(name_or_id: str = typer.Argument(...), reason: str = typer.Option(None, help="Why (kept with the key)."),
                store: str = StoreOpt, config: Path = ServeConfigOpt) -> None:
    """Revoke a key by name or id: every gateway replica answers 401 from its next request on, no restart."""
    r = _call(lambda: _store(store, config).revoke(name_or_id, reason))
    print(f"revoked {r.id} ({r.name})", file=sys.stderr)


@keys_app.command("limit", epilog="Example: `llmtune keys limit alice --requests-per-minute 240 --burst 20`")
def keys_limit(
    name_or_id: str = typer.Argument(...),
    requests_per_minute: int = typer.Option(None, "--requests-per-minute", min=1),
    burst: int = typer.Option(None, "--burst", min=1),
    default: bool = typer.Option(False, "--default", help="Drop the key's own limit (the config's applies)."),
    store: str = StoreOpt,
    config: Path = ServeConfigOpt,
) -> None:
    """Set a key's own rate limit (it comes before the config's `key_rate_limits` and `rate_limit`)."""
    if default and (requests_per_minute or burst):
        _exit_with("--default drops the key's own limit; give it alone")
    r = _call(lambda: _store(store, config).set_limit(name_or_id, requests_per_minute, burst))
    limit = f"{r.requests_per_minute}/min, burst {r.burst}" if r.burst else "the config's limit"
    print(f"{r.id} ({r.name}): {limit}", file=sys.stderr)


@keys_app.command("import", epilog="Example: `llmtune keys import serve/keys.json --store postgresql://llmtune@db/llmtune`")
def keys_import(keys_file: Path = typer.Argument(..., help="A keys.json written by an older llmtune."),
                store: str = StoreOpt, config: Path = ServeConfigOpt) -> None:
    """Copy the keys of an old keys.json (hashes, ids, verification records, revocations) into the store."""
    from llmtune.serve.keys import read_keys_json

    def go():
        s = _store(store, config)
        added, present = s.import_records(read_keys_json(keys_file))
        print(f"imported {added} keys from {keys_file} into {s.display}; {present} were already there", file=sys.stderr)

    _call(go)


audit_app = typer.Typer(no_args_is_help=True, help="The audit trail: retention and erasure.")
app.add_typer(audit_app, name="audit")


@audit_app.command("purge", epilog="Example: `llmtune audit purge --config serve/gateway.yaml` (daily, from cron)")
def audit_purge(older_than_days: int = typer.Option(None, "--older-than-days", min=1,
                                                    help="Default: the config's audit_retention_days (90)."),
                store: str = StoreOpt, config: Path = ServeConfigOpt) -> None:
    """Delete audit rows older than the retention period."""
    def go():
        days = older_than_days or _serve_config(config).audit_retention_days
        s = _store(store, config)
        print(f"deleted {s.purge_audit(days)} audit rows older than {days} days from {s.display}", file=sys.stderr)

    _call(go)


@audit_app.command("erase", epilog="Example: `llmtune audit erase alice`")
def audit_erase(name_or_id: str = typer.Argument(..., help="Key name (all its keys) or key id."),
                store: str = StoreOpt, config: Path = ServeConfigOpt) -> None:
    """Erase one key holder's audit trail (a data-protection erasure request). The key record stays."""
    def go():
        s = _store(store, config)
        ids, count = s.erase_audit(name_or_id)
        print(f"erased {count} audit rows of key {', '.join(ids)} from {s.display}", file=sys.stderr)

    _call(go)


store_app = typer.Typer(no_args_is_help=True, help="The key and audit database.")
app.add_typer(store_app, name="store")


@store_app.command("migrate", epilog="Example: `llmtune store migrate --store postgresql://llmtune@db/llmtune`")
def store_migrate(store: str = StoreOpt, config: Path = ServeConfigOpt) -> None:
    """Bring the schema to the newest revision (every command and the gateway also do this on start)."""
    from llmtune.serve.store import Store, migrate

    def go():
        s = Store(store or _serve_config(config).store, migrate_schema=False)
        before, after = migrate(s.engine)
        print(f"{s.display}: schema {before or 'empty'} -> {after}", file=sys.stderr)

    _call(go)


watermark_app = typer.Typer(no_args_is_help=True, help="The watermark on served replies (docs/serving.md).")
app.add_typer(watermark_app, name="watermark")


@watermark_app.command("detect", epilog="Examples: `llmtune watermark detect runs/demo-cpu --text \"...\"`, "
                       "`llmtune watermark detect runs/demo-cpu --input replies.jsonl --output scored.jsonl`")
def watermark_detect(
    target: Path = typer.Argument(..., help="What `llmtune serve` serves: a run or model directory (its tokenizer)."),
    text: str = typer.Option(None, "--text", help="One reply, as the client received it."),
    input_: Path = typer.Option(None, "--input", help="JSONL rows to score (the text in --field)."),
    output: Path = typer.Option(None, "--output", help="Where the rows go, each with `watermarked` and `p_value` added."),
    field: str = typer.Option("text", "--field", help="The JSONL field that holds the text."),
    p_value: float = typer.Option(None, "--p-value", min=0, max=1, help="Watermarked below this (default: the config's watermark.p_value)."),
    as_json: bool = typer.Option(False, "--json", help="Print the --text result as JSON."),
    store: str = StoreOpt,
    config: Path = ServeConfigOpt,
) -> None:
    """Score a reply (or JSONL rows) for this deployment's watermark: the same secret as `llmtune serve` from here."""
    from llmtune.watermark.detect import DetectRequest, detect_file, detect_text
    from llmtune.watermark.secret import deployment_key

    def go():
        if (text is None) == (input_ is None) or (input_ is not None) != (output is not None):
            _exit_with("give --text TEXT, or --input rows.jsonl with --output out.jsonl")
        cfg = _serve_config(config).watermark
        s = _store(store, config)
        key = deployment_key(s, cfg.gamma, create=False)
        req = DetectRequest(target, key, p_value if p_value is not None else cfg.p_value, field)
        print(f"secret {key.fingerprint} from {s.display}, gamma {key.gamma:g}, threshold p < {req.p_value:g}", file=sys.stderr)
        if text is not None:
            d = detect_text(req, text)
            if as_json:
                print(json.dumps(d.as_dict()))
            else:
                verdict = "watermarked" if d.watermarked else "not watermarked"
                print(f"score (z) {d.z_score:.2f}; {d.green}/{d.scored} token pairs green; p-value {d.p_value:.3g}: {verdict}")
            return
        rows, marked = detect_file(req, input_, output)
        print(f"{rows} rows scored, {marked} watermarked; wrote {output}", file=sys.stderr)

    _call(go)


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
