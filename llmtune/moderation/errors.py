"""The moderation package's user-facing error (defined with the others in llmtune.errors)."""

from llmtune.errors import ModerationError

__all__ = ["ModerationError"]
