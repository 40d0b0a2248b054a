"""Bulk screening of training data: the same decisions for the conversations that could be
blocked, at a fraction of the cost for the rest.

    risky = could_block(screener.rules, texts)   # could any rule or fact block this conversation?
    scores = prefilter.score(texts)             # the classifier's distilled first stage

The gateway never uses this module: every request and reply there goes through the rules, the
facts and the classifier in full. `prepare` screens tens of thousands of conversations, and most
of them hold nothing a rule or a fact could act on: no minor cue (an age, a school level, a child
word, a euphemism, a birth year), no real person (a listed name, a described public figure, a
private person, a handle, an address) and no cue of a configurable category. For those the rules
and facts can only allow, and the classifier runs only when its first stage (`Prefilter`, a
hashed bag-of-words logistic model distilled from the classifier and calibrated so that it
passes every calibration text the classifier blocks) says it might block. The recall of the
first stage against the full classifier is measured on the dev and held-out sets and reported
in docs/moderation.md; `moderation.bulk: full` turns it off.
"""

from __future__ import annotations

import json
import re
import zlib
from functools import lru_cache
from pathlib import Path

import numpy as np

from llmtune.moderation import facts as F
from llmtune.moderation import rules as R
from llmtune.moderation.normalize import plain_view

PREFILTER_NAME = "prefilter.npz"
FEATURE_BITS = 18


# ---------------------------------------------------------------------------------------------
# Could a rule or a fact block this text?

_RISK_PATTERNS = (
    *R._AGE_PATTERNS, R._MINOR_PHRASES, R._TEEN, R._EUPHEMISM, R._STANDALONE, R._APPEARANCE,
    R._REAL_CUE, R._SV_CORE, R._REFUSAL, R._BESTIALITY, R._ANIMAL_PARTNER, R._DANGEROUS,
    F._BIRTH, F._YEARS_TO_18, F._INDIRECT_MINOR, F._PRIVATE, F._DESCRIBED, F._DESCRIBED_WHO, F._HANDLE, F._ADDRESS,
    F._REAL_NAME,
)


_MINOR_KEYS = ("age_patterns", "minor_terms", "school_patterns", "appearance_patterns", "ageplay_terms")


@lru_cache(maxsize=1)
def _risk_scanner():
    """One RE2 automaton over the relaxed union of every cue a blocking rule or fact needs
    (lookarounds dropped, so it matches wherever they do, and more)."""
    import re2

    options = re2.Options()
    options.case_sensitive = False
    options.max_mem = 512 << 20
    return re2.compile("|".join(f"(?:{R._relaxed(p.pattern)})" for p in _RISK_PATTERNS), options)


def could_block(rules: R.RuleSet, texts: list[str]) -> bool:
    """False only when no rule and no conversation fact can block a conversation of these texts:
    every text is plain (nothing for normalisation or a decoder to undo) and holds no risk cue,
    no listed name and no platform pattern. Anything else takes the full screen."""
    from llmtune.moderation.lexicon import index

    for text in texts:
        view = plain_view(text)
        if view is None:
            return True
        if _risk_scanner().search(view) or rules.gazetteer.find(view) or rules.extra_names.find(view):
            return True
        if any(p.search(view) for cat in rules.platform for p in cat.compiled):
            return True
        idx = index()
        for (li, key), entries in idx.candidates(view).items():  # candidates by literal; confirm by regex
            if key in _MINOR_KEYS and any(idx.langs[li].patterns[key][i].search(view) for i in entries):
                return True
    return False


# ---------------------------------------------------------------------------------------------
# The classifier's first stage

_WORD = re.compile(r"[^\W_]+|[^\w\s]")


def features(text: str, bits: int = FEATURE_BITS) -> list[int]:
    """Hashed word unigrams and bigrams of a text (CRC32, stable across processes)."""
    words = _WORD.findall(text.lower())
    mask = (1 << bits) - 1
    out = [zlib.crc32(w.encode()) & mask for w in words]
    out += [zlib.crc32(f"{a} {b}".encode()) & mask for a, b in zip(words, words[1:])]
    return out


class Prefilter:
    """score(text) = sigmoid(bias + sum of the weights of its hashed features); a text scoring
    below `threshold` is one the classifier would not block."""

    def __init__(self, weights: np.ndarray, bias: float, threshold: float, meta: dict | None = None):
        self.weights, self.bias, self.threshold, self.meta = weights.astype(np.float32), float(bias), float(threshold), meta or {}

    def logit(self, text: str) -> float:
        ids = features(text)
        return self.bias + float(self.weights[ids].sum()) if ids else self.bias

    def passes(self, text: str) -> bool:
        """Whether the classifier must see this text."""
        return self.logit(text) >= self.threshold

    def save(self, path: Path) -> None:
        np.savez_compressed(path, weights=self.weights, bias=np.float32(self.bias), threshold=np.float32(self.threshold),
                            meta=np.frombuffer(json.dumps(self.meta).encode(), dtype=np.uint8))

    @classmethod
    def load(cls, path: Path) -> "Prefilter | None":
        if not path.is_file():
            return None
        z = np.load(path)
        return cls(z["weights"], float(z["bias"]), float(z["threshold"]), json.loads(bytes(z["meta"]).decode() or "{}"))


def train_prefilter(texts: list[str], targets: list[float], cal_texts: list[str], cal_targets: list[float],
                    epochs: int = 6, seed: int = 0, margin: float = 1.0) -> Prefilter:
    """Logistic regression on hashed features (torch EmbeddingBag), positives weighted up; the
    threshold is the lowest calibration logit among the texts the classifier blocks, less `margin`
    (in logits), so every one of them passes."""
    import torch

    torch.manual_seed(seed)
    size = 1 << FEATURE_BITS
    bag = torch.nn.EmbeddingBag(size, 1, mode="sum")
    torch.nn.init.zeros_(bag.weight)
    bias = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([bag.weight, bias], lr=0.05)
    feats = [features(t) or [0] for t in texts]
    y = torch.tensor(targets, dtype=torch.float32)
    pos = max(1.0, float(y.sum()))
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor((len(y) - pos) / pos * 2.0))
    order = list(range(len(feats)))
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        rng.shuffle(order)
        for start in range(0, len(order), 256):
            idx = order[start:start + 256]
            flat = torch.tensor([f for i in idx for f in feats[i]])
            offsets = torch.tensor(np.cumsum([0] + [len(feats[i]) for i in idx[:-1]]))
            logits = bag(flat, offsets).squeeze(1) + bias
            loss = loss_fn(logits, y[idx]) + 1e-6 * bag.weight.pow(2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
    pf = Prefilter(bag.weight.detach().squeeze(1).numpy(), float(bias.item()), 0.0)
    blocked = [pf.logit(t) for t, k in zip(cal_texts, cal_targets) if k]
    threshold = (min(blocked) - margin) if blocked else 0.0
    kept = [pf.logit(t) for t, k in zip(cal_texts, cal_targets) if not k]
    pf.threshold = threshold
    pf.meta = {"calibration_blocked": len(blocked), "calibration_allowed": len(kept),
               "allowed_passed_share": round(float(np.mean([v >= threshold for v in kept])) if kept else 0.0, 4),
               "margin_logits": margin}
    return pf
