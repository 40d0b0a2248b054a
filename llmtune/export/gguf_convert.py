"""Write GGUF files of a merged Hugging Face checkpoint, for llama.cpp, KoboldCpp and Ollama.

Entry points: `write_gguf(model_dir, out, outtype, ...) -> GGUFFile` (f32, f16, q8_0) and
`quantize_with_llama_cpp(src, out, threads) -> GGUFFile` (q4_k_m).

The field's own pieces do the file work: PyPI's `gguf` package (llama.cpp's Python library)
writes the file (GGUFWriter), names the tensors (TensorNameMap, MODEL_TENSORS), reads BPE
merges (SpecialVocab) and quantizes Q8_0 (gguf.quants); llama.cpp's own quantizer, through
llama-cpp-python, writes Q4_K_M. What none of them does without llama.cpp's converter script
(which no registry package ships cleanly, see docs/export.md), this module does for the
recipe families (Llama 3.x, Qwen2.5, Mistral, Gemma 2) and SmolLM2:

- config.json -> the architecture's hyperparameter keys;
- the row order of q/k projections that llama.cpp's `llama` architecture expects: its RoPE
  rotates neighbouring pairs, Hugging Face checkpoints rotate the two halves of each head;
- Gemma's RMSNorm weights + 1 (llama.cpp multiplies by w, transformers by 1 + w);
- Llama 3's RoPE frequency scaling, as the `rope_freqs` tensor llama.cpp reads;
- the vocabulary from tokenizer.json: byte-level BPE (tokens, merges and llama.cpp's name for
  the pre-tokenizer) or SentencePiece-style BPE (tokens, scores from merge ranks, byte tokens);
- the special tokens as training left them: EOS and EOT = the end-of-turn token (llama.cpp,
  KoboldCpp and Ollama stop there), BOS, PAD, UNK, whether to add BOS, and the chat template.
"""

from __future__ import annotations

import ctypes
import json
import logging
import math
import os
import re
import sys
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from llmtune.console import console
from llmtune.errors import LlmtuneError


class GGUFError(LlmtuneError):
    """A checkpoint that cannot be written as a GGUF llama.cpp runs the way transformers does."""


@dataclass(frozen=True)
class Family:
    """How one Hugging Face model type maps onto a llama.cpp architecture."""

    arch: str  # gguf.MODEL_ARCH member name
    activation: str  # the only hidden_act llama.cpp's graph for the arch computes
    neighbour_rope: bool  # llama.cpp rotates neighbouring pairs: reorder q/k rows
    norm_plus_one: bool  # RMSNorm weights stored as w, applied as 1 + w


FAMILIES = {
    "llama": Family("LLAMA", "silu", neighbour_rope=True, norm_plus_one=False),
    # llama.cpp runs Mistral 7B as `llama` (same graph; no sliding window at v0.3).
    "mistral": Family("LLAMA", "silu", neighbour_rope=True, norm_plus_one=False),
    "qwen2": Family("QWEN2", "silu", neighbour_rope=False, norm_plus_one=False),
    "gemma2": Family("GEMMA2", "gelu_pytorch_tanh", neighbour_rope=False, norm_plus_one=True),
}

# Written from the checkpoint by this module; q4_k_m comes from llama.cpp's quantizer.
OUTTYPES = ("f32", "f16", "q8_0")

# The pre-tokenizer regexes of the Llama 3 and Qwen2 tokenizer.json files, and the names
# llama.cpp gives the pre-tokenizers that split text the same way.
LLAMA3_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN2_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


@dataclass(frozen=True)
class SpecialTokens:
    """The token ids and template the GGUF carries, as training used them."""

    end_of_turn: int
    bos: int | None
    pad: int | None
    unk: int | None
    add_bos: bool
    chat_template: str


@dataclass
class Vocab:
    model: str  # llama.cpp's tokenizer kind: "gpt2" (byte-level BPE) or "llama" (SentencePiece)
    pre: str  # llama.cpp's pre-tokenizer name
    tokens: list[str]
    types: list[int]
    scores: list[float] | None
    merges: list[str]
    add_space_prefix: bool | None


