"""The watermark: KGW green lists keyed by a deployment secret (Kirchenbauer et al., 2023).

Generation: before each sampled token, every candidate token `t` whose pair with the previous
token `p` is green gets `delta` added to its logit. Detection: count the green pairs in a text's
tokens and test the count against the binomial(n, gamma) that text written without the key
follows. Both sides compute greenness with the same integer arithmetic, defined here:

    A, B, C = three int32 tables over the vocabulary, read from SHAKE-256(label, secret)
    z(p, t)  = A[p] * B[t] + C[t]   (int32, two's-complement wrap-around)
    green    = z(p, t) < -2**31 + round(gamma * 2**32)

For a fixed `p` the values z(p, .) are uniform and independent across tokens (C is), and two
different previous tokens give independent lists (their difference is (A[p]-A[q]) * B[t]), so
a text that does not know the secret is green at rate gamma, pair by pair. The detector scores
each distinct (p, t) pair once, so repeated phrases cannot inflate the count, and the p-value
is the exact binomial tail. Tables of any length agree on their common prefix (SHAKE output),
so the model's padded vocabulary and the tokenizer's agree on every real token.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

SCHEME = "kgw-v1"
DEFAULT_GAMMA = 0.25
DEFAULT_DELTA = 2.0
DEFAULT_P_VALUE = 1e-3  # `watermarked` below this; the bench reports the rate at this false-positive level
MIN_SCORED = 16  # fewer distinct token pairs than this: never called watermarked (too short to say)
_LABELS = (b"A", b"B", b"C")


@dataclass(frozen=True)
class WatermarkKey:
    """The secret and the green-list fraction; `tables(n)` are the same on every device."""

    secret: bytes
    gamma: float = DEFAULT_GAMMA

    def __post_init__(self):
        if not self.secret:
            raise ValueError("the watermark secret is empty")
        if not 0 < self.gamma < 1:
            raise ValueError(f"gamma must be between 0 and 1 (got {self.gamma})")

    @property
    def fingerprint(self) -> str:
        """Names the secret without revealing it (printed by serve and by detect, to compare)."""
        return hashlib.sha256(b"llmtune-watermark-fingerprint\0" + self.secret).hexdigest()[:12]

    @property
    def threshold(self) -> int:
        """z below this is green: a gamma share of the int32 range."""
        return -(2**31) + round(self.gamma * 2**32)

    def tables(self, vocab_size: int) -> np.ndarray:
        """int32 array (3, vocab_size): A, B and C."""
        out = np.empty((3, vocab_size), dtype=np.int32)
        for i, label in enumerate(_LABELS):
            digest = hashlib.shake_256(f"llmtune-watermark/{SCHEME}/".encode() + label + b"\0" + self.secret).digest(4 * vocab_size)
            out[i] = np.frombuffer(digest, dtype="<i4")
        return out


def green_pairs(tables: np.ndarray, prev: np.ndarray, tok: np.ndarray, threshold: int) -> np.ndarray:
    """Whether each (prev, tok) pair is green, in the same int32 wrap-around arithmetic as the sampler."""
    a, b, c = tables
    with np.errstate(over="ignore"):
        z = a[prev] * b[tok] + c[tok]  # int32 arrays wrap around
    return z < threshold


@dataclass
class Detection:
    tokens: int  # tokens in the text
    scored: int  # distinct (previous, token) pairs counted
    green: int
    z_score: float
    p_value: float
    watermarked: bool

    def as_dict(self) -> dict:
        return {"tokens": self.tokens, "scored": self.scored, "green": self.green, "z_score": round(self.z_score, 3),
                "p_value": self.p_value, "watermarked": self.watermarked}


def detect_tokens(ids: Sequence[int], key: WatermarkKey, p_value_threshold: float = DEFAULT_P_VALUE,
                  tables: np.ndarray | None = None) -> Detection:
    """Score token ids: green count, z-score, one-sided binomial p-value and the decision."""
    from scipy.stats import binom

    ids = np.asarray(ids, dtype=np.int64)
    pairs = np.unique(np.stack([ids[:-1], ids[1:]], axis=1), axis=0) if len(ids) > 1 else np.empty((0, 2), np.int64)
    n = len(pairs)
    if n == 0:
        return Detection(len(ids), 0, 0, 0.0, 1.0, False)
    if tables is None or tables.shape[1] <= int(ids.max()):
        tables = key.tables(int(ids.max()) + 1)
    green = int(green_pairs(tables, pairs[:, 0], pairs[:, 1], key.threshold).sum())
    gamma = key.gamma
    z = (green - gamma * n) / math.sqrt(n * gamma * (1 - gamma))
    p = float(binom.sf(green - 1, n, gamma))
    return Detection(len(ids), n, green, z, p, bool(n >= MIN_SCORED and p < p_value_threshold))
