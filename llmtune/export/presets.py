"""The export stage: files that make chat apps format prompts exactly as training did.

Entry point: `export_for_apps(recipe) -> ExportResult`. The role prefixes and suffixes are
read off the training chat template itself (by rendering a probe conversation with fenced
contents), so SillyTavern presets, the KoboldCpp adapter, the Ollama TEMPLATE and the stop
strings can never drift from what the model learned. With a merged model it also writes
GGUF files (f16, q8_0, q4_k_m) that carry that template and stop at the end-of-turn token,
checks each one in llama.cpp against the merged model, and moves into export/ only files
that pass.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from llmtune.artifacts import PreparedData, RunDir, sample_prompts
from llmtune.config import Recipe
from llmtune.console import console
from llmtune.data.template import RoleSequences, role_sequences


def sillytavern_instruct(name: str, seq: RoleSequences) -> dict:
    """SillyTavern (1.12+) instruct preset: Advanced Formatting -> Instruct Template -> import."""
    return {
        "name": name,
        "input_sequence": seq.user_prefix,
        "input_suffix": seq.user_suffix,
        "output_sequence": seq.assistant_prefix,
        "output_suffix": seq.assistant_suffix,
        "system_sequence": seq.system_prefix,
        "system_suffix": seq.system_suffix,
        "first_output_sequence": "",
        "last_output_sequence": "",
        "stop_sequence": seq.stop[0],
        "wrap": False,
        "macro": True,
        "names_behavior": "none",
        "activation_regex": "",
        "skip_examples": False,
        "system_same_as_user": False,
        "sequences_as_stop_strings": True,
    }


def sillytavern_context(name: str) -> dict:
    """Context preset: the card fields in the order llmtune puts them into the system turn."""
    return {
        "name": name,
        "story_string": (
            "{{#if system}}{{system}}\n\n{{/if}}{{#if description}}{{description}}\n\n{{/if}}"
            "{{#if personality}}{{char}}'s personality: {{personality}}\n\n{{/if}}"
            "{{#if scenario}}Scenario: {{scenario}}\n\n{{/if}}{{#if mesExamples}}{{mesExamples}}{{/if}}"
        ),
        "example_separator": "",
        "chat_start": "",
        "use_stop_strings": False,
        "names_as_stop_strings": True,
        "always_force_name2": False,
        "trim_sentences": False,
        "single_line": False,
    }


def ollama_modelfile(seq: RoleSequences, source: str, adapter: str | None, system: str | None) -> str:
    """An Ollama Modelfile whose TEMPLATE reproduces the training template."""

    def go(s: str) -> str:
        return s.replace("\\", "\\\\").replace('"', '\\"')

    # No `{{-` trim markers: they would eat the newlines the training template writes.
    template = (
        "{{ range .Messages }}"
        f'{{{{ if eq .Role "system" }}}}{go(seq.system_prefix)}{{{{ .Content }}}}{go(seq.system_suffix)}'
        f'{{{{ else if eq .Role "user" }}}}{go(seq.user_prefix)}{{{{ .Content }}}}{go(seq.user_suffix)}'
        f"{{{{ else }}}}{go(seq.assistant_prefix)}{{{{ .Content }}}}{go(seq.assistant_suffix)}"
        "{{ end }}{{ end }}"
        f"{go(seq.assistant_prefix)}"
    )
    lines = [f"FROM {source}"]
    if adapter:
        lines.append(f"ADAPTER {adapter}")
    lines.append(f'TEMPLATE """{seq.bos}{template}"""')
    for stop in seq.stop:
        lines.append(f'PARAMETER stop "{go(stop)}"')
    if system:
        lines.append(f'SYSTEM """{system}"""')
    return "\n".join(lines) + "\n"


def koboldcpp_adapter(seq: RoleSequences) -> dict:
    """KoboldCpp chat-completions adapter (`--chatcompletionsadapter FILE`): how its
    OpenAI-compatible endpoint wraps each role, here exactly as training did."""
    return {
        "system_start": seq.system_prefix, "system_end": seq.system_suffix,
        "user_start": seq.user_prefix, "user_end": seq.user_suffix,
        "assistant_start": seq.assistant_prefix, "assistant_end": seq.assistant_suffix,
    }


CONNECT_GUIDE = """\
# Connect SillyTavern to {name}

