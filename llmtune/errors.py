"""User-facing errors. Each message says what is wrong, where (file, line, key) and what to do.

The CLI prints them as one line and exits with code 2; anything else is a bug and keeps its traceback.
"""


class LlmtuneError(Exception):
    """Base of every error the user can fix."""


class RecipeError(LlmtuneError, ValueError):
    """A recipe problem: unknown key, wrong type, bad override, unreadable file."""


class ModelError(LlmtuneError, RuntimeError):
    """A base model that cannot be resolved or loaded."""


class DataError(LlmtuneError, ValueError):
    """The data as a whole cannot be trained on (single bad rows go to quarantine instead)."""


class TemplateError(LlmtuneError, ValueError):
    """The chat template cannot render or mask a conversation."""


class ModerationError(LlmtuneError, ValueError):
    """A moderation problem the user can fix: a bad policy file, a missing adapter, an unknown category."""
