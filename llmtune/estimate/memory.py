"""Peak training memory of a recipe, predicted from the model's shape alone.

`estimate(recipe, gpu_mem_gb)` models what llmtune's train stage really allocates, tensor by
tensor, for the stack it runs on (transformers + PEFT LoRA + bitsandbytes NF4 + TRL's
SFTTrainer with its fused, chunked LM head):

- static: NF4 weights with their quantization constants, the embeddings / lm_head / norms that
  stay unquantized (fp32 after `prepare_model_for_kbit_training`), LoRA parameters, their
  gradients and optimizer states;
- activations: what autograd keeps per decoder layer (all layers, or one recomputed layer plus
  the per-layer checkpoints under gradient checkpointing), with the dtype each tensor really
  has under bf16 autocast;
- the attention mask: padding-free packing (the default) attends over one row of
  micro_batch x max_seq_length tokens, so the mask and SDPA's per-call bias grow with its square;
- the loss head: TRL projects the vocabulary in [4096 tokens x 32768 vocab] tiles instead of
  materialising full logits; on a CPU its torch fallback keeps several fp32 tiles alive;
- on CUDA, the context and the caching allocator's slack.

The peak is the largest of five moments of a step (end of forward, backward through the loss
head, forward and backward through a decoder layer, optimizer step); the breakdown is the one of
that moment, so its parts sum to the peak. docs/memory.md has the derivation and the
measured-vs-predicted table.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

from llmtune.estimate.arch import Arch, load_arch

if TYPE_CHECKING:
    from llmtune.config import Recipe

GiB = 1024**3
MiB = 1024**2

# bitsandbytes NF4: two weights per byte; one absmax per 64-weight block, itself quantized to
# 8 bits (double quant) with an fp32 absmax per 256 blocks, else kept in fp32.
NF4_BLOCK = 64
NF4_BYTES_PER_PARAM = 0.5
NF4_CONST_BYTES_PER_PARAM = {True: 1 / NF4_BLOCK + 4 / (NF4_BLOCK * 256), False: 4 / NF4_BLOCK}
NF4_PER_MODULE_BYTES = 2 * 256 * 4  # the 256-entry code books of each quantized module

# TRL's fused LM head (trl.kernels.chunked_logprob): one [min(tokens, 4096) x 32768] buffer in
# the compute dtype (32768 columns even for smaller vocabularies) holds each logits tile.
HEAD_TOKENS_PER_TILE = 4096
HEAD_VOCAB_PER_TILE = 32768
# On devices without Triton the tile is folded with torch ops: measured on this CPU (see
# docs/memory.md), the backward keeps 7 fp32 tile-sized temporaries and one bool mask besides
# the buffer, the forward 5 and the mask; soft-capping adds two (tanh input and output).
CPU_HEAD_BACKWARD_TEMPS = 7.25
CPU_HEAD_FORWARD_TEMPS = 5.25
SOFTCAP_EXTRA_TEMPS = 2

# bitsandbytes 8-bit optimizers: tensors below 4096 elements keep fp32 states; blockwise
# absmax per 256 elements; paged (CUDA unified memory) from 1e5 elements on.
BNB_MIN_8BIT = 4096
BNB_PAGED_MIN = 100_000

# CUDA: what a process holds outside tensors (context, cuBLAS/cuDNN handles and kernels, the
# bitsandbytes library) and the caching allocator's reserved-but-unallocated slack.
CUDA_CONTEXT_BYTES = 500 * MiB
ALLOCATOR_SLACK = 0.06
ALLOCATOR_SLACK_MIN = 128 * MiB
# Left free on the card for the driver and a desktop: a recipe "fits" only below card - this.
DISPLAY_HEADROOM = 0.03
DISPLAY_HEADROOM_MIN = 200 * MiB
# training.gradient_checkpointing=auto turns checkpointing on when the peak without it exceeds this
# share of the memory (the GPU's, or this process's share of RAM). `estimate` and `train` both ask
# `auto_checkpointing`, so they cannot disagree about a run.
AUTO_CHECKPOINTING_SHARE = 0.9

# llmtune/train/sft.py calls peft's prepare_model_for_kbit_training, which casts every bf16/fp16
# parameter that is not 4-bit (embeddings, lm_head, norms) to fp32. Set False if that stops.
KBIT_PREP_UPCASTS_TO_FP32 = True

Device = Literal["cuda", "cpu"]
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class Precision:
    """The dtypes training really ends up with on a device (mirrors models.placement_for and sft.py)."""

    device: Device
    qlora: bool
    double_quant: bool
    weights: int  # bytes per element of the loaded (unquantized) weights
    unquantized: int  # embeddings / lm_head / norms / biases as trained
    lora: int  # LoRA parameters (and their gradients)
    compute: int  # matmul dtype
    autocast: bool
    masked_dropout: bool = False  # training.masked_dropout on a CPU: a 1-byte LoRA dropout mask

    @property
    def stream(self) -> int:
        """The residual stream's dtype: the embedding output's."""
        return self.unquantized

    def base_linear_out(self, in_bytes: int) -> int:
        """Output dtype of a frozen base linear layer fed `in_bytes` activations."""
        if self.qlora:
            return in_bytes  # bitsandbytes casts the output back to the input dtype
        return self.compute if self.autocast else in_bytes

    def dropout_mask(self, in_bytes: int) -> int:
        # Fused CUDA kernel and llmtune's CPU MaskedDropout: a bool mask; nn.Dropout on a CPU: the input's dtype.
        return 1 if self.device == "cuda" or self.masked_dropout else in_bytes


def precision_for(recipe: Recipe, device: Device) -> Precision:
    """Dtypes as models.placement_for and sft.py pick them: `auto` is bf16 on CUDA, fp32 on a CPU."""
    auto = "bfloat16" if device == "cuda" else "float32"
    weights = BYTES[auto if recipe.model.dtype == "auto" else recipe.model.dtype]
    q = recipe.quantization
    qlora = q.mode == "nf4"
    autocast = device == "cuda" and weights == 2  # sft.py turns on bf16/fp16 mixed precision on CUDA only
    if autocast:
        compute = 2
    elif qlora and q.compute_dtype != "auto":
        compute = BYTES[q.compute_dtype]
    else:
        compute = weights
    if qlora:
        # prepare_model_for_kbit_training casts every non-4-bit bf16/fp16 parameter to fp32; TRL then
        # casts LoRA weights of quantized models to bf16, and sft.py back to fp32 for fp32 compute.
        unquantized, lora = (4 if KBIT_PREP_UPCASTS_TO_FP32 else weights), (4 if compute == 4 else 2)
    else:
        unquantized, lora = weights, 4  # PEFT keeps adapters in fp32 (autocast_adapter_dtype=True)
    return Precision(device=device, qlora=qlora, double_quant=q.double_quant, weights=weights,
                     unquantized=unquantized, lora=lora, compute=compute, autocast=autocast,
                     masked_dropout=device == "cpu" and recipe.training.masked_dropout)


@dataclass(frozen=True)
class Shape:
    """The recipe knobs that move memory."""

    micro_batch: int
    seq: int
    rank: int
    dropout: float
    targets: frozenset[str]
    checkpointing: bool
    optim: str
    packed: bool = True  # training.packing: padding-free rows, flattened into one sequence per micro-batch
    chunked_head: bool = False  # llmtune's chunked loss-bearing-rows head (llmtune.train.chunked_loss), preference stage
    full_logits: bool = False  # trl.experimental ORPO/CPO: the whole [tokens, vocab] logits in fp32, not TRL's fused head
    frozen_adapters: int = 0  # extra LoRA copies without gradients (TRL's "ref" adapter when a 4-bit run continues the SFT adapter)

    @property
    def tokens(self) -> int:
        """Tokens per micro-batch: rows filled to max_seq_length (packing) or padded to it (worst case)."""
        return self.micro_batch * self.seq

    @property
    def attention_rows(self) -> tuple[int, int]:
        """(rows, length) attention runs over. Padding-free packing flattens the micro-batch into one
        row whose sequences are kept apart by a block-diagonal mask over all its tokens, so the mask
        (and eager attention's scores) grow with (micro_batch x max_seq_length) squared."""
        return (1, self.tokens) if self.packed else (self.micro_batch, self.seq)


Stage = Literal["train", "preference"]


def sequences_per_example(recipe: Recipe) -> int:
    """Sequences one preference example puts through the policy: chosen and rejected for pair methods."""
    return 1 if recipe.preference is not None and recipe.preference.method == "kto" else 2


def shape_for(recipe: Recipe, arch: Arch, stage: Stage = "train") -> Shape:
    """The memory knobs of the train stage, or of the preference stage: padded (never packed) batches of
    chosen + rejected sequences (one per KTO row), the same LoRA. The reference forward of DPO/KTO runs
    without gradients through the same weights (adapter disabled), so it adds no saved activations."""
    names = [n for n, _, _ in arch.linears()]
    tm = recipe.lora.target_modules
    targets = set(names) if tm == "all-linear" else {n for n in names if any(n == t or n.endswith("." + t) for t in tm)}
    shape = Shape(
        micro_batch=recipe.training.micro_batch_size,
        seq=recipe.data.max_seq_length,
        rank=recipe.lora.rank,
        dropout=recipe.lora.dropout,
        targets=frozenset(targets),
        checkpointing=recipe.training.gradient_checkpointing is True,  # "auto" is decided in estimate()
        optim=recipe.training.optim,
        packed=recipe.training.packing,
    )
    if stage == "preference" and recipe.preference is not None:
        p = recipe.preference
        continues_sft = p.start_from == "sft" and recipe.quantization.mode == "nf4" and p.method in ("dpo", "kto")
        shape = replace(shape, micro_batch=p.micro_batch_size * sequences_per_example(recipe), packed=False,
                        dropout=0.0,  # TRL's preference trainers disable dropout
                        frozen_adapters=int(continues_sft), full_logits=p.method in ("orpo", "simpo"),
                        chunked_head=recipe.training.chunked_loss and p.method in ("dpo", "kto")
                        and arch.final_logit_softcapping is None)
    return shape


# ---------------------------------------------------------------------------------------------
# The parts


def lora_param_count(arch: Arch, shape: Shape) -> int:
    return arch.layers * sum(shape.rank * (i + o) for n, i, o in arch.linears() if n in shape.targets)


def static_parts(arch: Arch, prec: Precision, shape: Shape) -> dict[str, int]:
    """Weights, LoRA parameters, gradients, optimizer states (bytes), plus what of them is paged."""
    linear = arch.layers * arch.linear_params_per_layer()
    other = arch.embedding_params() + arch.norm_params() + arch.layers * arch.bias_params_per_layer()
    if prec.qlora:
        modules = arch.layers * len(arch.linears())
        quantized = linear * (NF4_BYTES_PER_PARAM + NF4_CONST_BYTES_PER_PARAM[prec.double_quant]) + modules * NF4_PER_MODULE_BYTES
        unquantized = other * prec.unquantized
    else:
        quantized = 0
        unquantized = (linear + other) * prec.weights
    n_lora = lora_param_count(arch, shape)
    optim, paged = optimizer_state_bytes(arch, prec, shape)
    return {
        "quantized_weights": int(quantized),
        "unquantized_weights": int(unquantized),
        "lora_params": n_lora * prec.lora * (1 + shape.frozen_adapters),
        "gradients": n_lora * prec.lora,
        "optimizer_states": optim,
        "_paged": paged,
    }


def optimizer_state_bytes(arch: Arch, prec: Precision, shape: Shape) -> tuple[int, int]:
    """(state bytes, of which paged to CUDA unified memory) for the recipe's optimizer."""
    name = shape.optim.lower()
    mats = [n for name_, i, o in arch.linears() if name_ in shape.targets for n in (shape.rank * i, o * shape.rank)]
    total = paged = 0
    eight_bit = "8bit" in name
    is_paged = name.startswith("paged") and prec.device == "cuda"
    for numel in mats:
        if "sgd" in name:
            per = 0
        elif "adafactor" in name:
            per = 4  # factored second moment: ~rows + cols; 4 bytes/param is a safe upper bound for LoRA shapes
        elif eight_bit and numel >= BNB_MIN_8BIT:
            per = 2 + 2 * 4 / 256
        elif "bnb" in name or name.startswith("paged") or eight_bit or "32bit" in name:
            per = 8  # bitsandbytes 32-bit states
        else:
            per = 2 * prec.lora  # torch AdamW: exp_avg and exp_avg_sq like the parameter
        b = numel * per * arch.layers
        total += b
        if is_paged and numel >= BNB_PAGED_MIN:
            paged += b
    return int(total), int(paged)


def optimizer_step_temporaries(arch: Arch, prec: Precision, shape: Shape) -> int:
    """Scratch of one optimizer step (torch's foreach AdamW keeps about two parameter-sized lists)."""
    name = shape.optim.lower()
    if "8bit" in name or "bnb" in name or name.startswith("paged") or "sgd" in name:
        return 0
    return 2 * lora_param_count(arch, shape) * prec.lora


@dataclass
class LayerMemory:
    saved: int  # what autograd keeps for one decoder layer's backward
    mlp_peak: int  # extra bytes alive in the forward at the down projection, over the layer's saved tensors
    backward_scratch: int  # gradients in flight when back-propagation enters the layer
    stream_saved: int  # of `saved`, the layer's own input when the first norm keeps that very tensor


def layer_memory(arch: Arch, prec: Precision, shape: Shape) -> LayerMemory:
    """Bytes autograd saves in one decoder layer, following each tensor's dtype (see module docstring)."""
    T = shape.tokens
    rows, L = shape.attention_rows
    h, i, r = arch.hidden, arch.intermediate, shape.rank
    qw = arch.q_width
    c, s = prec.compute, prec.stream
    saved = 0.0  # per token unless noted

    def norm(in_bytes: int) -> int:
        """RMSNorm: keeps its input in fp32 and the fp32 rsqrt; returns its output dtype."""
        nonlocal saved
        saved += 4 * h + 4
        if arch.norms_per_layer == 4:  # Gemma: (x * (1 + w)).type_as(x)
            return in_bytes
        return max(prec.unquantized, in_bytes)  # Llama: w * x.to(in_dtype), w fp32 after kbit prep

    # PEFT casts a LoRA branch's input to the adapter dtype first, except in its bitsandbytes layers
    # under CUDA autocast (they test torch.is_autocast_enabled(), the CUDA flag).
    casts_to_adapter = not (prec.qlora and prec.autocast and prec.device == "cuda")

    def adapter_input(in_bytes: int) -> int:
        return prec.lora if casts_to_adapter else in_bytes

    def lora(names: list[str], fan_in: int, in_bytes: int) -> float:
        """LoRA branches on linears that share one input; returns the bytes per token they save."""
        nonlocal saved
        before = saved
        active = [n for n in names if n in shape.targets]
        x_b = adapter_input(in_bytes)
        shared_input_saved = False
        for _ in active:
            if shape.dropout > 0:
                saved += fan_in * prec.dropout_mask(x_b)
                saved += fan_in * (c if prec.autocast else x_b)  # lora_A's input: the dropped-out copy (cast by autocast)
            elif prec.autocast and x_b != c:
                saved += fan_in * c  # autocast casts lora_A's input separately for each branch
            elif x_b != in_bytes:
                saved += fan_in * x_b  # each branch's own cast copy
            else:
                shared_input_saved = True
            saved += r * (c if prec.autocast else prec.lora)  # lora_A output, kept by lora_B
        if shared_input_saved:
            saved += fan_in * in_bytes
        return saved - before

    def proj_out(name: str, in_bytes: int) -> int:
        base = prec.base_linear_out(in_bytes)
        if name in shape.targets:
            return max(base, c if prec.autocast else prec.lora)
        return base

    # Attention block
    x_b = norm(s)
    lora(["q_proj", "k_proj", "v_proj"], h, x_b)
    q_b = proj_out("q_proj", x_b)
    rope_b = max(q_b, s)  # q * cos: cos/sin follow the stream dtype
    attn_in = c if prec.autocast else rope_b
    # Padded or packed, there is a 4-D mask, and with a mask transformers repeats K/V to every head.
    kv_saved = qw
    scores = rows * arch.heads * L * L
    eager = arch.attn_logit_softcapping is not None  # Gemma-2 trains with eager attention (soft-capping)
    if eager:
        # q and the expanded k, v kept by the two matmuls; per score: tanh output, fp32 softmax and its cast
        saved += 3 * qw * attn_in
        saved_scores = scores * (c + 4 + (c if c != 4 else 0))
    else:
        saved += qw * attn_in + 2 * kv_saved * attn_in  # SDPA keeps q, k, v
        saved += qw * attn_in + arch.heads * 4  # its output and the fp32 log-sum-exp
        saved_scores = rows * L * L * c  # SDPA turns the boolean mask into an additive bias, per call
    attn_out_b = attn_in
    saved_at_attention = saved * T + saved_scores
    lora(["o_proj"], qw, attn_out_b)  # input: the contiguous copy of the attention output
    o_b = proj_out("o_proj", attn_out_b)
    if arch.norms_per_layer == 4:
        norm(o_b)  # post-attention norm
    h1_b = max(s, o_b)

    # MLP block
    y_b = norm(h1_b)
    lora(["gate_proj", "up_proj"], h, y_b)
    g_b = proj_out("gate_proj", y_b)
    saved += 3 * i * g_b  # act(gate) keeps gate; act * up keeps act and up
    lora(["down_proj"], i, g_b)
    d_b = proj_out("down_proj", g_b)
    if arch.norms_per_layer == 4:
        norm(d_b)

    # At the down projection's LoRA branch (forward, or its recompute under checkpointing) the MLP
    # product, its cast to the adapter dtype, the MLP input and the projection's output (PEFT clones
    # it) are alive besides everything the layer saved.
    p_cast = i * adapter_input(g_b) if "down_proj" in shape.targets and adapter_input(g_b) != g_b else 0
    mlp_peak = T * (i * g_b + p_cast + h * y_b + h * max(d_b, 4))
    # Backward entering the layer: its output gradient (twice: residual and MLP branch) and the
    # down projection's input gradient; autograd frees the down branch's saved input and mask as
    # it goes, except that without dropout that input is the MLP product, which stays
    # (calibrated on CPU runs, docs/memory.md).
    bwd = T * (2 * h * max(s, 4) + i * max(g_b, 4) * (1 if shape.dropout > 0 else 2))
    total_saved = saved * T + saved_scores
    if eager:
        # Eager attention's score matrices in flight (the matmul output and its scaled copy in the
        # forward, two fp32 score gradients in the backward) while only what the layer saved up to
        # its attention exists.
        after_attention = total_saved - saved_at_attention
        mlp_peak = max(mlp_peak, int(2 * scores * c - after_attention))
        bwd = max(bwd, int(2 * scores * 4 + T * 2 * h * 4 - after_attention))
    if prec.qlora:
        # dequantized copy of the largest 4-bit matrix (bitsandbytes' dequant + linear path)
        big = max(fi * fo for _, fi, fo in arch.linears())
        mlp_peak += big * c
        bwd += big * c
    return LayerMemory(
        saved=int(total_saved),
        mlp_peak=int(mlp_peak),
        backward_scratch=int(bwd),
        stream_saved=T * h * 4 if s == 4 else 0,
    )


@dataclass
class HeadMemory:
    saved: int  # kept from the loss forward for its backward (incl. the final norm's input)
    forward: int  # tiles and copies alive at once in the loss forward
    backward: int  # tiles, copies and the hidden-state gradient alive in the loss backward


# llmtune.train.chunked_loss.LOGITS_BLOCK_ELEMENTS and chunk_rows_for (that module imports torch; this one must not).
CHUNKED_HEAD_BLOCK_ELEMENTS = 2**24


def chunked_head_rows(vocab: int) -> int:
    return max(64, min(4096, CHUNKED_HEAD_BLOCK_ELEMENTS // vocab))


def head_memory(arch: Arch, prec: Precision, shape: Shape) -> HeadMemory:
    """TRL's fused LM head: log-probs of the labels in tiles, never the full [tokens, vocab] logits."""
    h, V = arch.hidden, arch.vocab
    T = shape.tokens
    rows, _ = shape.attention_rows
    N = T - rows  # scored positions (each row's last token has no label); worst case all are trained
    n, v = min(N, HEAD_TOKENS_PER_TILE), min(V, HEAD_VOCAB_PER_TILE)
    c, s = prec.compute, prec.stream
    final_b = max(prec.unquantized, s) if arch.norms_per_layer == 2 else s
    saved = T * (4 * h + 4)  # final norm keeps its fp32 input
    saved += N * h * final_b + N * 4 * 3 + N * 8  # the scored hidden states (a copy), log Z, entropy, labels
    head_weight_b = prec.unquantized
    casts = n * h * c * (final_b != c) + v * h * c * (head_weight_b != c)  # per-tile dtype casts
    buffer = n * HEAD_VOCAB_PER_TILE * c
    if prec.device == "cuda":
        temps_f = temps_b = 0.0  # the Triton kernel folds the tile in place
    else:
        extra = SOFTCAP_EXTRA_TEMPS if arch.final_logit_softcapping else 0
        temps_f, temps_b = CPU_HEAD_FORWARD_TEMPS + extra, CPU_HEAD_BACKWARD_TEMPS + extra
    tile = n * v * 4
    if shape.chunked_head:
        # llmtune.train.chunked_loss: the scored rows only, a [chunk, vocab] block of fp32 logits and its
        # softmax at a time; d log p / d hidden is formed in the same pass and kept for backward.
        block = min(N, chunked_head_rows(V)) * V * 4
        kept = N * h * 4 + N * 4 * 4  # the hidden-state gradient, log-probs, entropy, top-1, mean logit
        return HeadMemory(saved=int(saved + kept), forward=int(N * h * final_b + 2 * block),
                          backward=int(N * h * 4 + T * h * max(s, 4)))
    if shape.full_logits:
        # ORPO/CPO (trl.experimental) take log_softmax of the full logits: the logits, their fp32
        # log-softmax (kept for backward) and, in backward, its gradient (calibrated roughly, not measured).
        full = T * V * 4
        return HeadMemory(saved=int(saved + full), forward=int(T * h * final_b + 2 * full),
                          backward=int(N * h * 4 + 2 * full + T * h * max(s, 4)))
    forward = int(T * h * final_b + buffer + temps_f * tile + casts)  # the final norm's output is still referenced
    backward = int(N * h * 4 + buffer + temps_b * tile + casts + T * h * max(s, 4))  # fp32 hidden grad, then the stream's
    return HeadMemory(saved=int(saved), forward=forward, backward=backward)


# ---------------------------------------------------------------------------------------------
# The estimate


@dataclass
class Suggestion:
    change: str  # a recipe override, e.g. training.micro_batch_size=1
    why: str
    peak_bytes: int
    fits: bool | None

    def to_json(self) -> dict[str, Any]:
        return {"change": self.change, "why": self.why, "peak_bytes": self.peak_bytes, "fits": self.fits}


@dataclass
class Estimate:
    recipe: str
    model: str
    device: Device
    peak_bytes: int
    breakdown: dict[str, int]  # parts at the peak moment; sums to peak_bytes
    moment: str  # when in the step the peak happens
    gpu_mem_bytes: int | None
    fits: bool | None
    usable_bytes: int | None
    suggestions: list[Suggestion] = field(default_factory=list)
    torch_allocated_bytes: int = 0  # the part torch's allocator reports (max_memory_allocated)
    notes: list[str] = field(default_factory=list)
    arch: Arch | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "recipe": self.recipe,
            "model": self.model,
            "device": self.device,
            "peak_bytes": self.peak_bytes,
            "peak_gib": round(self.peak_bytes / GiB, 3),
            "fits": self.fits,
            "gpu_mem_bytes": self.gpu_mem_bytes,
            "usable_bytes": self.usable_bytes,
            "moment": self.moment,
            "breakdown": dict(self.breakdown),
            "torch_allocated_bytes": self.torch_allocated_bytes,
            "suggestions": [s.to_json() for s in self.suggestions],
            "notes": list(self.notes),
        }


BREAKDOWN_LABELS = {
    "quantized_weights": "quantized weights (NF4 + constants)",
    "unquantized_weights": "unquantized weights (embeddings, lm_head, norms)",
    "lora_params": "LoRA parameters",
    "gradients": "gradients (LoRA)",
    "optimizer_states": "optimizer states",
    "activations": "activations",
    "logits_loss": "logits / loss buffers",
    "temporaries": "temporaries",
    "cuda_context": "CUDA context",
    "allocator_overhead": "allocator overhead",
}


def peak_memory(arch: Arch, prec: Precision, shape: Shape) -> tuple[int, dict[str, int], str, int]:
    """(peak bytes, breakdown at the peak, moment, bytes torch's allocator sees) for one training step."""
    st = static_parts(arch, prec, shape)
    paged = st.pop("_paged")
    layer = layer_memory(arch, prec, shape)
    head = head_memory(arch, prec, shape)
    T, h, s = shape.tokens, arch.hidden, prec.stream
    rows, L = shape.attention_rows
    mask = rows * L * L  # the 4-D boolean attention mask, built once per forward
    if arch.attn_logit_softcapping is not None:  # eager attention: additive masks in the stream dtype
        mask = rows * L * L * s * (2 if arch.model_type == "gemma2" else 1)  # Gemma-2 adds a sliding-window one
    grad_in = T * h * (max(s, 4) + prec.compute)  # the gradient arriving from the layer above
    if shape.checkpointing:
        kept = arch.layers * T * h * s + mask  # each layer's input, kept by its checkpoint
        base_acts = kept
        # its first norm keeps the layer input, which the checkpoint already holds
        recomputed = layer.saved - layer.stream_saved
        layer_bwd = {"activations": kept + recomputed,
                     "temporaries": max(layer.backward_scratch, layer.mlp_peak + grad_in)}
        layer_fwd = {"activations": kept, "temporaries": layer.mlp_peak + recomputed}
    else:
        base_acts = arch.layers * layer.saved + mask  # layer 0's first norm keeps the embedding output
        layer_bwd = {"activations": base_acts, "temporaries": layer.backward_scratch}
        layer_fwd = {"activations": base_acts - layer.saved, "temporaries": layer.saved + layer.mlp_peak}
    moments = {
        "end of forward (loss head)": {"activations": base_acts + head.saved, "logits_loss": head.forward, "temporaries": 0},
        "backward through the loss head": {"activations": base_acts + head.saved, "logits_loss": head.backward, "temporaries": 0},
        "backward through a decoder layer": {**layer_bwd, "logits_loss": 0},
        "forward through a decoder layer": {**layer_fwd, "logits_loss": 0},
        "optimizer step": {"activations": 0, "logits_loss": 0, "temporaries": optimizer_step_temporaries(arch, prec, shape)},
    }
    static_total = sum(st.values())
    moment = max(moments, key=lambda m: sum(moments[m].values()))
    breakdown = {**st, **moments[moment]}
    allocated = static_total + sum(moments[moment].values()) - paged
    if prec.device == "cuda":
        breakdown["cuda_context"] = CUDA_CONTEXT_BYTES
        breakdown["allocator_overhead"] = int(max(ALLOCATOR_SLACK * allocated, ALLOCATOR_SLACK_MIN))
    breakdown = {k: int(v) for k, v in breakdown.items()}
    return sum(breakdown.values()), breakdown, moment, int(allocated)


def usable_bytes(gpu_mem_gb: float) -> int:
    card = int(gpu_mem_gb * GiB)
    return card - int(max(DISPLAY_HEADROOM * card, DISPLAY_HEADROOM_MIN))


def suggest(arch: Arch, prec: Precision, shape: Shape, recipe: Recipe, usable: int, stage: Stage = "train") -> list[Suggestion]:
    """Changes that would make the recipe fit, in the order to try them, each on top of the ones before."""
    section = "preference" if stage == "preference" and recipe.preference is not None else "training"
    per = sequences_per_example(recipe) if section == "preference" else 1  # sequences per batch item
    out: list[Suggestion] = []
    current_shape, current_prec = shape, prec
    peak = peak_memory(arch, prec, shape)[0]
    if peak <= usable:
        return out

    def record(change: str, why: str, new_shape: Shape, new_prec: Precision) -> bool:
        nonlocal current_shape, current_prec, peak
        new_peak = peak_memory(arch, new_prec, new_shape)[0]
        if new_peak >= peak:
            return False
        current_shape, current_prec, peak = new_shape, new_prec, new_peak
        out.append(Suggestion(change, why, new_peak, new_peak <= usable))
        return new_peak <= usable

    def smallest_that_fits(values: list[int], build) -> int:
        """The least aggressive value that fits, else the last one."""
        for v in values:
            if peak_memory(arch, *build(v))[0] <= usable:
                return v
        return values[-1]

    # 1. lower micro-batch, keeping the effective batch with gradient accumulation
    items = current_shape.micro_batch // per
    if items > 1:
        options = [b for b in (8, 4, 2, 1) if b < items]
        b = smallest_that_fits(options, lambda v: (current_prec, replace(current_shape, micro_batch=v * per)))
        accum = getattr(recipe, section).gradient_accumulation_steps * items // b
        if record(
            f"{section}.micro_batch_size={b} {section}.gradient_accumulation_steps={accum}",
            "fewer sequences per forward pass; accumulation keeps the effective batch",
            replace(current_shape, micro_batch=b * per), current_prec,
        ):
            return out
    # 2. gradient checkpointing
    if not current_shape.checkpointing and record(
        "training.gradient_checkpointing=true", "keep one tensor per layer and recompute the rest in backward (~30% slower)",
        replace(current_shape, checkpointing=True), current_prec,
    ):
        return out
    # 3. shorter sequences
    options = [n for n in (4096, 2048, 1536, 1024, 768, 512, 384, 256) if n < current_shape.seq]
    if options:
        n = smallest_that_fits(options, lambda v: (current_prec, replace(current_shape, seq=v)))
        if record(f"data.max_seq_length={n}", "shorter training sequences (longer chats are cut at a turn boundary)",
                  replace(current_shape, seq=n), current_prec):
            return out
    # 4. smaller rank
    options = [rk for rk in (32, 16, 8, 4) if rk < current_shape.rank]
    if options:
        rk = smallest_that_fits(options, lambda v: (current_prec, replace(current_shape, rank=v)))
        if record(f"lora.rank={rk} lora.alpha={2 * rk}", "fewer LoRA parameters, gradients and optimizer states",
                  replace(current_shape, rank=rk), current_prec):
            return out
    # 5. 4-bit base
    if not current_prec.qlora and current_prec.device == "cuda":
        q = replace(current_prec, qlora=True, double_quant=True, unquantized=4, lora=2)
        if record("quantization.mode=nf4", "QLoRA: the base model in 4-bit NF4", current_shape, q):
            return out
    # 6. 8-bit paged optimizer
    if "8bit" not in current_shape.optim and current_prec.device == "cuda":
        record("training.optim=paged_adamw_8bit", "8-bit AdamW states, paged out under pressure",
               replace(current_shape, optim="paged_adamw_8bit"), current_prec)
    return out


def estimate(recipe: Recipe, gpu_mem_gb: float | None, device: Device = "cuda", stage: Stage = "train") -> Estimate:
    """Predict the peak memory of training `recipe` and whether it fits a card of `gpu_mem_gb` GiB.

    `device="cuda"` (the default) predicts a GPU run whatever this machine has; `device="cpu"`
    predicts a CPU run (fp32, no CUDA context) and compares with `gpu_mem_gb` as RAM if given.
    `stage="preference"` predicts the preference stage (recipe.preference) instead of `train`.
    """
    if stage == "preference" and recipe.preference is None:
        raise ValueError("stage=preference needs a recipe with a `preference:` section")
    arch = load_arch(recipe.model.base)
    prec = precision_for(recipe, device)
    shape = shape_for(recipe, arch, stage)
    peak, breakdown, moment, allocated = peak_memory(arch, prec, shape)
    usable = usable_bytes(gpu_mem_gb) if gpu_mem_gb else None
    notes = [f"architecture: {arch.source}"]
    if recipe.training.gradient_checkpointing == "auto" and gpu_mem_gb and auto_checkpointing(peak, int(gpu_mem_gb * GiB)):
        # What training does with `auto` when the run would not fit: checkpoint.
        shape = replace(shape, checkpointing=True)
        peak, breakdown, moment, allocated = peak_memory(arch, prec, shape)
        notes.append("training.gradient_checkpointing=auto turns checkpointing on for this memory size")
    fits = None if usable is None else peak <= usable
    if stage == "preference":
        p = recipe.preference
        notes.append(f"preference stage ({p.method}): micro-batches of {p.micro_batch_size} example(s) x "
                     f"{sequences_per_example(recipe)} padded sequence(s) of up to max_seq_length"
                     + ("; the reference forward runs without gradients on the same weights (adapter disabled)"
                        if p.method in ("dpo", "kto") else "; no reference model; trl.experimental's trainers compute the "
                     "full [tokens, vocab] logits in fp32 (a rough model of them, not measured)"))
        if shape.chunked_head:
            notes.append("log-probs of the reply tokens by llmtune's chunked head (training.chunked_loss), "
                         "worst case every token scored")
        if shape.frozen_adapters:
            notes.append("4-bit base + start_from sft: the SFT adapter keeps training against a frozen copy of itself "
                         "(TRL's `ref` adapter), counted in the LoRA parameters")
    elif shape.packed:
        notes.append("assumes packed rows filled to max_seq_length, every token trained, and TRL's path (an attention "
                     "mask over the whole micro-batch, TRL's LM head); llmtune's per-conversation attention and chunked "
                     "loss use less, so this is an upper bound for llmtune runs")
    else:
        notes.append("assumes padded batches whose longest sequence is max_seq_length and every token trained")
    if prec.qlora and device == "cuda":
        notes.append("embeddings, lm_head and norms are counted in fp32 (prepare_model_for_kbit_training upcasts them)")
    _, paged = optimizer_state_bytes(arch, prec, shape)
    if paged:
        notes.append(f"{paged / MiB:.0f} MiB of optimizer state is paged (CUDA unified memory; can spill to RAM)")
    if arch.attn_logit_softcapping and recipe.model.attn_implementation == "sdpa":
        notes.append("Gemma-2 soft-caps attention logits; SDPA ignores that: use model.attn_implementation=eager")
    return Estimate(
        recipe=recipe.name if stage == "train" else f"{recipe.name} (preference: {recipe.preference.method})",
        model=recipe.model.base,
        device=device,
        peak_bytes=peak,
        breakdown=breakdown,
        moment=moment,
        gpu_mem_bytes=int(gpu_mem_gb * GiB) if gpu_mem_gb else None,
        fits=fits,
        usable_bytes=usable,
        suggestions=suggest(arch, prec, shape, recipe, usable, stage) if usable is not None else [],
        torch_allocated_bytes=allocated,
        notes=notes,
        arch=arch,
    )


def checkpointing_decision(recipe: Recipe, device: Device, memory_bytes: int, stage: Stage = "train") -> tuple[bool, str]:
    """training.gradient_checkpointing=auto: (on?, why). On only when the estimated peak without
    checkpointing exceeds 90% of `memory_bytes` (the GPU's memory, or this process's share of RAM)."""
    try:
        arch = load_arch(recipe.model.base)
        shape = replace(shape_for(recipe, arch, stage), checkpointing=False)
        peak = peak_memory(arch, precision_for(recipe, device), shape)[0]
    except Exception as exc:  # no architecture file or config for this base: keep the fast path
        return False, f"off (auto: no memory estimate for {recipe.model.base}: {exc})"
    on = auto_checkpointing(peak, memory_bytes)
    budget = AUTO_CHECKPOINTING_SHARE * memory_bytes
    return on, f"{'on' if on else 'off'} (auto: estimated peak {peak / GiB:.1f} GiB without it, {budget / GiB:.1f} GiB usable)"


def auto_checkpointing(peak_without: int, memory_bytes: int) -> bool:
    """The `auto` rule: checkpoint when the peak without it would exceed 90% of the memory."""
    return peak_without > int(AUTO_CHECKPOINTING_SHARE * memory_bytes)
