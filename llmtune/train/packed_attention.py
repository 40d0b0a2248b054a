"""Attention over padding-free packed batches, one conversation at a time.

TRL's padding-free collator flattens a micro-batch of packed rows into one [1, micro_batch * max_seq_length]
sequence. With `sdpa`, transformers keeps conversations apart through a block-diagonal mask over that whole
sequence, so every layer computes (and, without a fused kernel, stores for backward) a dense score matrix of
(micro_batch * max_seq_length)^2 entries, almost all of them masked out: on a CPU that costs more than the rest of
the model. The collator also passes each conversation's boundaries (`cu_seq_lens_q`), so this attention runs
causal SDPA per conversation instead, costing the sum of squared conversation lengths.

Batches without those boundaries (evaluation without packing, generation with a KV cache, padded batches) go
through transformers' `sdpa` unchanged: the mask transformers builds for this implementation is sdpa's own.
"""

from __future__ import annotations

import itertools

import torch

PACKED_SDPA = "llmtune_packed_sdpa"


def packed_sdpa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    bounds_q, bounds_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    packed = (
        bounds_q is not None and query.shape[0] == 1 and causal and query.shape[2] == key.shape[2]
        and (bounds_k is None or torch.equal(bounds_q, bounds_k)) and int(bounds_q[-1]) == query.shape[2]
    )
    if not packed:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    bounds = bounds_q.tolist()
    out = torch.cat(
        [
            torch.nn.functional.scaled_dot_product_attention(
                query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], dropout_p=dropout, scale=scaling, is_causal=True
            )
            for s, e in itertools.pairwise(bounds)
            if e > s
        ],
        dim=2,
    )
    return out.transpose(1, 2).contiguous(), None


def use_packed_attention(model) -> bool:
    """Switch an `sdpa` model to per-conversation attention on packed batches; False (unchanged) for any other."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if base.config._attn_implementation != "sdpa":
        return False
    AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention)
    AttentionMaskInterface.register(PACKED_SDPA, sdpa_mask)
    base.set_attn_implementation(PACKED_SDPA)
    return base.config._attn_implementation == PACKED_SDPA