@dataclass
class GGUFFile:
    path: Path
    outtype: str
    arch: str
    tensors: int
    bytes: int
    seconds: float

    def to_json(self) -> dict:
        return {"file": self.path.name, "type": self.outtype, "arch": self.arch, "tensors": self.tensors,
                "bytes": self.bytes, "seconds": round(self.seconds, 2)}


def family_of(config) -> Family:
    family = FAMILIES.get(config.model_type)
    if family is None:
        raise GGUFError(
            f"GGUF export supports the model types {', '.join(FAMILIES)}; this model is `{config.model_type}`. "
            "Set export.gguf=false, or convert merged/ with llama.cpp's convert_hf_to_gguf.py (docs/export.md)"
        )
    act = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", None)
    if act != family.activation:
        raise GGUFError(f"llama.cpp's {family.arch.lower()} graph computes {family.activation}; this {config.model_type} uses {act}")
    return family


def special_tokens(tokenizer, config, end_of_turn: str, chat_template: str) -> SpecialTokens:
    eot = tokenizer.convert_tokens_to_ids(end_of_turn)
    if eot is None or (eot == tokenizer.unk_token_id and end_of_turn != tokenizer.unk_token):
        raise GGUFError(f"the end-of-turn token {end_of_turn!r} is not in the tokenizer's vocabulary")
    bos = tokenizer.bos_token_id
    if bos is None and isinstance(getattr(config, "bos_token_id", None), int):
        bos = config.bos_token_id
    # Whether the tokenizer itself puts BOS before plain text (llama.cpp then does too).
    with_specials, bare = tokenizer("a").input_ids, tokenizer("a", add_special_tokens=False).input_ids
    add_bos = bos is not None and len(with_specials) > len(bare) and with_specials[0] == bos
    return SpecialTokens(eot, bos, tokenizer.pad_token_id, tokenizer.unk_token_id, add_bos, chat_template)


def _steps(component: dict | None, list_key: str) -> list[dict]:
    if not component:
        return []
    return list(component.get(list_key, [])) if component.get("type") == "Sequence" else [component]


def _bpe_pre_tokenizer(tokenizer_json: dict) -> str:
    """llama.cpp's name for the pre-tokenizer that splits text as this byte-level BPE does."""
    steps = _steps(tokenizer_json.get("pre_tokenizer"), "pretokenizers")
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        regex = steps[0].get("pattern", {}).get("Regex")
        if regex == LLAMA3_SPLIT:
            return "llama-bpe"
        if regex == QWEN2_SPLIT:
            return "qwen2"
    raise GGUFError(
        f"tokenizer.json's pre-tokenizer ({json.dumps(tokenizer_json.get('pre_tokenizer'))[:300]}) matches none of "
        "the ones llmtune maps to llama.cpp's (gpt-2, smollm, llama-bpe, qwen2): a GGUF would split text differently "
        "from training. Set export.gguf=false and convert with llama.cpp's convert_hf_to_gguf.py"
    )


def _adds_space_prefix(tokenizer_json: dict) -> bool:
    """Whether llama.cpp should put '▁' before the text after every special token, as it does
    when `add_space_prefix` is set. That is what a Prepend normalizer or a Metaspace with
    prepend_scheme "always" does (legacy Llama 2 tokenizers). Mistral v0.3's "first" prepends
    only at the start of the whole input; chat prompts start with a special token, so llama.cpp
    reproduces it with the flag off (an extra '▁' after [INST] otherwise). Gemma prepends nothing."""
    if any(s.get("type") == "Prepend" for s in _steps(tokenizer_json.get("normalizer"), "normalizers")):
        return True
    return any(
        s.get("type") == "Metaspace" and s.get("prepend_scheme", "always") == "always" and s.get("add_prefix_space", True)
        for s in _steps(tokenizer_json.get("pre_tokenizer"), "pretokenizers")
    )


