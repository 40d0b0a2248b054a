"""The export stage: files that make chat apps format prompts exactly as training did.

Entry point: `export_for_apps(recipe) -> ExportResult`. The role prefixes and suffixes are
read off the training chat template itself (by rendering a probe conversation with fenced
contents), so SillyTavern presets, the Ollama TEMPLATE and the stop strings can never drift
from what the model learned.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from llmtune.config import Recipe
from llmtune.console import console
from llmtune.data.prepare import PreparedData
from llmtune.data.template import _render
from llmtune.data.types import Message
from llmtune.errors import LlmtuneError


@dataclass(frozen=True)
class RoleSequences:
    """What the template writes around each role's content, and where generation stops."""

    bos: str
    system_prefix: str
    system_suffix: str
    user_prefix: str
    user_suffix: str
    assistant_prefix: str
    assistant_suffix: str
    stop: list[str] = field(default_factory=list)


def role_sequences(tokenizer, template: str, eot: str) -> RoleSequences:
    """Read the per-role wrappers off a rendered probe conversation."""
    S, U1, A1, U2, A2 = "\ue010S\ue011", "\ue010U1\ue011", "\ue010A1\ue011", "\ue010U2\ue011", "\ue010A2\ue011"
    probe = [Message("system", S), Message("user", U1), Message("assistant", A1), Message("user", U2), Message("assistant", A2)]
    text = _render(tokenizer, probe, template)
    if any(marker not in text for marker in (S, U1, A1, U2, A2)):
        raise LlmtuneError("the chat template drops or rewrites messages; cannot derive chat-app presets from it")
    pre_s, rest = text.split(S, 1)
    s_to_u1, rest = rest.split(U1, 1)
    u1_to_a1, rest = rest.split(A1, 1)
    a1_to_u2, rest = rest.split(U2, 1)
    _, after_a2 = rest.split(A2, 1)
    gen_prompt = _render(tokenizer, probe[:2], template, add_generation_prompt=True)[len(_render(tokenizer, probe[:2], template)):]
    assistant_prefix = gen_prompt or u1_to_a1
    user_suffix = u1_to_a1[: len(u1_to_a1) - len(assistant_prefix)] if u1_to_a1.endswith(assistant_prefix) else u1_to_a1
    assistant_suffix = after_a2
    user_prefix = a1_to_u2[len(assistant_suffix):] if a1_to_u2.startswith(assistant_suffix) else a1_to_u2
    system_suffix = s_to_u1[: len(s_to_u1) - len(user_prefix)] if s_to_u1.endswith(user_prefix) else s_to_u1
    # A BOS the template writes once at the start, unless it is the token that opens every role (ChatML).
    b = tokenizer.bos_token
    bos = b if b and pre_s.startswith(b) and not user_prefix.startswith(b) else ""
    system_prefix = pre_s[len(bos):]
    stops = [eot] + ([user_prefix.strip()] if user_prefix.strip() and user_prefix.strip() != eot else [])
    return RoleSequences(bos, system_prefix, system_suffix, user_prefix, user_suffix, assistant_prefix,
                         assistant_suffix, stops)


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
"""


@dataclass
class ExportResult:
    export_dir: Path
    files: list[Path]


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


def export_for_apps(recipe: Recipe) -> ExportResult:
    from llmtune.models import load_tokenizer

    run_dir = recipe.run_dir
    prepared = PreparedData.load(run_dir)
    export_dir = run_dir / "export"
    export_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(str(run_dir / "adapter"))
    seq = role_sequences(tokenizer, prepared.chat_template, prepared.end_of_turn)
    files: list[Path] = []

    def write(name: str, content: str) -> None:
        path = export_dir / name
        path.write_text(content, encoding="utf-8")
        files.append(path)

    card = _card_for(recipe) if recipe.export.character_card else None
    if card:
        write(f"{card['data']['name']}.card.json", json.dumps(card, indent=2, ensure_ascii=False))
    if recipe.export.sillytavern:
        write("sillytavern-instruct.json", json.dumps(sillytavern_instruct(f"llmtune {recipe.name}", seq), indent=2))
        write("sillytavern-context.json", json.dumps(sillytavern_context(f"llmtune {recipe.name}"), indent=2))
        write("CONNECT_SILLYTAVERN.md", CONNECT_GUIDE.format(
            name=recipe.name, run_dir=run_dir, model=recipe.name, stop=seq.stop[0],
            card_step=(f"4. Character: import `{card['data']['name']}.card.json` (Character Management -> Import)." if card
                       else "4. Character: the training data came with no character card; create one in SillyTavern."),
        ))
    if recipe.export.ollama:
        merged = run_dir / "merged"
        source, adapter = ("../merged", None) if merged.exists() else (recipe.model.base, "../adapter")
        write("Modelfile", ollama_modelfile(seq, source, adapter, recipe.eval.system_prompt))
    console.print(f"[bold]export[/]: {len(files)} files in {export_dir}: " + ", ".join(p.name for p in files))
    return ExportResult(export_dir, files)
