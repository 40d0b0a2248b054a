"""The moderation package's user-facing error (the lead may move it into llmtune/errors.py)."""

from llmtune.errors import LlmtuneError


class ModerationError(LlmtuneError, ValueError):
    """A moderation problem the user can fix: a bad policy file, a missing adapter, an unknown category."""
