"""The moderation adapter: a PEFT LoRA adapter on the embedded MiniLM encoder plus a multi-label head.

On disk (what `llmtune moderation train` writes and the package ships under adapter/):

    adapter_config.json, adapter_model.safetensors   PEFT LoRA (loads with PeftModel.from_pretrained)
    head.safetensors                                  `weight` [categories, 384], `bias` [categories]
    moderation.json                                   categories, frozen thresholds, max_length, context_tokens, calibration
    prefilter.npz                                     the distilled first stage of bulk screening (bulk.py)

Load it with transformers + peft (docs/moderation.md):

    base = AutoModel.from_pretrained(minilm_dir); model = PeftModel.from_pretrained(base, adapter_dir)
    logits = head(mean_pool(model(**batch).last_hidden_state, mask))

Screening does not import transformers or peft: `FastEncoder` merges the LoRA deltas into the
base weights once and runs the 6-layer encoder as a dozen fused torch calls per layer, which is
what keeps one message well under 15 ms on two CPU cores.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from llmtune.encoder import EMBEDDED_ENCODER, mean_pool, resolve_encoder
from llmtune.moderation.errors import ModerationError

if TYPE_CHECKING:
    import torch

CONFIG_NAME = "moderation.json"
HEAD_NAME = "head.safetensors"
# LoRA targets: every linear layer of the encoder blocks (not the unused pooler).
TARGET_MODULES = r".*encoder\.layer\.\d+\.(?:attention\.self\.(?:query|key|value)|attention\.output\.dense|intermediate\.dense|output\.dense)"


def shipped_adapter_dir() -> Path:
    return Path(__file__).resolve().parent / "adapter"


def resolve_adapter(adapter: str | Path) -> Path:
    path = shipped_adapter_dir() if str(adapter) == "embedded" else Path(adapter).expanduser()
    if not (path / CONFIG_NAME).exists():
        hint = (
            "the package was installed without its adapter files (pyproject needs "
            "[tool.setuptools.package-data] \"llmtune.moderation\" = [\"adapter/*\"])"
            if str(adapter) == "embedded"
            else "train one with `llmtune moderation train recipes/moderation.yaml` or use `embedded`"
        )
        raise ModerationError(f"no moderation adapter at {path} (missing {CONFIG_NAME}); {hint}")
    return path


@dataclass
class AdapterMeta:
    """The adapter's frozen config (moderation.json)."""

    categories: list[str]
    thresholds: dict[str, float]
    max_length: int
    encoder: str
    raw: dict

    @classmethod
    def load(cls, adapter_dir: Path) -> AdapterMeta:
        raw = json.loads((adapter_dir / CONFIG_NAME).read_text(encoding="utf-8"))
        return cls(raw["categories"], {k: float(v) for k, v in raw["thresholds"].items()}, int(raw["max_length"]),
                   raw.get("encoder", EMBEDDED_ENCODER), raw)


class Tokenizer:
    """The encoder's fast tokenizer (tokenizers only), windows for long texts, length-sorted batches.

    With `context_tokens` > 0 a window may carry its conversation's card after the text, as a
    second segment (BERT's sentence B): `[CLS] text [SEP] card [SEP]`, the card cut to that many
    tokens. The text's tokens attend to the card's; only [CLS] text [SEP] is pooled, so the verdict
    is on the text, read with the characters the conversation defined in view."""

    def __init__(self, encoder_dir: Path, max_length: int, context_tokens: int = 0):
        from tokenizers import Tokenizer as HFTokenizer

        self.tok = HFTokenizer.from_file(str(encoder_dir / "tokenizer.json"))
        self.tok.no_padding()
        self.tok.no_truncation()
        self.max_length = max_length
        self.context_tokens = context_tokens
        self.cls_id = self.tok.token_to_id("[CLS]")
        self.sep_id = self.tok.token_to_id("[SEP]")

    def _contexts(self, n: int, contexts: list[str] | None) -> list[list[int]]:
        """Each text's card segment ([...card ids, SEP], or empty)."""
        if not self.context_tokens or not contexts or not any(contexts):
            return [[] for _ in range(n)]
        unique = sorted({c for c in contexts if c})
        encoded = self.tok.encode_batch(unique, add_special_tokens=False)
        ids = {c: e.ids[: self.context_tokens] for c, e in zip(unique, encoded)}
        return [[*ids[c], self.sep_id] if c and ids[c] else [] for c in contexts]

    def truncated(self, texts: list[str], contexts: list[str] | None = None) -> list[Window]:
        """One window per text: its first max_length tokens (training rows are short), and its card."""
        inner = self.max_length - 2
        cards = self._contexts(len(texts), contexts)
        return [Window([self.cls_id, *enc.ids[:inner], self.sep_id], card)
                for enc, card in zip(self.tok.encode_batch(texts, add_special_tokens=False), cards)]

    def windows(self, texts: list[str], contexts: list[str] | None = None) -> tuple[list[Window], list[int]]:
        """Windows, and for each window the index of its text. A text longer than max_length
        becomes overlapping windows (half-window stride), each with the text's card; its score is
        their maximum."""
        out: list[Window] = []
        owner: list[int] = []
        inner = self.max_length - 2
        cards = self._contexts(len(texts), contexts)
        for i, enc in enumerate(self.tok.encode_batch(texts, add_special_tokens=False)):
            ids = enc.ids
            if len(ids) <= inner:
                out.append(Window([self.cls_id, *ids, self.sep_id], cards[i]))
                owner.append(i)
                continue
            stride = inner // 2
            for start in range(0, len(ids) - stride, stride):
                out.append(Window([self.cls_id, *ids[start: start + inner], self.sep_id], cards[i]))
                owner.append(i)
        return out, owner


