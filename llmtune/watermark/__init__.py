"""A keyed KGW watermark on every served reply, and its detector (docs/serving.md, "Watermark").

- `scheme`: the green lists (a keyed hash of the previous token and the candidate token) and
  the one-sided binomial test that detects them; numpy/torch only, shared by both sides.
- `vllm_processor`: the V1-engine logits processor `llmtune serve` loads into vLLM.
- `detect`: `llmtune watermark detect` on text or JSONL rows.
"""

from llmtune.watermark.scheme import SCHEME, WatermarkKey, Detection, detect_tokens

__all__ = ["SCHEME", "WatermarkKey", "Detection", "detect_tokens"]
