"""The moderation package's user-facing error, and the JSON Lines reader whose errors name file and line."""

import json
from collections.abc import Iterator
from pathlib import Path

from llmtune.errors import LlmtuneError


class ModerationError(LlmtuneError, ValueError):
    """A moderation problem the user can fix: a bad policy file, a missing adapter, an unknown category."""


def json_objects(path: Path, what: str) -> Iterator[tuple[int, str, dict]]:
    """(line number, "file:line", object) for every non-blank line of a JSON Lines file of
    `what` (in the not-found message); a line that is not a JSON object is an error naming it."""
    if not path.is_file():
        raise ModerationError(f"{what} not found: {path}")
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ModerationError(f"{where}: not valid JSON ({exc.msg})") from None
            if not isinstance(obj, dict):
                raise ModerationError(f"{where}: a row is a JSON object")
            yield n, where, obj