@dataclass
class Window:
    """One encoder input: the text's tokens ([CLS] ... [SEP], pooled) and the card's (type 1, attended to only)."""

    text: list[int]
    card: list[int]

    def __len__(self) -> int:
        return len(self.text) + len(self.card)


def batch_tensors(windows: list[Window]) -> tuple["torch.Tensor", "torch.Tensor", "torch.Tensor", "torch.Tensor"]:
    """(input ids, attention mask, token types, pooling mask) for windows padded to the longest."""
    import torch

    longest = max(len(w) for w in windows)
    ids = torch.zeros((len(windows), longest), dtype=torch.long)
    mask = torch.zeros_like(ids)
    types = torch.zeros_like(ids)
    pool = torch.zeros_like(ids)
    for row, w in enumerate(windows):
        n, m = len(w.text), len(w)
        ids[row, :m] = torch.tensor(w.text + w.card)
        mask[row, :m] = 1
        types[row, n:m] = 1
        pool[row, :n] = 1
    return ids, mask, types, pool


def _lora_deltas(adapter_dir: Path) -> dict[str, torch.Tensor]:
    """base weight name -> LoRA delta (scale * B @ A), read from a PEFT adapter directory."""
    from safetensors.torch import load_file

    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    r = cfg["r"]
    scale = cfg["lora_alpha"] / (r ** 0.5 if cfg.get("use_rslora") else r)
    weights = load_file(str(adapter_dir / "adapter_model.safetensors"))
    deltas = {}
    for key, a in weights.items():
        if ".lora_A." not in key:
            continue
        b = weights[key.replace(".lora_A.", ".lora_B.")]
        module = re.sub(r"^base_model\.model\.", "", key.split(".lora_A.")[0])
        deltas[f"{module}.weight"] = scale * (b @ a)
    return deltas


