"""Tiny random models of each recipe family, with a tokenizer of the family's kind, built offline.

The architecture comes from llmtune/archs/<hub id>.json, shrunk to 2 layers and a few heads;
everything that changes how llama.cpp must compute (RoPE scaling, biases, tied or untied
output, soft-capping, the norm offset, the tokenizer's kind) is kept. Tokenizers are trained
here on the sample chats: byte-level BPE with the family's own pre-tokenizer regex (Llama 3,
Qwen2), or a SentencePiece BPE model (Mistral, Gemma 2) converted by transformers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
    "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}[INST] {{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}{% if loop.index0 == 0 or messages[loop.index0 - 1]['role'] != 'system' %}[INST] "
    "{% endif %}{{ m['content'] }}[/INST]{% else %}{{ m['content'] }}</s>{% endif %}{% endfor %}"
)
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else 'user' }}\n"
    "{{ m['content'] }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


@dataclass(frozen=True)
class FamilyCase:
    name: str
    hub_id: str  # llmtune/archs/<hub id with -- for />.json
    tokenizer: str  # "bpe" or "spm"
    split_regex: str | None
    specials: tuple[str, ...]
    bos: str | None
    eos: str
    pad: str | None
    end_of_turn: str
    template: str
    gguf_arch: str


def _cases():
    from llmtune.export.gguf_convert import LLAMA3_SPLIT, QWEN2_SPLIT

    return {
        "llama3.2": FamilyCase("llama3.2", "meta-llama/Llama-3.2-1B-Instruct", "bpe", LLAMA3_SPLIT,
                               ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
                               "<|begin_of_text|>", "<|eot_id|>", None, "<|eot_id|>", LLAMA3_TEMPLATE, "llama"),
        "qwen2.5": FamilyCase("qwen2.5", "Qwen/Qwen2.5-1.5B-Instruct", "bpe", QWEN2_SPLIT,
                              ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
                              None, "<|im_end|>", "<|endoftext|>", "<|im_end|>", CHATML_TEMPLATE, "qwen2"),
        "mistral": FamilyCase("mistral", "mistralai/Mistral-7B-Instruct-v0.3", "spm", None, ("[INST]", "[/INST]"),
                              "<s>", "</s>", None, "</s>", MISTRAL_TEMPLATE, "llama"),
        "gemma2": FamilyCase("gemma2", "google/gemma-2-2b-it", "spm", None, ("<start_of_turn>", "<end_of_turn>"),
                             "<bos>", "<eos>", "<pad>", "<end_of_turn>", GEMMA_TEMPLATE, "gemma2"),
    }


CASES = ("llama3.2", "qwen2.5", "mistral", "gemma2")


def _corpus() -> list[str]:
    texts = []
    for line in (REPO / "data" / "roleplay" / "mara_vell.jsonl").read_text(encoding="utf-8").splitlines():
        texts += [m["content"] for m in json.loads(line)["messages"]]
    return texts + ["It's 2026: 12345 coins, naïve café, 漢字 and  double  spaces.\n\tTabbed line."]


def _bpe_tokenizer(case: FamilyCase, out: Path):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(ignore_merges=case.name == "llama3.2"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(case.split_regex), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=list(case.specials),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=case.bos, eos_token=case.eos, pad_token=case.pad)
    if case.bos:  # Llama 3 puts BOS before plain text; the chat template writes it itself
        from tokenizers import processors

        fast._tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{case.bos} $A", pair=f"{case.bos} $A {case.bos} $B", special_tokens=[(case.bos, tok.token_to_id(case.bos))])
    return fast


def _spm_tokenizer(case: FamilyCase, out: Path):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    src = out / "spm"
    src.mkdir(parents=True)
    (src / "corpus.txt").write_text("\n".join(_corpus()), encoding="utf-8")
    gemma = case.name == "gemma2"
    spm.SentencePieceTrainer.train(
        input=str(src / "corpus.txt"), model_prefix=str(src / "tokenizer"), vocab_size=700, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, split_digits=True, user_defined_symbols=list(case.specials),
        pad_id=0 if gemma else -1, eos_id=1, bos_id=2, unk_id=3,
        pad_piece="<pad>", eos_piece=case.eos, bos_piece=case.bos, unk_piece="<unk>",
        add_dummy_prefix=not gemma, remove_extra_whitespaces=False, normalization_rule_name="identity",
        allow_whitespace_only_pieces=True, minloglevel=2,
    )
    (src / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GemmaTokenizer" if gemma else "LlamaTokenizer",
        "bos_token": case.bos, "eos_token": case.eos, "unk_token": "<unk>", "pad_token": case.pad,
        "add_bos_token": True, "add_eos_token": False,
    }))
    return AutoTokenizer.from_pretrained(src)


def build(name: str, out: Path, dtype: str = "float32") -> tuple[Path, FamilyCase]:
    """A saved tiny model + tokenizer (with the family's chat template) at `out`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    case = _cases()[name]
    tokenizer = _bpe_tokenizer(case, out) if case.tokenizer == "bpe" else _spm_tokenizer(case, out)
    tokenizer.chat_template = case.template
    arch = json.loads((REPO / "llmtune" / "archs" / (case.hub_id.replace("/", "--") + ".json")).read_text())["config"]
    small = {
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 2048, "initializer_range": 0.2,
        # Larger than the tokenizer, as Qwen2.5 pads its embedding: the GGUF gets unused tokens there.
        "vocab_size": len(tokenizer) + (8 if name == "qwen2.5" else 0),
        "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.convert_tokens_to_ids(case.end_of_turn),
        "pad_token_id": tokenizer.pad_token_id,
    }
    if arch.get("rope_scaling"):  # Llama 3: scaled bands that positions of a short chat do reach
        small["rope_theta"] = 10000.0
        small["rope_scaling"] = {**arch["rope_scaling"], "original_max_position_embeddings": 64}
    if name == "gemma2":
        small["query_pre_attn_scalar"] = 16
    rest = {k: v for k, v in arch.items() if k not in small and k != "model_type"}
    config = AutoConfig.for_model(arch["model_type"], **rest, **small)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    with torch.no_grad():  # random norms and biases, so a dropped or mis-offset one shows in the logits
        for pname, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.3)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out, case