1. Serve the model: `llmtune serve {run_dir}` (vLLM behind llmtune's moderated gateway) and
   create an API key bound to an age-verified adult: `llmtune keys add NAME --age-verified-by METHOD`.
2. In SillyTavern: API Connections -> Chat Completion -> Source "Custom (OpenAI-compatible)",
   Custom Endpoint `http://HOST:PORT/v1`, the API key from step 1, then pick the model
   `{model}` from the list.
3. For Text Completion mode instead, import the presets here under Advanced Formatting:
   `sillytavern-instruct.json` (Instruct Template) and `sillytavern-context.json` (Context
   Template). They reproduce the training chat template, including the stop string `{stop}`,
   so replies end where the model learned to end them.
{card_step}
5. Blocked replies: SillyTavern does not show why a reply ended, so when the content policy
   withholds a reply the gateway sends its `withheld_text` ("[reply withheld by the content
   policy]" by default) as the reply's last words; a blocked request shows as an error toast.
   Text Completion presets with many stop strings work as they are (the managed vLLM accepts
   up to 64).

Ollama: `ollama create {name} -f Modelfile` in this directory, then `ollama run {name}`.
{local}"""

LOCAL_GUIDE = """\
# Run {name} locally: llama.cpp server, KoboldCpp, Ollama

{table}

Pick `{pick}`: {pick_why}
`{full}` is the full-precision reference{q4}.

Every file carries the training chat template, and its EOS and EOT are the end-of-turn token
`{stop}`, so all three runtimes stop where the model learned to stop. The checks behind the
table are in `gguf_report.json`.

**These runtimes are outside llmtune's gateway: nothing screens the prompts or the replies.**
The model card's restrictions still apply: fiction between adults, for adults only, never
sexual content involving minors or real, identifiable people. To serve anyone but yourself,
use `llmtune serve {run_dir}` (moderated, keys bound to age verification).

## llama.cpp server

```bash
llama-server -m {pick} --jinja -c {ctx} --host 127.0.0.1 --port 8080
```

`--jinja` formats `/v1/chat/completions` with the chat template stored in the GGUF.

- SillyTavern, Text Completion: API type **llama.cpp**, server URL `http://127.0.0.1:8080`.
  Under Advanced Formatting pick llmtune's presets, not a built-in one: import
  `sillytavern-instruct.json` (Instruct Template, "llmtune {name}") and
  `sillytavern-context.json` (Context Template). They reproduce the training template and
  stop at `{stop}`.
- SillyTavern, Chat Completion: Source **Custom (OpenAI-compatible)**, endpoint
  `http://127.0.0.1:8080/v1`; the server applies the GGUF's template (presets do not apply).

## KoboldCpp

```bash
koboldcpp --model {pick} --contextsize {ctx} --host 127.0.0.1 --port 5001 --chatcompletionsadapter koboldcpp-adapter.json
```

`koboldcpp-adapter.json` tells KoboldCpp's OpenAI-compatible endpoint how training wrapped
each role. SillyTavern, Text Completion: API type **KoboldCpp**, URL `http://127.0.0.1:5001`,
with the same two llmtune presets as above.

## Ollama

```bash
ollama create {name} -f Modelfile    # in this directory: FROM ./{pick}, no conversion
ollama run {name}
```
"""


@dataclass
class ExportResult:
    export_dir: Path
    files: list[Path]
    gguf: list[dict] = field(default_factory=list)  # per GGUF file: what was written and how it verified


def _card_for(recipe: Recipe) -> dict | None:
    """The Character Card V2 of the trained persona, when a data source came from a card."""
    from llmtune.data.cards import load_card

    for src in recipe.data.sources:
        if src.card:
            card = load_card(recipe.resolve_path(src.card))
            data = {
                "name": card.name, "description": card.description, "personality": card.personality,
                "scenario": card.scenario, "first_mes": card.first_mes, "mes_example": card.mes_example,
                "system_prompt": card.system_prompt, "post_history_instructions": card.post_history_instructions,
                "alternate_greetings": list(card.alternate_greetings), "tags": ["llmtune"],
                "creator": "", "character_version": "", "extensions": {},
            }
            data["extensions"]["llmtune"] = {"run": recipe.name, "base_model": recipe.model.base}
            data["creator_notes"] = f"Fine-tuned with llmtune (run {recipe.name})."
            return {"spec": "chara_card_v2", "spec_version": "2.0", "data": data}
    return None


def export_gguf(recipe: Recipe, prepared: PreparedData, export_dir: Path) -> list[dict]:
    """GGUF files of merged/ in export/, each verified against the merged model; [] without merged/."""
    from transformers import AutoConfig

    from llmtune.export.gguf_convert import GGUFError, llama_cpp_version, quantize_with_llama_cpp, special_tokens, write_gguf
    from llmtune.export.gguf_verify import verify_gguf
    from llmtune.models import load_tokenizer
    from llmtune.distributed import configure_threads
    from llmtune.storage import ensure_writable, model_bytes

    run = RunDir(recipe.run_dir)
    cfg, merged = recipe.export, run.merged
    if not run.has_merged():
        console.print(f"  GGUF: skipped, no merged model in {merged}; run `llmtune merge {recipe.run_dir}` "
                      f"then `llmtune export {recipe.run_dir}`")
        return []
    start = time.time()
    threads = cfg.gguf_threads or configure_threads(recipe.training.num_threads)
    tokenizer = load_tokenizer(str(merged))
    config = AutoConfig.from_pretrained(merged)
    special = special_tokens(tokenizer, config, prepared.end_of_turn, prepared.chat_template)
    types = list(dict.fromkeys(cfg.gguf_types))
    merged_dtype = json.loads((merged / "merge_report.json").read_text()).get("dtype", "float32")
    params = model_bytes(str(merged)) // (4 if merged_dtype == "float32" else 2)
    per_param = {"f32": 4.0, "f16": 2.0, "q8_0": 1.07, "q4_k_m": 0.7}
    ensure_writable(export_dir, int(params * sum(per_param[t] for t in types)) + 2**20, "the GGUF files")
    staging = export_dir / ".gguf-staging"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    console.print(f"  GGUF: {', '.join(types)} from {merged} ({params / 1e6:.0f}M parameters, {threads} llama.cpp threads)")

    written = []
    for outtype in [t for t in types if t != "q4_k_m"]:
        written.append(write_gguf(merged, staging / f"{recipe.name}-{outtype}.gguf", outtype, tokenizer, special,
                                  name=recipe.name, description=recipe.description, base_model=recipe.model.base))
    if "q4_k_m" in types:
        if llama_cpp_version() is None:
            console.print("  [yellow]q4_k_m skipped[/]: llama.cpp's quantizer comes with llama-cpp-python "
                          "(`pip install 'llmtune[gguf]'`, see docs/export.md); the gguf package has no Q4_K quantizer")
        else:
            source = next((f for f in written if f.outtype in ("f16", "f32")), None)
            if source is None:  # quantize from a f16 file written just for it
                source = write_gguf(merged, staging / f".{recipe.name}-f16.gguf", "f16", tokenizer, special, name=recipe.name)
            written.append(quantize_with_llama_cpp(source, staging / f"{recipe.name}-q4_k_m.gguf", threads))
            if source.path.name.startswith("."):
                source.path.unlink()
    for f in written:
        console.print(f"  wrote {f.path.name}: {f.bytes / 2**20:.0f} MiB, {f.tensors} tensors ({f.arch}), {f.seconds:.1f}s")

    report = {"files": [f.to_json() for f in written], "runtime": llama_cpp_version(), "verified": cfg.gguf_verify}
    if cfg.gguf_verify:
        rope_freqs = (getattr(config, "rope_parameters", None) or {}).get("rope_type") == "llama3"
        checks = verify_gguf(
            [(f.path, f.outtype) for f in written], merged, tokenizer, sample_prompts(recipe, prepared),
            prepared.fixed_conversations(), prepared.end_of_turn, prepared.chat_template,
            cfg.gguf_greedy_tokens, cfg.gguf_min_top1_agreement, threads, rope_freqs,
        )
        for entry, check in zip(report["files"], checks):
            entry["verification"] = check.to_json()
        report["limits"] = {"greedy_tokens": cfg.gguf_greedy_tokens, "min_top1_agreement": cfg.gguf_min_top1_agreement}
        report["seconds"] = round(time.time() - start, 1)
        (staging / "gguf_report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))
        failed = [c for c in checks if c.failures]
        if failed:
            raise GGUFError(
                f"{failed[0].file} does not compute what the merged model computes: {failed[0].failures[0]}. The GGUF "
                f"files were not moved into export/ (inspect {staging} and its gguf_report.json); "
                "export.gguf_verify=false keeps unverified files, export.gguf_types picks others"
            )
    report["seconds"] = round(time.time() - start, 1)
    (staging / "gguf_report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))
    for path in staging.iterdir():
        path.replace(export_dir / path.name)
    staging.rmdir()
    console.print(f"  GGUF: {len(written)} files in {export_dir} ({report['seconds']:.0f}s)")
    return report["files"]


def _preferred(files: list[dict]) -> dict:
    """The GGUF apps should load: q8_0 (verified against the merged model, half of f16), else the most precise."""
    order = ("q8_0", "f16", "f32", "q4_k_m")
    return min(files, key=lambda f: order.index(f["type"]))


def _local_guide(recipe: Recipe, files: list[dict], seq: RoleSequences, context: int) -> str:
    names = {f["type"]: f["file"] for f in files}
    pick_type = _preferred(files)["type"]
    rows = ["| file | size | llama.cpp check against the merged model |", "|---|---|---|"]
    for f in files:
        v = f.get("verification")
        if not v:
            check = "not verified (export.gguf_verify=false)"
        elif v["runtime"]:
            greedy = ", ".join(f"{m}/{n}" for m, n in zip(v["greedy_tokens_matched"], v["greedy_tokens_compared"]))
            ties = sum(len(t) for t in v.get("greedy_ties") or [])
            tied = f" ({ties} near-tie{'s' if ties != 1 else ''} decided by 16-bit rounding)" if ties else ""
            check = f"greedy tokens equal {greedy}{tied}; top-1 agreement {v['top1_agreement']:.3f}"
        else:
            check = "llama.cpp not installed here; transformers read-back only"
        rows.append(f"| `{f['file']}` | {f['bytes'] / 2**20:.0f} MiB | {check} |")
    why = "8-bit, half the size of f16, and it picks the merged model's top token at nearly every position (table)."
    return LOCAL_GUIDE.format(
        name=recipe.name, table="\n".join(rows), pick=names[pick_type],
        pick_why=why if pick_type == "q8_0" else f"the {pick_type} file written.",
        full=names.get("f16") or names.get("f32") or names[pick_type],
        q4=f"; `{names['q4_k_m']}` the smallest (llama.cpp's quantizer), check its agreement first" if "q4_k_m" in names else "",
        stop=seq.stop[0], run_dir=recipe.run_dir, ctx=context,
    )


def export_for_apps(recipe: Recipe) -> ExportResult:
    from llmtune.models import load_tokenizer

    run_dir = recipe.run_dir
    run = RunDir(run_dir)
    prepared = PreparedData.load(run_dir)
    export_dir = run.export
    export_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(str(run.adapter))
    seq = role_sequences(tokenizer, prepared.chat_template, prepared.end_of_turn)
    files: list[Path] = []
    console.print(f"[bold]export[/]: {recipe.name} -> {export_dir}")

    def write(name: str, content: str) -> None:
        path = export_dir / name
        path.write_text(content, encoding="utf-8")
        files.append(path)

    gguf = export_gguf(recipe, prepared, export_dir) if recipe.export.gguf else []
    files += [export_dir / f["file"] for f in gguf] + ([export_dir / "gguf_report.json"] if gguf else [])
    card = _card_for(recipe) if recipe.export.character_card else None
    if card:
        write(f"{card['data']['name']}.card.json", json.dumps(card, indent=2, ensure_ascii=False))
    if gguf:
        context = min(4096, json.loads((run.merged / "config.json").read_text())["max_position_embeddings"])
        write("koboldcpp-adapter.json", json.dumps(koboldcpp_adapter(seq), indent=2, ensure_ascii=False))
        write("CONNECT.md", _local_guide(recipe, gguf, seq, context))
    if recipe.export.sillytavern:
        write("sillytavern-instruct.json", json.dumps(sillytavern_instruct(f"llmtune {recipe.name}", seq), indent=2))
        write("sillytavern-context.json", json.dumps(sillytavern_context(f"llmtune {recipe.name}"), indent=2))
        write("CONNECT_SILLYTAVERN.md", CONNECT_GUIDE.format(
            name=recipe.name, run_dir=run_dir, model=recipe.name, stop=seq.stop[0],
            card_step=(f"4. Character: import `{card['data']['name']}.card.json` (Character Management -> Import)." if card
                       else "4. Character: the training data came with no character card; create one in SillyTavern."),
            local="\nLocal runtimes (llama.cpp server, KoboldCpp) with the GGUF files: see CONNECT.md.\n" if gguf else "",
        ))
    if recipe.export.ollama:
        merged = run.merged
        if gguf:  # Ollama imports a GGUF as is; no conversion on `ollama create`
            source, adapter = f"./{_preferred(gguf)['file']}", None
        else:
            source, adapter = ("../merged", None) if merged.exists() else (recipe.model.base, "../adapter")
        write("Modelfile", ollama_modelfile(seq, source, adapter, recipe.eval.system_prompt))
    console.print(f"  {len(files)} files in {export_dir}: " + ", ".join(p.name for p in files))
    return ExportResult(export_dir, files, gguf)
