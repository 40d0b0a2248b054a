"""Cross-entropy on the loss-bearing positions only, projected to the vocabulary a chunk of rows at a time.

TRL's SFTTrainer (and DPOTrainer and KTOTrainer, for the policy and the reference) asks the model for
`model(**batch, fused_lm_head=True)` and reduces the returned per-token
log-probabilities itself (sum over loss tokens / `num_items_in_batch`, the count over the whole accumulated batch),
and logs entropy and token accuracy from the same outputs. `use_chunked_loss` replaces the forward that answers
that call: it runs the backbone, keeps the hidden states whose shifted label is not -100, and scores them against
the vocabulary `chunk_rows` rows at a time, so at most a [chunk_rows, vocab] block of logits exists at once and
masked tokens (system prompts, user turns, context) never reach the LM head. TRL's own CPU path scores every
position, masked or not, in [4096, 32768] tiles and projects each tile twice (again in backward).

The gradient with respect to the hidden states, (onehot - softmax) @ W per row, is formed in the same pass while a
chunk's logits are at hand; backward only scales it by the incoming per-token gradient, so the vocabulary
projection runs once per step instead of twice. That needs a frozen LM head (LoRA / QLoRA): a trained one falls
back to TRL's path.
"""

from __future__ import annotations

import functools
import os
import types

import torch

from llmtune.distributed import fsdp_enabled

# Elements of one [rows, vocab] logits block (fp32: 64 MiB); two such blocks exist at once.
LOGITS_BLOCK_ELEMENTS = 2**24