def read_vocab(model_dir: Path, tokenizer, n_vocab: int) -> Vocab:
    """Every token id of the embedding (ids the tokenizer lacks become unused [PADn] tokens)."""
    import gguf

    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise GGUFError(f"{model_dir} has no tokenizer.json; GGUF export needs the fast tokenizer merge writes")
    tj = json.loads(path.read_text(encoding="utf-8"))
    model = tj.get("model", {})
    if model.get("type") != "BPE":
        raise GGUFError(f"{path}: a {model.get('type')} tokenizer; GGUF export handles BPE tokenizers (byte-level or SentencePiece-style)")
    sentencepiece = bool(model.get("byte_fallback"))
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    if max(by_id) >= n_vocab:
        raise GGUFError(f"the tokenizer has id {max(by_id)} but the embedding only {n_vocab} rows")
    added = {a["id"]: a for a in tj.get("added_tokens", [])}
    T = gguf.TokenType
    # An unknown token of its own (SentencePiece's <unk>), not one that doubles as EOS or PAD.
    unk = tokenizer.unk_token_id if tokenizer.unk_token not in (tokenizer.eos_token, tokenizer.bos_token, tokenizer.pad_token) else None
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:  # embedding rows past the tokenizer (Qwen2.5 pads to a multiple of 128)
            tokens.append(f"[PAD{i}]")
            types.append(T.UNUSED)
            continue
        tokens.append(by_id[i])
        if i == unk:
            types.append(T.UNKNOWN)
        elif i in added:
            types.append(T.CONTROL if added[i].get("special") else T.USER_DEFINED)
        elif sentencepiece and BYTE_TOKEN.fullmatch(by_id[i]):
            types.append(T.BYTE)
        else:
            types.append(T.NORMAL)
    if not sentencepiece:
        merges = gguf.SpecialVocab(model_dir, load_merges=True, special_token_types=()).merges
        return Vocab("gpt2", _bpe_pre_tokenizer(tj), tokens, [int(t) for t in types], None, merges, None)
    # llama.cpp's SentencePiece tokenizer merges the best-scoring neighbours first; a merge
    # learned earlier ranks higher, and every piece no merge produces ranks below them all.
    rank: dict[str, int] = {}
    for r, m in enumerate(model.get("merges", [])):
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        rank.setdefault(a + b, r)
    floor = -float(len(rank) + 1)
    scores = [(-float(rank[t]) if t in rank else floor) if ty == T.NORMAL else 0.0 for t, ty in zip(tokens, types)]
    return Vocab("llama", "default", tokens, [int(t) for t in types], scores, [], _adds_space_prefix(tj))


def neighbour_pairs(weight, n_head: int):
    """Reorder each head's rows from Hugging Face's (x1..xk, y1..yk) RoPE halves to llama.cpp's
    (x1, y1, x2, y2, ...) neighbouring pairs. Works on q/k weights and biases."""
    rows = weight.shape[0]
    return weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def llama3_rope_factors(head_dim: int, theta: float, rope: dict):
    """Llama 3 RoPE scaling as llama.cpp's per-frequency divisors (the `rope_freqs` tensor):
    1 for short wavelengths, `factor` for long ones, interpolated in between."""
    import numpy as np

    factor, low, high = rope["factor"], rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    original = rope["original_max_position_embeddings"]
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / freqs
    smooth = (original / wavelen - low) / (high - low)
    mid = 1.0 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < original / high, 1.0, np.where(wavelen > original / low, factor, mid)).astype(np.float32)


def _add_hyperparameters(w, config, family: Family, n_vocab: int) -> dict:
    """The architecture's keys; returns the RoPE parameters for the tensor pass."""
    import gguf

    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = dict(getattr(config, "rope_parameters", None) or {})
    theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_block_count(config.num_hidden_layers)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(float(theta))
    w.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    w.add_vocab_size(n_vocab)
    rope_type = rope.get("rope_type", "default")
    if rope_type == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))
    elif rope_type not in ("default", "llama3"):
        raise GGUFError(f"RoPE scaling `{rope_type}` is not mapped to GGUF by llmtune (default, linear and llama3 are)")
    if family.arch == "GEMMA2":
        # llama.cpp scales queries by 1/sqrt(head_dim), except for the 46-layer Gemma 2 27B.
        expected = config.hidden_size // config.num_attention_heads if config.num_hidden_layers == 46 else head_dim
        if config.query_pre_attn_scalar != expected:
            raise GGUFError(f"llama.cpp's gemma2 scales queries by 1/sqrt({expected}); this model uses query_pre_attn_scalar={config.query_pre_attn_scalar}")
        w.add_attn_logit_softcapping(float(config.attn_logit_softcapping))
        w.add_final_logit_softcapping(float(config.final_logit_softcapping))
        w.add_sliding_window(int(config.sliding_window))
    return {"type": rope_type, "theta": float(theta), "head_dim": head_dim, **rope}


