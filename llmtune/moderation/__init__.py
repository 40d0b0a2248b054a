"""Moderation: the screen on every training row, prompt, system prompt, character card and output.

    from llmtune.moderation import load_screener
    decision = load_screener(config).screen(text)   # Decision(allowed, categories, scores, layer)

Importing this package is cheap (llmtune.config imports `policy` at CLI start-up); the screener,
rules and adapter load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from llmtune.moderation.policy import BUILTIN_CATEGORIES, CONFIGURABLE, HARD_FLOOR, ModerationConfig

if TYPE_CHECKING:
    from llmtune.moderation.screener import Decision, Screener, load_screener

__all__ = ["BUILTIN_CATEGORIES", "CONFIGURABLE", "HARD_FLOOR", "Decision", "ModerationConfig", "Screener", "load_screener"]


def __getattr__(name: str):
    if name in ("Decision", "Screener", "load_screener"):
        from llmtune.moderation import screener

        return getattr(screener, name)
    raise AttributeError(f"module 'llmtune.moderation' has no attribute {name!r}")
