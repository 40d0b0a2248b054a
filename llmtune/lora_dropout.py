"""LoRA dropout that costs a fraction of `nn.Dropout` on a CPU.

PEFT applies `nn.Dropout(lora_dropout)` to the input of every adapted layer. On a CPU, torch draws that mask
one float per element through its Bernoulli sampler and multiplies through bool-to-float conversions: for
SmolLM2-135M (7 adapted layers per block, 30 blocks) the masks cost more than the bf16 matmuls beside them (a
[4096, 576] mask ~20-40 ms, the [576, 1536] bf16 projection of the same rows ~9 ms; `bench/train_profile.py`
charged `aten::bernoulli_` 13.5% of an fp32 step, and more under bf16 autocast, where the matmuls shrink and
the masks do not).

`MaskedDropout` draws one 16-bit lane per element with numpy's PCG64, on every torch thread, seeded from
torch's global generator (so `torch.manual_seed` reproduces a run, and gradient checkpointing, which restores
torch's RNG state before recomputing, recomputes the same mask), and drops an element when its lane falls
under `round(p * 65536)`: the distribution of `nn.Dropout(p)` to within 1/65536 of p, the kept values scaled
by 1 / (1 - that p) so the expectation is exact. The 0/1 multiplier is built in numpy in the tensor's own dtype (bf16 by its bit
pattern), one multiply applies it, and backward keeps a 1-byte mask.

GPUs keep `nn.Dropout`: their fused dropout is already cheap.
"""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

LANES = 65536  # a 16-bit lane decides each element
CHUNK = 1 << 19  # elements per random stream: the unit of parallel drawing
_ONE_BITS = {torch.bfloat16: 0x3F80, torch.float16: 0x3C00}  # 1.0 as a 16-bit float's bit pattern


def drop_threshold(p: float) -> int:
    """Lanes below this drop their element: probability drop_threshold(p) / 65536."""
    return round(p * LANES)


def keep_mask(n: int, p: float) -> np.ndarray:
    """n booleans, False where an element is dropped (each independently, probability round(p * 65536) / 65536),
    from generators seeded by torch's global CPU generator. Blocks of CHUNK elements each have their own PCG64
    stream (numpy releases the GIL while filling one), drawn on every torch thread at once; the mask depends on
    the seed only, not on the thread count."""
    seed = int(torch.randint(0, 2**62, (1,)).item())
    keep = np.empty(n, dtype=np.bool_)
    starts = range(0, n, CHUNK)
    streams = np.random.SeedSequence(seed).spawn(len(starts))
    threshold = drop_threshold(p)

    def fill(i: int) -> None:
        a = starts[i]
        b = min(a + CHUNK, n)
        lanes = np.random.Generator(np.random.PCG64(streams[i])).integers(0, LANES, b - a, dtype=np.uint16)
        np.greater_equal(lanes, threshold, out=keep[a:b])

    threads = min(torch.get_num_threads(), len(starts))
    if threads > 1:
        list(_pool(threads).map(fill, range(len(starts))))
    else:
        for i in range(len(starts)):
            fill(i)
    return keep


@functools.cache
def _pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=threads, thread_name_prefix="llmtune-dropout")


def multiplier(keep: np.ndarray, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """The 0/1 tensor of `keep` in `dtype` (built in numpy: torch's bool-to-float conversion is slow on CPUs)."""
    if dtype in _ONE_BITS:
        return torch.from_numpy(keep.astype(np.uint16) * np.uint16(_ONE_BITS[dtype])).view(dtype).view(shape)
    if dtype == torch.float32:
        return torch.from_numpy(keep.astype(np.float32)).view(shape)
    return torch.from_numpy(keep).view(shape).to(dtype)


class _Dropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:
        keep = keep_mask(x.numel(), p)
        ctx.keep, ctx.scale = keep, LANES / (LANES - drop_threshold(p))
        return (x * multiplier(keep, x.shape, x.dtype)).mul_(ctx.scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return (grad * multiplier(ctx.keep, grad.shape, grad.dtype)).mul_(ctx.scale), None


class MaskedDropout(torch.nn.Module):
    """Drop-in for `nn.Dropout(p)` on CPU tensors (inverted dropout: identity in eval mode)."""

    def __init__(self, p: float):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu":
            return torch.nn.functional.dropout(x, self.p, training=True)
        return _Dropout.apply(x, self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def use_masked_dropout(model) -> int:
    """Replace the `nn.Dropout` of every PEFT LoRA layer in `model` with `MaskedDropout` of the same p (on a CPU
    run; the caller decides). Returns how many were replaced."""
    replaced = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, torch.nn.ModuleDict):
            continue
        for name, drop in list(dropouts.items()):
            if type(drop) is torch.nn.Dropout and drop.p > 0.0:
                dropouts[name] = MaskedDropout(drop.p)
                replaced += 1
    return replaced