def _add_tokenizer(w, vocab: Vocab, special: SpecialTokens) -> None:
    w.add_tokenizer_model(vocab.model)
    w.add_tokenizer_pre(vocab.pre)
    w.add_token_list(vocab.tokens)
    w.add_token_types(vocab.types)
    if vocab.scores is not None:
        w.add_token_scores(vocab.scores)
    if vocab.merges:
        w.add_token_merges(vocab.merges)
    if vocab.add_space_prefix is not None:
        w.add_add_space_prefix(vocab.add_space_prefix)
    # EOS and EOT are the end-of-turn token: what every GGUF runtime stops at.
    w.add_eos_token_id(special.end_of_turn)
    w.add_eot_token_id(special.end_of_turn)
    if special.bos is not None:
        w.add_bos_token_id(special.bos)
    if special.pad is not None:
        w.add_pad_token_id(special.pad)
    if special.unk is not None:
        w.add_unk_token_id(special.unk)
    w.add_add_bos_token(special.add_bos)
    w.add_add_eos_token(False)
    w.add_chat_template(special.chat_template)


def _storage_type(outtype: str, shape) -> "gguf.GGMLQuantizationType":
    import gguf

    Q = gguf.GGMLQuantizationType
    if len(shape) == 1 or outtype == "f32":  # norms and biases stay f32, as llama.cpp's converter keeps them
        return Q.F32
    if outtype == "q8_0" and shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0] == 0:
        return Q.Q8_0
    return Q.F16


@dataclass
class _Planned:
    name: str
    source: str | None  # Hugging Face tensor name; None for tensors computed here
    file: Path | None
    shape: tuple[int, ...]
    qtype: object


