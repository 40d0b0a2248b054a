"""MaskedDropout, the CPU LoRA dropout: nn.Dropout's distribution and gradients, reproducible, checkpoint-safe."""

from __future__ import annotations

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from llmtune.lora_dropout import LANES, MaskedDropout, drop_threshold, use_masked_dropout


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_drops_p_of_the_elements_and_scales_the_rest(dtype):
    torch.manual_seed(0)
    x = torch.rand(512, 384, dtype=dtype) + 0.5  # no zeros of its own
    y = MaskedDropout(0.1).train()(x)
    assert y.dtype == dtype and y.shape == x.shape
    dropped = (y == 0).float().mean().item()
    assert dropped == pytest.approx(0.1, abs=0.004)  # 196,608 draws: 4 standard deviations
    kept = y != 0
    scale = LANES / (LANES - drop_threshold(0.1))
    assert torch.allclose(y[kept].float(), (x[kept].float() * scale).to(dtype).float(), rtol=1e-2 if dtype == torch.bfloat16 else 1e-6)
    assert y.float().mean().item() == pytest.approx(x.float().mean().item(), rel=0.01)  # inverted dropout keeps the mean


def test_eval_mode_and_zero_p_are_the_identity():
    x = torch.randn(8, 16)
    assert MaskedDropout(0.3).eval()(x) is x
    assert MaskedDropout(0.0).train()(x) is x
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        MaskedDropout(1.0)


def test_gradient_is_masked_and_scaled_like_the_output():
    torch.manual_seed(1)
    x = torch.randn(64, 32, requires_grad=True)
    y = MaskedDropout(0.25).train()(x)
    upstream = torch.randn_like(y)
    y.backward(upstream)
    expected = torch.where(y == 0, 0.0, upstream * LANES / (LANES - drop_threshold(0.25)))
    assert torch.allclose(x.grad, expected)


def test_masks_follow_torch_manual_seed():
    drop, x = MaskedDropout(0.2).train(), torch.ones(32, 32)
    torch.manual_seed(5)
    a = drop(x)
    torch.manual_seed(5)
    b = drop(x)
    c = drop(x)
    assert torch.equal(a, b) and not torch.equal(b, c)


def test_gradient_checkpointing_recomputes_the_same_mask():
    torch.manual_seed(0)
    lin = torch.nn.Linear(32, 8)
    drop = MaskedDropout(0.3).train()
    x = torch.randn(16, 32)

    def grads(checkpointed: bool):
        lin.zero_grad()
        torch.manual_seed(11)
        f = lambda t: lin(drop(t))
        out = checkpoint(f, x, use_reentrant=False) if checkpointed else f(x)
        out.pow(2).sum().backward()
        return lin.weight.grad.clone()

    assert torch.equal(grads(False), grads(True))


def test_replaces_every_peft_lora_dropout_and_keeps_the_adapter_keys():
    from peft import LoraConfig, get_peft_model

    from llmtune.models import load_causal_lm, resolve_base

    base = load_causal_lm(resolve_base("embedded:tiny-random-llama"), dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.05, target_modules="all-linear"))
    keys = set(model.state_dict())
    adapted = sum(1 for m in model.modules() if isinstance(getattr(m, "lora_dropout", None), torch.nn.ModuleDict))
    assert use_masked_dropout(model) == adapted > 0
    assert not any(type(m) is torch.nn.Dropout and m.p > 0 for m in model.modules() if m is not model)
    assert set(model.state_dict()) == keys  # nothing new is saved with the adapter
    model.train()
    ids = torch.randint(0, 1000, (2, 12))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.parameters() if p.requires_grad)
