"""Input formats -> Conversation. Every row either becomes a Conversation or a Rejection.

Supported here: OpenAI `messages` (role/content) and ShareGPT `conversations`
(from/value), as JSONL or as a JSON array. Role spellings seen in the wild are mapped.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llmtune.data.types import ROLES, Conversation, Message, Rejection

ROLE_ALIASES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "bot": "assistant",
    "model": "assistant",
    "char": "assistant",
    "character": "assistant",
}
MAX_CHARS_PER_MESSAGE = 100_000  # beyond this a row is almost surely a broken export
ROW_PREVIEW = 300


def _preview(raw: str) -> str:
    return raw if len(raw) <= ROW_PREVIEW else raw[:ROW_PREVIEW] + "..."


def detect_format(obj: Any) -> str | None:
    if isinstance(obj, dict):
        if "messages" in obj:
            return "openai"
        if "conversations" in obj:
            return "sharegpt"
    return None


def row_to_conversation(
    obj: Any, source: str, line: int, raw: str, fmt: str = "auto", role_map: dict[str, str] | None = None
) -> Conversation | Rejection:
    def reject(reason: str, detail: str) -> Rejection:
        return Rejection(source=source, line=line, reason=reason, detail=detail, row=_preview(raw))

    if not isinstance(obj, dict):
        return reject("not_an_object", f"expected a JSON object per row, got {type(obj).__name__}")
    kind = detect_format(obj) if fmt == "auto" else fmt
    if kind is None:
        return reject("unknown_format", f"no `messages` or `conversations` key (keys: {', '.join(sorted(obj)) or 'none'})")
    key, role_key, content_key = (
        ("messages", "role", "content") if kind == "openai" else ("conversations", "from", "value")
    )
    turns = obj.get(key)
    if not isinstance(turns, list):
        return reject("missing_messages", f"`{key}` must be a list of turns")
    if not turns:
        return reject("empty_conversation", f"`{key}` is empty")
    aliases = {**ROLE_ALIASES, **{k.lower(): v for k, v in (role_map or {}).items()}}
    messages: list[Message] = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            return reject("bad_message", f"turn {i} is {type(turn).__name__}, not an object")
        raw_role = turn.get(role_key)
        content = turn.get(content_key)
        if not isinstance(raw_role, str):
            return reject("bad_message", f"turn {i} has no `{role_key}` string")
        role = aliases.get(raw_role.strip().lower())
        if role not in ROLES:
            return reject(
                "unknown_role",
                f"turn {i} role `{raw_role}` is not one of system/user/assistant or a known alias; "
                "map it in the recipe (data.sources[].role_map)",
            )
        if not isinstance(content, str):
            return reject("bad_message", f"turn {i} `{content_key}` is {type(content).__name__}, not a string")
        if not content.strip():
            return reject("empty_content", f"turn {i} ({role}) has empty content")
        if len(content) > MAX_CHARS_PER_MESSAGE:
            return reject("absurd_length", f"turn {i} has {len(content):,} characters (limit {MAX_CHARS_PER_MESSAGE:,})")
        messages.append(Message(role=role, content=content))
    if not any(m.role == "assistant" for m in messages):
        return reject("no_assistant_turn", "the conversation has no assistant turn to learn from")
    return Conversation(messages=messages, source=source, line=line)


def _jsonl_rows(path: Path) -> Iterator[tuple[int, str, Any | Exception]]:
    with path.open("rb") as f:
        for lineno, raw_bytes in enumerate(f, start=1):
            try:
                raw = raw_bytes.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield lineno, raw_bytes.decode("utf-8", errors="replace"), exc
                continue
            if not raw.strip():
                continue
            try:
                yield lineno, raw.rstrip("\n"), json.loads(raw)
            except json.JSONDecodeError as exc:
                yield lineno, raw.rstrip("\n"), exc


def read_source(path: Path, fmt: str = "auto", role_map: dict[str, str] | None = None) -> Iterator[Conversation | Rejection]:
    """Every row of one file, as a Conversation or a Rejection (source, line, reason)."""
    source = str(path)
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            yield Rejection(source, 0, "bad_json", f"the file is not valid JSON: {exc}", "")
            return
        records = data if isinstance(data, list) else [data]
        for i, obj in enumerate(records, start=1):
            yield row_to_conversation(obj, source, i, json.dumps(obj, ensure_ascii=False), fmt, role_map)
        return
    for lineno, raw, obj in _jsonl_rows(path):
        if isinstance(obj, UnicodeDecodeError):
            yield Rejection(source, lineno, "non_utf8", f"the line is not UTF-8: {obj}", _preview(raw))
        elif isinstance(obj, json.JSONDecodeError):
            yield Rejection(source, lineno, "bad_json", f"not valid JSON: {obj.msg} at column {obj.colno}", _preview(raw))
        else:
            yield row_to_conversation(obj, source, lineno, raw, fmt, role_map)
