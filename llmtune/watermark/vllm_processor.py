"""The watermark inside vLLM: a V1-engine logits processor (`--logits-processors
llmtune.watermark.vllm_processor:KGWWatermark`), loaded by `llmtune serve` (vllm_server.py).

vLLM builds it once per worker; its settings come from the environment llmtune gives vLLM:
LLMTUNE_WATERMARK_KEY (the secret, hex), LLMTUNE_WATERMARK_GAMMA and LLMTUNE_WATERMARK_DELTA.
Every row of every batch is watermarked once it has an output token: the green list of the
next token depends on the previous generated token (scheme.py), so the detector, which sees
only the reply, can score every pair it reads.

Async scheduling (vllm#52461): the worker appends -1 placeholders to each request's output
list before the forward pass, and replaces them with the sampled ids only right before
sampling, and only when some processor needs the ids (`logitsprocs_need_output_token_ids`,
true for processors given with --logits-processors, false for entry-point plugins). So this
processor keeps only references to vLLM's lists (from `update_state`) and reads the previous
token in `apply`, after the repair; it is loaded by --logits-processors, never as a plugin;
and a row whose previous token is still a placeholder is left unmarked and counted
(`placeholder_rows`, with a warning in vLLM's log) rather than marked with the wrong list.
Holding no state derived from the ids also keeps it right when vLLM preempts and re-adds a
request or discards a token sampled from a partial prefill.
"""

from __future__ import annotations

import os

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

from llmtune.watermark.scheme import DEFAULT_DELTA, DEFAULT_GAMMA, WatermarkKey

QUALNAME = "llmtune.watermark.vllm_processor:KGWWatermark"


class KGWWatermark(LogitsProcessor):
    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        secret = os.environ.get("LLMTUNE_WATERMARK_KEY", "")
        if not secret:
            raise RuntimeError("the llmtune watermark processor needs LLMTUNE_WATERMARK_KEY (set by `llmtune serve`)")
        self.key = WatermarkKey(bytes.fromhex(secret), float(os.environ.get("LLMTUNE_WATERMARK_GAMMA", DEFAULT_GAMMA)))
        self.delta = float(os.environ.get("LLMTUNE_WATERMARK_DELTA", DEFAULT_DELTA))
        self.device = device
        vocab = vllm_config.model_config.get_vocab_size() if vllm_config is not None else 0
        self._tables(vocab)
        self._z = torch.empty((0, 0), dtype=torch.int32, device=device)
        self._green = torch.empty((0, 0), device=device)
        self.outputs: dict[int, list[int]] = {}  # batch index -> vLLM's own output-token list of that request
        self.placeholder_rows = 0
        self.marked_rows = 0

    def _tables(self, vocab: int) -> None:
        self.vocab = vocab
        a, b, c = torch.from_numpy(self.key.tables(max(vocab, 1))).to(self.device)
        self.a, self.b, self.c = a, b, c

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        return None  # no per-request setting: a client cannot turn the watermark off

    def is_argmax_invariant(self) -> bool:
        return False  # the bias can change the most likely token, so greedy requests are marked too

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        # Keep the list itself: under async scheduling its last value is a placeholder here.
        process_dict_updates(self.outputs, batch_update, lambda _params, _prompt, output: output)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        rows, prev = [], []
        for index, output in self.outputs.items():
            if not output or index >= logits.shape[0]:
                continue  # the first token follows the prompt, which the detector never sees
            last = output[-1]
            if last < 0:
                self.placeholder_rows += 1
                if self.placeholder_rows == 1:
                    from vllm.logger import init_logger

                    init_logger(__name__).warning(
                        "llmtune watermark: a previous token was still an async-scheduling placeholder; that token "
                        "is not watermarked (load the processor with --logits-processors, as `llmtune serve` does)")
                continue
            rows.append(index)
            prev.append(last)
        if not rows:
            return logits
        if logits.shape[1] > self.vocab:
            self._tables(logits.shape[1])
        n, width = len(rows), logits.shape[1]
        if self._z.shape[0] < n or self._z.shape[1] != width or self._z.device != logits.device:
            # Reused buffers: the per-step cost is three passes over (rows x vocab), no allocation.
            self._z = torch.empty((n, width), dtype=torch.int32, device=logits.device)
            self._green = torch.empty((n, width), dtype=logits.dtype, device=logits.device)
        z, green = self._z[:n], self._green[:n]
        p = torch.tensor(prev, device=logits.device)
        torch.addcmul(self.c[:width], self.a[p].unsqueeze(1), self.b[:width], out=z)  # int32 wrap-around, as scheme.py
        torch.lt(z, self.key.threshold, out=green)  # 1.0 where green
        if rows == list(range(n)) and n == logits.shape[0]:
            logits.add_(green, alpha=self.delta)
        else:
            logits.index_add_(0, torch.tensor(rows, device=logits.device), green, alpha=self.delta)
        self.marked_rows += n
        return logits