def chunk_rows_for(vocab: int) -> int:
    """Rows per vocabulary projection: a bounded block of logits, still a large enough matmul to run at full speed."""
    return max(64, min(4096, LOGITS_BLOCK_ELEMENTS // vocab))


class LossBearingLogProbs(torch.autograd.Function):
    """log softmax(hidden @ weight.T + bias)[target] for each row, with entropy, top-1 hit and the mean logit
    (no gradient; TRL's DPO/KTO log the last two).

    hidden [N, H] holds only loss-bearing rows; targets [N]. Returns fp32 log-probs [N], entropy [N], is_top1 [N],
    mean_logits [N].
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_rows: int, need_grad: bool):
        n = hidden.shape[0]
        device = hidden.device
        compute_dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else hidden.dtype
        w = weight.to(compute_dtype)
        b = bias.to(compute_dtype) if bias is not None else None
        logprobs = torch.empty(n, device=device, dtype=torch.float32)
        entropy = torch.empty(n, device=device, dtype=torch.float32)
        is_top1 = torch.empty(n, device=device, dtype=torch.bool)
        mean_logits = torch.empty(n, device=device, dtype=torch.float32)
        grad_hidden = torch.empty(hidden.shape, device=device, dtype=torch.float32) if need_grad else None
        for start in range(0, n, chunk_rows):
            end = min(start + chunk_rows, n)
            h = hidden[start:end].to(compute_dtype)
            t = targets[start:end]
            z = (torch.addmm(b, h, w.t()) if b is not None else h @ w.t()).float()  # [rows, vocab] logits
            rows = torch.arange(end - start, device=device)
            target_z = z[rows, t]
            top = z.amax(1)
            mean_logits[start:end] = z.mean(1)
            is_top1[start:end] = target_z >= top
            z.sub_(top.unsqueeze(1))  # shifted logits, <= 0
            p = torch.exp(z)
            sum_exp = p.sum(1)
            log_sum_exp = torch.log(sum_exp)
            logprobs[start:end] = target_z - top - log_sum_exp
            p.div_(sum_exp.unsqueeze(1))
            # H = -sum p log p = log(sum exp) - sum p * (z - max)
            entropy[start:end] = log_sum_exp - torch.bmm(p.unsqueeze(1), z.unsqueeze(2)).view(-1)
            if need_grad:
                # d log p_target / d hidden = (onehot - p) @ W
                p[rows, t] -= 1
                grad_hidden[start:end] = -(p.to(compute_dtype) @ w).float()
            del z, p
        ctx.save_for_backward(grad_hidden if need_grad else None)
        ctx.hidden_dtype = hidden.dtype
        ctx.mark_non_differentiable(entropy, is_top1, mean_logits)
        return logprobs, entropy, is_top1, mean_logits

    @staticmethod
    def backward(ctx, grad_logprobs, _grad_entropy, _grad_is_top1, _grad_mean_logits):
        (grad_hidden,) = ctx.saved_tensors
        if grad_hidden is None:
            raise RuntimeError("chunked loss: forward ran without gradients (no_grad) but backward was requested")
        grad = (grad_hidden * grad_logprobs.float().unsqueeze(1)).to(ctx.hidden_dtype)
        return grad, None, None, None, None, None


def chunked_loss_unsupported(model) -> str | None:
    """Why the chunked loss cannot replace TRL's LM head on this (PEFT-wrapped or plain) model, or None if it can."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    config = base.config
    if head is None:
        return "the model has no LM head (get_output_embeddings() is None)"
    if type(head) is not torch.nn.Linear:
        return f"the LM head is a {type(head).__name__}, not a plain Linear (adapted, quantized or replaced)"
    if head.weight.requires_grad or (head.bias is not None and head.bias.requires_grad):
        return "the LM head is trained; its weight gradient needs the second projection TRL's path makes"
    if config.get_text_config() is not config:
        return "multimodal config: the language backbone is not the model's base model"
    for scaling in ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling"):
        if getattr(config, scaling, None) is not None:
            return f"the model rescales its logits ({scaling})"
    if getattr(config, "output_router_logits", False):
        return "mixture-of-experts router loss"
    if fsdp_enabled() or os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        return "FSDP / DeepSpeed shard the LM head"
    return None


def use_chunked_loss(model, chunk_rows: int | None = None) -> str | None:
    """Answer `fused_lm_head=True` calls with the chunked loss-bearing-rows head; returns why not, or None when done.

    Call it after SFTTrainer has patched the model (its forward for `fused_lm_head=False`, i.e. generation and any
    other caller, stays as it was)."""
    from trl.trainer.utils import FusedCausalLMOutput

    reason = chunked_loss_unsupported(model)
    if reason is not None:
        return reason
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    rows = chunk_rows or chunk_rows_for(base.get_output_embeddings().weight.shape[0])
    previous_forward = base.forward

    @functools.wraps(type(base).forward)  # generate() checks its kwargs against this signature
    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        if not fused_lm_head:
            extra = {k: v for k, v in (("labels", labels), ("shift_labels", shift_labels), ("num_items_in_batch", num_items_in_batch)) if v is not None}
            return previous_forward(*args, **kwargs, **extra)
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state
        if shift_labels is None:
            hidden, labels = hidden[:, :-1], labels[:, 1:]
        else:
            labels = shift_labels
        head = self.get_output_embeddings()
        labels = labels.to(head.weight.device)
        mask = labels != -100
        logprobs, entropy, is_top1, mean_logits = LossBearingLogProbs.apply(
            hidden.to(head.weight.device)[mask], head.weight, head.bias, labels[mask], rows,
            torch.is_grad_enabled() and hidden.requires_grad,
        )
        # Back to [batch, seq - 1], zero off the loss tokens, as TRL's compute_loss expects.
        log_probs = logprobs.new_zeros(mask.shape).masked_scatter(mask, logprobs)
        loss = -log_probs.sum() / (mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch)
        return FusedCausalLMOutput(
            loss=loss,
            log_probs=log_probs,
            entropy=entropy.new_zeros(mask.shape).masked_scatter(mask, entropy),
            is_top1=is_top1.new_zeros(mask.shape).masked_scatter(mask, is_top1),
            mean_logits=mean_logits.new_zeros(mask.shape).masked_scatter(mask, mean_logits),
            label_mask=mask,
        )

    base.forward = types.MethodType(forward, base)
    return None