def write_gguf(
    model_dir: Path,
    out: Path,
    outtype: str,
    tokenizer,
    special: SpecialTokens,
    name: str,
    description: str | None = None,
    base_model: str | None = None,
) -> GGUFFile:
    """Convert `model_dir` (safetensors + config + tokenizer.json) into one GGUF file."""
    import gguf
    import numpy as np
    import torch
    from rich.progress import track
    from safetensors import safe_open
    from transformers import AutoConfig

    if outtype not in OUTTYPES:
        raise GGUFError(f"write_gguf writes {', '.join(OUTTYPES)}; got {outtype}")
    start = time.time()
    config = AutoConfig.from_pretrained(model_dir)
    family = family_of(config)
    arch = gguf.MODEL_ARCH[family.arch]
    arch_name = gguf.MODEL_ARCH_NAMES[arch]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise GGUFError(f"{model_dir} has no *.safetensors files; GGUF export reads the merged model (run `llmtune merge`)")
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    known = {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[arch]}
    tied = bool(getattr(config, "tie_word_embeddings", False)) or family.arch == "GEMMA2"

    plan: list[_Planned] = []
    n_vocab = None
    for file in files:
        with safe_open(file, framework="pt") as f:
            for source in f.keys():
                if source == "lm_head.weight" and tied:
                    continue  # llama.cpp reads the tied output projection from token_embd
                target = names.get_name(source, try_suffixes=(".weight", ".bias"))
                base = target.rsplit(".", 1)[0] if target else None
                if base is None or re.sub(r"^blk\.\d+\.", "blk.{bid}.", base) not in known:
                    raise GGUFError(
                        f"{file.name}: tensor `{source}` has no place in llama.cpp's `{arch_name}` architecture; "
                        f"the checkpoint is not a plain {config.model_type} model"
                    )
                shape = tuple(f.get_slice(source).get_shape())
                if target == "token_embd.weight":
                    n_vocab = shape[0]
                plan.append(_Planned(target, source, file, shape, _storage_type(outtype, shape)))
    if n_vocab is None:
        raise GGUFError(f"{model_dir}: no token embedding (model.embed_tokens.weight) in the safetensors files")

    writer = gguf.GGUFWriter(path=None, arch=arch_name)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    if description:
        writer.add_description(description)
    if base_model:
        writer.add_base_model_count(1)
        writer.add_base_model_name(0, base_model)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    writer.add_file_type(file_type[outtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    rope = _add_hyperparameters(writer, config, family, n_vocab)
    _add_tokenizer(writer, read_vocab(model_dir, tokenizer, n_vocab), special)
    if rope["type"] == "llama3":
        plan.append(_Planned("rope_freqs.weight", None, None, (rope["head_dim"] // 2,), gguf.GGMLQuantizationType.F32))

    for p in plan:
        nbytes = int(np.prod(gguf.quant_shape_to_byte_shape(p.shape, p.qtype)))
        dtype = np.float16 if p.qtype == gguf.GGMLQuantizationType.F16 else np.float32
        writer.add_tensor_info(p.name, p.shape, dtype, nbytes, raw_dtype=p.qtype if p.qtype == gguf.GGMLQuantizationType.Q8_0 else None)

    partial = out.with_name(out.name + ".partial")
    out.parent.mkdir(parents=True, exist_ok=True)
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads
    try:
        writer.write_header_to_file(partial)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        with ExitStack() as stack:
            handles = {f: stack.enter_context(safe_open(f, framework="pt")) for f in files}
            for p in track(plan, description=f"  writing {out.name}", console=console, transient=True):
                if p.source is None:
                    data = llama3_rope_factors(rope["head_dim"], rope["theta"], rope)
                else:
                    t = handles[p.file].get_tensor(p.source).to(torch.float32)
                    if family.neighbour_rope and ".attn_q." in p.name:
                        t = neighbour_pairs(t, n_head)
                    elif family.neighbour_rope and ".attn_k." in p.name:
                        t = neighbour_pairs(t, n_kv)
                    if family.norm_plus_one and p.name.endswith("norm.weight"):
                        t = t + 1.0
                    data = t.numpy()
                if p.qtype == gguf.GGMLQuantizationType.Q8_0:
                    data = gguf.quants.quantize(data, p.qtype)
                else:
                    data = data.astype(np.float16 if p.qtype == gguf.GGMLQuantizationType.F16 else np.float32)
                writer.write_tensor_data(data)
        writer.close()
        partial.replace(out)
    finally:
        writer.close()
        partial.unlink(missing_ok=True)
    return GGUFFile(out, outtype, arch_name, len(plan), out.stat().st_size, time.time() - start)


def llama_cpp_version() -> str | None:
    """llama-cpp-python's version, or None where it is not installed."""
    try:
        import llama_cpp
    except ImportError:
        return None
    return llama_cpp.__version__


@contextmanager
def _stderr_to(path: Path):
    """Send the process's stderr (fd 2, where llama.cpp's C++ code prints) to a file for a while."""
    sys.stderr.flush()
    saved = os.dup(2)
    with path.open("wb") as f:
        os.dup2(f.fileno(), 2)
        try:
            yield path
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def quantize_with_llama_cpp(src: GGUFFile, out: Path, threads: int) -> GGUFFile:
    """Q4_K_M by llama.cpp's own quantizer (llama_model_quantize), from a f16/f32 GGUF. Tensors
    whose rows do not split into 256-value blocks get llama.cpp's fallback type, as with llama-quantize."""
    import llama_cpp

    start = time.time()
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # one log line per tensor otherwise
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    params.nthread = threads
    partial = out.with_name(out.name + ".partial")
    try:
        with _stderr_to(out.with_name(out.name + ".log")) as log:
            rc = llama_cpp.llama_model_quantize(str(src.path).encode(), str(partial).encode(), ctypes.byref(params))
        fallback = [line for line in log.read_text(errors="replace").splitlines() if "required fallback" in line]
        if rc != 0:
            raise GGUFError(f"llama.cpp's quantizer failed on {src.path} (code {rc}); its log: {log}")
        log.unlink()
        if fallback:  # e.g. SmolLM2's 576-wide rows do not split into Q4_K's 256-value blocks
            console.print(f"  llama.cpp quantizer: {fallback[0].split('WARNING: ')[-1]} (Q5_0/Q8_0 where rows do not split into 256-value blocks)")
        partial.replace(out)
    finally:
        partial.unlink(missing_ok=True)
    return GGUFFile(out, "q4_k_m", src.arch, src.tensors, out.stat().st_size, time.time() - start)
