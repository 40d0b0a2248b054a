"""Model shapes for the estimator, without weights or a hub.

The recipe models' Hugging Face configs ship as JSON under llmtune/archs/ (keyed by hub id);
`embedded:` models and local directories are read from their config.json. Only the numbers
that decide memory are kept: widths, depth, heads, vocabulary, tying, biases and the few
family quirks (Gemma-2's four norms per layer, eager attention and logit soft-capping).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from llmtune.errors import ModelError

# Decoder families whose layer is the Llama layout (q/k/v/o + gated MLP, RMSNorm before each block).
LLAMA_LIKE = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "olmo2", "granite"}


@dataclass(frozen=True)
class Arch:
    """The memory-relevant shape of a decoder-only causal LM."""

    name: str
    model_type: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tie_word_embeddings: bool
    qkv_bias: bool = False
    norms_per_layer: int = 2
    final_logit_softcapping: float | None = None
    attn_logit_softcapping: float | None = None
    source: str = ""

    @property
    def q_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    def linears(self) -> list[tuple[str, int, int]]:
        """(module name, in features, out features) of every linear layer in one decoder layer."""
        h, i = self.hidden, self.intermediate
        return [
            ("q_proj", h, self.q_width),
            ("k_proj", h, self.kv_width),
            ("v_proj", h, self.kv_width),
            ("o_proj", self.q_width, h),
            ("gate_proj", h, i),
            ("up_proj", h, i),
            ("down_proj", i, h),
        ]

    def linear_params_per_layer(self) -> int:
        return sum(fan_in * fan_out for _, fan_in, fan_out in self.linears())

    def bias_params_per_layer(self) -> int:
        return (self.q_width + 2 * self.kv_width) if self.qkv_bias else 0

    def embedding_params(self) -> int:
        """Input embedding plus, when untied, the output projection (lm_head)."""
        return self.vocab * self.hidden * (1 if self.tie_word_embeddings else 2)

    def norm_params(self) -> int:
        return (self.layers * self.norms_per_layer + 1) * self.hidden

    def total_params(self) -> int:
        per_layer = self.linear_params_per_layer() + self.bias_params_per_layer()
        return self.layers * per_layer + self.embedding_params() + self.norm_params()


def arch_from_config(config: dict[str, Any], name: str, source: str = "") -> Arch:
    """Build an Arch from a Hugging Face config.json dict (text config of multimodal models too)."""
    cfg = config.get("text_config") or config
    model_type = str(cfg.get("model_type") or config.get("model_type") or "unknown")
    try:
        hidden = int(cfg["hidden_size"])
        heads = int(cfg["num_attention_heads"])
        arch = Arch(
            name=name,
            model_type=model_type,
            hidden=hidden,
            intermediate=int(cfg["intermediate_size"]),
            layers=int(cfg["num_hidden_layers"]),
            heads=heads,
            kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            vocab=int(cfg["vocab_size"]),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", config.get("tie_word_embeddings", True))),
            qkv_bias=bool(cfg.get("attention_bias", model_type == "qwen2")),
            norms_per_layer=4 if model_type in ("gemma2", "gemma3_text", "olmo2") else 2,
            final_logit_softcapping=cfg.get("final_logit_softcapping"),
            attn_logit_softcapping=cfg.get("attn_logit_softcapping"),
            source=source,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(
            f"{source or name}: not a decoder config the estimator understands (missing or bad {exc}); "
            "it needs hidden_size, intermediate_size, num_hidden_layers, num_attention_heads and vocab_size"
        ) from None
    if model_type not in LLAMA_LIKE:
        # Still estimated with the Llama layout; say so rather than refuse.
        object.__setattr__(arch, "source", f"{source} (model_type {model_type!r} estimated as a Llama-like layout)")
    return arch


@cache
def shipped_configs() -> dict[str, tuple[dict[str, Any], str]]:
    """Hub id -> (HF config dict, file name) for every JSON under llmtune/archs/."""
    out: dict[str, tuple[dict[str, Any], str]] = {}
    for entry in resources.files("llmtune").joinpath("archs").iterdir():
        if entry.name.endswith(".json"):
            doc = json.loads(entry.read_text(encoding="utf-8"))
            out[doc["hub_id"]] = (doc["config"], f"llmtune/archs/{entry.name}")
    return out


def load_arch(base: str) -> Arch:
    """The shape of a recipe's `model.base`, offline.

    Order: a local directory's config.json; a built `embedded:` model's config.json (else the
    shipped copy of its shape); a hub id shipped under llmtune/archs/. Anything else fails with
    what to do.
    """
    from llmtune.models import EMBEDDED_BUILD, EMBEDDED_MODELS, EMBEDDED_PREFIX, cache_dir

    shipped = shipped_configs()
    if base.startswith(EMBEDDED_PREFIX):
        name = base[len(EMBEDDED_PREFIX):]
        if name not in EMBEDDED_MODELS:
            raise ModelError(f"unknown embedded model `{base}`; known: {', '.join('embedded:' + k for k in EMBEDDED_MODELS)}")
        built = cache_dir() / "embedded" / f"{name}-v{EMBEDDED_BUILD}" / "config.json"
        if built.exists():
            return arch_from_config(json.loads(built.read_text(encoding="utf-8")), base, str(built))
        config, where = shipped[base]
        return arch_from_config(config, base, where)
    path = Path(base).expanduser()
    if path.is_dir():
        cfg_file = path / "config.json"
        if not cfg_file.exists():
            raise ModelError(f"model directory {path} has no config.json; point model.base at a Hugging Face model folder")
        return arch_from_config(json.loads(cfg_file.read_text(encoding="utf-8")), base, str(cfg_file))
    if base in shipped:
        config, where = shipped[base]
        return arch_from_config(config, base, where)
    known = ", ".join(sorted(k for k in shipped if not k.startswith(EMBEDDED_PREFIX)))
    raise ModelError(
        f"no architecture config for `{base}` offline. Shipped: {known}. For another model, download its "
        f"config.json (`huggingface-cli download {base} config.json --local-dir ./models/{base.split('/')[-1]}`) "
        f"and set model.base to that folder, or add a JSON file under llmtune/archs/."
    )