def native_bf16() -> bool:
    """Whether this CPU computes bfloat16 matmuls natively (AVX512-BF16 or AMX), where they run
    about twice as fast as float32; elsewhere bf16 is emulated and slower."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()) and torch.backends.cpu.get_cpu_capability() != "DEFAULT"
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str) -> str:
    return ("bfloat16" if native_bf16() else "float32") if precision == "auto" else precision


class FastEncoder:
    """MiniLM (BERT) forward with the LoRA merged in: fused QKV, torch SDPA, mean pooling, head.
    In bfloat16 the linear layers run in bf16 (weights cast once), layer norms and the head in float32."""

    def __init__(self, encoder_dir: Path, adapter_dir: Path, precision: str = "float32"):
        import torch
        from safetensors.torch import load_file

        self.dtype = torch.bfloat16 if precision == "bfloat16" else torch.float32

        state = load_file(str(encoder_dir / "model.safetensors"))
        state = {re.sub(r"^bert\.", "", k): v for k, v in state.items()}
        for name, delta in _lora_deltas(adapter_dir).items():
            if name not in state:
                raise ModerationError(f"adapter {adapter_dir} targets `{name}`, which the encoder at {encoder_dir} lacks")
            state[name] = state[name] + delta.to(state[name].dtype)
        cfg = json.loads((encoder_dir / "config.json").read_text())
        self.hidden = cfg["hidden_size"]
        self.heads = cfg["num_attention_heads"]
        self.eps = cfg.get("layer_norm_eps", 1e-12)
        self.layers = []
        for i in range(cfg["num_hidden_layers"]):
            p = f"encoder.layer.{i}."

            def g(n: str, p=p) -> torch.Tensor:
                return state[p + n].float().contiguous()

            def w(n: str, p=p) -> torch.Tensor:
                return g(n, p).to(self.dtype)

            self.layers.append((
                torch.cat([w("attention.self.query.weight"), w("attention.self.key.weight"), w("attention.self.value.weight")]),
                torch.cat([w("attention.self.query.bias"), w("attention.self.key.bias"), w("attention.self.value.bias")]),
                w("attention.output.dense.weight"), w("attention.output.dense.bias"),
                g("attention.output.LayerNorm.weight"), g("attention.output.LayerNorm.bias"),
                w("intermediate.dense.weight"), w("intermediate.dense.bias"),
                w("output.dense.weight"), w("output.dense.bias"),
                g("output.LayerNorm.weight"), g("output.LayerNorm.bias"),
            ))
        self.word = state["embeddings.word_embeddings.weight"].float()
        self.position = state["embeddings.position_embeddings.weight"].float()
        self.token_types = state["embeddings.token_type_embeddings.weight"].float()
        self.token_type = self.token_types[0]
        self.emb_ln = (state["embeddings.LayerNorm.weight"].float(), state["embeddings.LayerNorm.bias"].float())
        head = load_file(str(adapter_dir / HEAD_NAME))
        self.head_w, self.head_b = head["weight"].float(), head["bias"].float()

    def logits(self, ids: torch.Tensor, mask: torch.Tensor | None, types: torch.Tensor | None = None,
               pool: torch.Tensor | None = None) -> torch.Tensor:
        """Head logits per window. `mask` None: no padding; `types`/`pool` None: no card segment
        (every token type 0, every token pooled)."""
        import torch

        if self.dtype == torch.float32:
            return self._logits(ids, mask, types, pool)
        with torch.autocast("cpu", dtype=self.dtype):  # layer norms and softmax stay float32
            return self._logits(ids, mask, types, pool).float()

    def _logits(self, ids: torch.Tensor, mask: torch.Tensor | None, types: torch.Tensor | None,
                pool: torch.Tensor | None) -> torch.Tensor:
        import torch.nn.functional as F

        b, t = ids.shape
        d, h = self.hidden, self.heads
        token_type = self.token_type if types is None else F.embedding(types, self.token_types)
        x = F.embedding(ids, self.word) + self.position[:t] + token_type
        x = F.layer_norm(x, (d,), *self.emb_ln, self.eps)
        attn_mask = None if mask is None else mask[:, None, None, :].bool()
        for wqkv, bqkv, wo, bo, ln1w, ln1b, wi, bi, wo2, bo2, ln2w, ln2b in self.layers:
            qkv = F.linear(x, wqkv, bqkv).view(b, t, 3, h, d // h).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=attn_mask)
            x = F.layer_norm(F.linear(a.transpose(1, 2).reshape(b, t, d), wo, bo) + x, (d,), ln1w, ln1b, self.eps)
            x = F.layer_norm(F.linear(F.gelu(F.linear(x, wi, bi)), wo2, bo2) + x, (d,), ln2w, ln2b, self.eps)
        x = x.float()
        pool = pool if pool is not None else mask
        pooled = x.mean(1) if pool is None else mean_pool(x, pool)
        return F.linear(pooled, self.head_w, self.head_b)


class ModerationAdapter:
    """Scores texts (already normalised with normalize.canonical) per category, in [0, 1]."""

    def __init__(self, adapter_dir: str | Path = "embedded", precision: str = "auto"):
        self.dir = resolve_adapter(adapter_dir)
        self.meta = AdapterMeta.load(self.dir)
        self.precision = resolve_precision(precision)
        encoder_dir = resolve_encoder(self.meta.encoder)
        # Adapters trained without the card segment (no "context_tokens") read each text alone.
        self.context_tokens = int(self.meta.raw.get("context_tokens", 0))
        self.tokenizer = Tokenizer(encoder_dir, self.meta.max_length, self.context_tokens)
        self.encoder = FastEncoder(encoder_dir, self.dir, self.precision)

    @property
    def categories(self) -> list[str]:
        return self.meta.categories

    def scores(self, texts: list[str], batch_size: int = 64, on_batch=None,
               contexts: list[str] | None = None) -> list[list[float]]:
        """Per text, a probability per category. `contexts`: each text's conversation card
        (normalised like the text), read by adapters trained with one and ignored by the rest."""
        import torch

        windows, owner = self.tokenizer.windows(texts, contexts)
        best = [[0.0] * len(self.categories) for _ in texts]
        # Length-sorted batches: padding, not arithmetic, is what batching wastes on short messages.
        order = sorted(range(len(windows)), key=lambda i: len(windows[i]))
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                chunk = order[start: start + batch_size]
                batch = [windows[i] for i in chunk]
                if all(not w.card for w in batch) and len({len(w) for w in batch}) == 1:
                    ids = torch.tensor([w.text for w in batch])  # no padding, no card: the plain path
                    logits = self.encoder.logits(ids, None)
                else:
                    ids, mask, types, pool = batch_tensors(batch)
                    logits = self.encoder.logits(ids, mask, types if any(w.card for w in batch) else None, pool)
                probs = torch.sigmoid(logits).tolist()
                for row, i in enumerate(chunk):
                    text_i = owner[i]
                    best[text_i] = [max(a, b) for a, b in zip(best[text_i], probs[row])]
                if on_batch is not None:
                    on_batch(len(chunk), len(windows))
        return best
