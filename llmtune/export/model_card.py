"""README.md for merged/: what the model is, what it was trained on, how it did, how to use it."""

from __future__ import annotations

import json
from pathlib import Path

from llmtune.artifacts import PreparedData, RunDir
from llmtune.config import Recipe
from llmtune.storage import file_sha256

INTENDED_USE = """\
## Intended use

Fictional roleplay between consenting adults, served behind llmtune's moderated gateway
(`llmtune serve`), which screens every prompt and every generated token.

## Restrictions

- Adults only: the operator must serve it only to age-verified adults.
- Never for sexual content involving minors, in any framing, or sexual content about real,
  identifiable people. llmtune blocks both at every stage (data, prompts, outputs) and no
  setting turns that off; do not serve this model without such a screen.
- Not a source of facts, advice or instructions; it plays characters.
"""


def write_model_card(recipe: Recipe, merged_dir: Path, merge_result) -> Path:
    run_dir = recipe.run_dir
    run = RunDir(run_dir)
    prepared = PreparedData.load(run_dir)
    lines = [
        "---",
        f"base_model: {recipe.model.base}",
        "library_name: transformers",
        "tags: [llmtune, roleplay, lora]",
        "---",
        "",
        f"# {recipe.name}",
        "",
        recipe.description or "",
        "",
        f"Fine-tuned from `{recipe.model.base}` with "
        f"{'QLoRA (NF4)' if recipe.quantization.mode == 'nf4' else 'LoRA'} by llmtune, then merged "
        f"in {merge_result.dtype}{' after the NF4 quantize-dequantize round trip' if merge_result.nf4_roundtrip else ''}.",
        "",
        "## Training data",
        "",
        "| source | sha256 | origin | licence | read | kept | quarantined | duplicates |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in prepared.sources:
        path = recipe.resolve_path(s.path)
        digest = file_sha256(path)[:16] if path.is_file() else "-"
        lines.append(
            f"| {s.path} | `{digest}` | {s.origin or '-'} | {s.license or '**none declared**'} | "
            f"{s.read} | {s.kept} | {s.quarantined} | {s.duplicates} |"
        )
    c = prepared.counts
    moderation = {"screened": c.screened, **{f"blocked {k}": v for k, v in c.moderation.items()}}
    lines += [
        "",
        f"{c.train} training / {c.val} validation conversations; {c.trained_tokens:,} trained tokens.",
        "",
        "Moderation of the training data: "
        + ", ".join(f"{k}: {v}" for k, v in moderation.items())
        + ".",
        "",
        "## Training configuration",
        "",
        "```yaml",
        run.recipe.read_text() if run.recipe.exists() else recipe.to_yaml(),
        "```",
        "",
        "## Evaluation",
        "",
    ]
    if run.eval_json.exists():
        e = json.loads(run.eval_json.read_text())
        b, f = e["base"], e["finetuned"]
        lines += ["| metric | base | fine-tune |", "|---|---|---|"]
        lines.append(f"| eval loss | {b['eval_loss']:.4f} | {f['eval_loss']:.4f} |" if b else f"| eval loss | - | {f['eval_loss']:.4f} |")
    else:
        lines.append("Not evaluated in this run.")
    lines += ["", "Merge check (logits on fixed prompts):", ""]
    for check in merge_result.checks:
        lines.append(f"- vs {check.reference}: max |diff| {check.max_abs_logit_diff:.2e}, top-1 agreement {check.top1_agreement:.4f}")
    lines += [
        "",
        f"Chat template: the one used in training (tokenizer_config / chat_template.jinja); end-of-turn and stop token: "
        f"`{prepared.end_of_turn}`.",
        "",
        INTENDED_USE,
        "## How to serve",
        "",
        "```bash",
        f"llmtune serve {run_dir}            # vLLM behind llmtune's moderated, authenticated gateway",
        "```",
        "",
        "The export stage puts SillyTavern presets, a KoboldCpp adapter, an Ollama Modelfile and GGUF files "
        "(f16, q8_0, q4_k_m, each checked in llama.cpp against this model) in the run's export/ directory; "
        "export/CONNECT.md has the llama.cpp server and KoboldCpp command lines. Those runtimes do not screen "
        "prompts or replies: the restrictions above still apply.",
        "",
        "## AI-generated content and watermark",
        "",
        "Served by `llmtune serve`, every reply carries a statistical watermark (KGW green lists, scheme `kgw-v1`, "
        "keyed by a secret of the deployment; on by default, off only with `watermark.enabled: false` in the serve "
        "config) and is marked as AI-generated (`x-llmtune-generated: true` and `x-llmtune-watermark` headers, an "
        "`llmtune` field in every response; `GET /v1/models` says whether a deployment watermarks). "
        "`llmtune watermark detect` checks a text. The GGUF files and other runtimes do not watermark.",
        "",
    ]
    out = merged_dir / "README.md"
    out.write_text("\n".join(lines), encoding="utf-8")
    return out
