"""Input formats -> Conversation. Every row either becomes a Conversation or a Rejection.

Containers (how rows are stored):
  JSONL (one row a line), JSON (one object or an array), Parquet (`.parquet`; row number =
  1-based row index), a `datasets.save_to_disk` directory (a Dataset, or a DatasetDict read
  split by split), or a plain directory of such files (a folder of SillyTavern chats).
Row shapes, detected per row under `auto`:
  OpenAI `messages` (role/content; content may be a list of text parts), ShareGPT
  `conversations` (from/value, optional top-level `system`) and PIPPA (`bot_name`,
  `bot_definitions`, `conversation: [{message, is_human}]`).
Whole files:
  a SillyTavern chat export (JSONL: a header line with `user_name`/`character_name`, then
  one `{name, is_user, mes}` object a message) is one conversation; a character card
  (V1/V2/V3, JSON or PNG; see llmtune.data.cards) gives its example dialogues.
A card can also be the system turn of chat logs: `read_source(logs, card=card_path)`.

Role spellings seen in the wild are mapped case-insensitively; `role_map` adds custom
names. Consecutive messages of one role stay separate messages (templating decides).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmtune.data.cards import (
    CardError,
    CharacterCard,
    GreetingMode,
    attach_card,
    card_conversations,
    card_system_prompt,
    load_card,
    substitute_placeholders,
)
from llmtune.data.types import ROLES, Conversation, Message, Rejection
from llmtune.errors import DataError

if TYPE_CHECKING:
    from llmtune.config import DataSource

ROLE_ALIASES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "prompter": "user",  # OpenAssistant
    "assistant": "assistant",
    "gpt": "assistant",
    "bot": "assistant",
    "model": "assistant",  # Gemini
    "char": "assistant",
    "character": "assistant",
    "ai": "assistant",
}
ROW_SHAPES = ("openai", "sharegpt", "pippa")
DATASET_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
CHAT_FILE_SUFFIXES = (".jsonl", ".json", ".parquet")
MAX_CHARS_PER_MESSAGE = 100_000  # beyond this a row is almost surely a broken export
ROW_PREVIEW = 300
_PIPPA_RANDOM_USER = re.compile(r"\{\{\s*random_user_\d+\s*\}\}", re.IGNORECASE)

Row = tuple[int, str, Any]  # (line or record number, raw text, parsed object or the Exception that stopped it)


def _preview(raw: str) -> str:
    return raw if len(raw) <= ROW_PREVIEW else raw[:ROW_PREVIEW] + "..."


def _dump(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, default=str)


def detect_format(obj: Any) -> str | None:
    """The row shape of one parsed row: openai, sharegpt, pippa, or None."""
    if isinstance(obj, dict):
        if "messages" in obj:
            return "openai"
        if "conversations" in obj:
            return "sharegpt"
        if any(k in obj for k in ("bot_name", "bot_definitions", "bot_description", "bot_greeting")) or (
            isinstance(obj.get("conversation"), list)
        ):
            return "pippa"
    return None


def role_aliases(role_map: dict[str, str] | None) -> dict[str, str]:
    """Known role spellings plus the recipe's role_map, all keyed lower-case."""
    return {**ROLE_ALIASES, **{k.strip().lower(): v for k, v in (role_map or {}).items()}}


def _message_text(content: Any) -> str | None:
    """A message's text: a string, or OpenAI content parts that are all text; None otherwise."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content
    ):
        return "\n".join(p["text"] for p in content)
    return None


def _check_content(i: int, role: str, content: str) -> tuple[str, str] | None:
    if not content or content.isspace():
        return "empty_content", f"turn {i} ({role}) has empty content"
    if len(content) > MAX_CHARS_PER_MESSAGE:
        return "absurd_length", f"turn {i} has {len(content):,} characters (limit {MAX_CHARS_PER_MESSAGE:,})"
    return None


def row_to_conversation(
    obj: Any,
    source: str,
    line: int,
    raw: str,
    fmt: str = "auto",
    role_map: dict[str, str] | None = None,
    user_name: str = "User",
) -> Conversation | Rejection:
    """One parsed row (OpenAI, ShareGPT or PIPPA shape) as a Conversation, or why not."""

    def reject(reason: str, detail: str) -> Rejection:
        return Rejection(source=source, line=line, reason=reason, detail=detail, row=_preview(raw))

    if not isinstance(obj, dict):
        return reject("not_an_object", f"expected a JSON object per row, got {type(obj).__name__}")
    kind = detect_format(obj) if fmt not in ROW_SHAPES else fmt
    if kind is None:
        return reject(
            "unknown_format",
            f"no `messages`, `conversations` or PIPPA `conversation` key (keys: {', '.join(sorted(obj)) or 'none'})",
        )
    if kind == "pippa":
        return pippa_to_conversation(obj, source, line, raw, user_name)
    key, role_key, content_key = ("messages", "role", "content") if kind == "openai" else ("conversations", "from", "value")
    turns = obj.get(key)
    if not isinstance(turns, list):
        return reject("missing_messages", f"`{key}` must be a list of turns")
    if not turns:
        return reject("empty_conversation", f"`{key}` is empty")
    aliases = role_aliases(role_map)
    messages: list[Message] = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            return reject("bad_message", f"turn {i} is {type(turn).__name__}, not an object")
        raw_role = turn.get(role_key)
        if not isinstance(raw_role, str):
            return reject("bad_message", f"turn {i} has no `{role_key}` string")
        role = aliases.get(raw_role.strip().lower())
        if role not in ROLES:
            return reject(
                "unknown_role",
                f"turn {i} role `{raw_role}` is not one of system/user/assistant or a known alias; "
                "map it in the recipe (data.sources[].role_map)",
            )
        content = _message_text(turn.get(content_key))
        if content is None:
            got = type(turn.get(content_key)).__name__
            return reject("bad_message", f"turn {i} `{content_key}` is {got}, not a string (or a list of text parts)")
        problem = _check_content(i, role, content)
        if problem:
            return reject(*problem)
        messages.append(Message(role=role, content=content))
    system = obj.get("system") if kind == "sharegpt" else None
    if isinstance(system, str) and system.strip() and messages[0].role != "system":
        messages.insert(0, Message("system", system))  # LLaMA-Factory style ShareGPT keeps it beside the turns
    if not any(m.role == "assistant" for m in messages):
        return reject("no_assistant_turn", "the conversation has no assistant turn to learn from")
    return Conversation(messages=messages, source=source, line=line, meta={"format": kind})


def pippa_to_conversation(obj: dict, source: str, line: int, raw: str, user_name: str = "User") -> Conversation | Rejection:
    """A PIPPA record: system turn from the bot's description and definitions, `is_human` -> user.

    The bot's greeting opens the chat unless the conversation already opens with the bot
    (PIPPA logs usually do). `{{random_user_N}}` in definitions is PIPPA's stand-in for users.
    """

    def reject(reason: str, detail: str) -> Rejection:
        return Rejection(source=source, line=line, reason=reason, detail=detail, row=_preview(raw))

    turns = obj.get("conversation")
    if not isinstance(turns, list):
        return reject("missing_messages", "PIPPA record has no `conversation` list of {message, is_human} turns")
    if not turns:
        return reject("empty_conversation", "`conversation` is empty")
    name = obj.get("bot_name")
    if not isinstance(name, str) or not name.strip():
        return reject("missing_bot_name", "PIPPA record has no `bot_name`; the system turn names the character by it")
    texts = {k: "" if obj.get(k) is None else obj[k] for k in ("bot_description", "bot_definitions", "bot_greeting")}
    for key, value in texts.items():
        if not isinstance(value, str):
            return reject("bad_message", f"`{key}` is {type(value).__name__}, not a string")
    messages: list[Message] = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("is_human"), bool):
            return reject("bad_message", f"turn {i} is not an object with a boolean `is_human`")
        role = "user" if turn["is_human"] else "assistant"
        content = turn.get("message")
        if not isinstance(content, str):
            return reject("bad_message", f"turn {i} `message` is {type(content).__name__}, not a string")
        problem = _check_content(i, role, content)
        if problem:
            return reject(*problem)
        messages.append(Message(role, content))
    if not any(m.role == "assistant" for m in messages):
        return reject("no_assistant_turn", "the conversation has no bot turn to learn from")
    definitions = _PIPPA_RANDOM_USER.sub(user_name, texts["bot_definitions"])
    card = CharacterCard(name=name.strip(), description="\n\n".join(
        t.strip() for t in (texts["bot_description"], definitions) if t.strip()), source=source)
    greeting = substitute_placeholders(texts["bot_greeting"].strip(), card.name, user_name)
    if greeting and messages[0].role != "assistant":
        messages.insert(0, Message("assistant", greeting))
    system = Message("system", card_system_prompt(card, user_name))
    return Conversation([system, *messages], source, line, {"character": card.name, "kind": "pippa", "format": "pippa"})


# ---------------------------------------------------------------------------------------------
# Containers: rows out of JSONL, JSON, Parquet and save_to_disk datasets


def _jsonl_rows(path: Path) -> Iterator[Row]:
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


class _Unreadable(Exception):
    """A whole file that cannot be read as its container; becomes a Rejection at line 0."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def _row_error(source: str, line: int, raw: str, exc: Exception) -> Rejection:
    if isinstance(exc, _Unreadable):
        return Rejection(source, line, exc.reason, exc.detail, "")
    if isinstance(exc, UnicodeDecodeError):
        return Rejection(source, line, "non_utf8", f"the line is not UTF-8: {exc}", _preview(raw))
    if isinstance(exc, json.JSONDecodeError):
        return Rejection(source, line, "bad_json", f"not valid JSON: {exc.msg} at column {exc.colno}", _preview(raw))
    return Rejection(source, line, "unreadable", f"{type(exc).__name__}: {exc}", _preview(raw))


def _without_nulls(row: dict) -> dict:
    """A columnar row without its null columns: a table mixing OpenAI and ShareGPT rows gives
    every row both `messages` and `conversations`, one of them null."""
    return {k: v for k, v in row.items() if v is not None}


def _parquet_rows(path: Path) -> Iterator[Row]:
    """Parquet rows as dicts, numbered from 1 in file order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        yield 0, "", _Unreadable("bad_parquet", f"not a readable Parquet file ({exc}); check the file or its format")
        return
    n = 0
    for batch in table.iter_batches(batch_size=1024):
        for obj in batch.to_pylist():
            n += 1
            row = _without_nulls(obj)
            yield n, _dump(row), row


def is_saved_dataset(path: Path) -> bool:
    """A directory written by `datasets` `save_to_disk` (a Dataset or a DatasetDict)."""
    return path.is_dir() and any((path / marker).is_file() for marker in DATASET_MARKERS)


def _hf_dataset_rows(path: Path) -> Iterator[tuple[str, int, str, Any]]:
    """(source, row number, raw, row) of a save_to_disk dataset; a DatasetDict split by split,
    each split's rows sourced to its own directory (`path/<split>`), where they live on disk."""
    from datasets import DatasetDict, load_from_disk

    try:
        ds = load_from_disk(str(path))
    except (FileNotFoundError, ValueError, OSError) as exc:
        yield str(path), 0, "", _Unreadable("bad_dataset", f"not a dataset written by `datasets` save_to_disk ({exc})")
        return
    splits = list(ds.items()) if isinstance(ds, DatasetDict) else [(None, ds)]
    for split, dataset in splits:
        source = str(path / split) if split else str(path)
        for n, obj in enumerate(dataset, start=1):
            row = _without_nulls(obj)
            yield source, n, _dump(row), row


def _json_file_rows(path: Path) -> tuple[list[Row], Rejection | None]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return [], Rejection(str(path), 0, "bad_json", f"the file is not valid JSON: {exc}", "")
    records = data if isinstance(data, list) else [data]
    return [(i, _dump(obj), obj) for i, obj in enumerate(records, start=1)], None


# ---------------------------------------------------------------------------------------------
# SillyTavern chat exports


def _is_sillytavern_row(obj: Any) -> bool:
    return isinstance(obj, dict) and (
        ("user_name" in obj and "character_name" in obj) or ("mes" in obj and "is_user" in obj)
    )


def _whole_chat_rejected(reason: str, detail: str, source: str, line: int, raw: str) -> Rejection:
    return Rejection(source, line, reason, f"{detail} (the whole SillyTavern chat is left out)", _preview(raw))


def read_sillytavern_chat(path: Path, role_map: dict[str, str] | None = None) -> Conversation | Rejection:
    """A SillyTavern chat export (one file) as one conversation, or one Rejection.

    `is_user` decides user/assistant unless `role_map` names the speaker (e.g. a narrator
    in a group chat). Messages marked `is_system` are hidden in SillyTavern and never reach
    its prompt, so they are left out too (counted in `meta["hidden_messages"]`). The
    header's `user_name` goes to `meta["user_name"]`; a message's `swipes` and `swipe_id` go to
    `meta["swipes"][message index]` with its line (llmtune.data.pairs reads them as preference
    pairs). A broken line rejects the whole chat
    at that line: a chat with a message missing would teach replies to a context that
    never happened.
    """
    source = str(path)
    names = {k.strip().lower(): v for k, v in (role_map or {}).items()}
    messages: list[Message] = []
    meta: dict[str, Any] = {"kind": "sillytavern", "hidden_messages": 0}
    first_line = 0
    for lineno, raw, obj in _jsonl_rows(path):
        first_line = first_line or lineno
        if isinstance(obj, Exception):
            bad = _row_error(source, lineno, raw, obj)
            return _whole_chat_rejected(bad.reason, bad.detail, source, lineno, raw)
        if not isinstance(obj, dict):
            problem = ("not_an_object", f"expected a JSON object per line, got {type(obj).__name__}")
            return _whole_chat_rejected(*problem, source, lineno, raw)
        if "mes" not in obj and ("user_name" in obj or "character_name" in obj):
            meta.update({k: obj[k] for k in ("user_name", "character_name") if isinstance(obj.get(k), str)})
            continue
        if obj.get("is_system") is True:
            meta["hidden_messages"] += 1
            continue
        if not isinstance(obj.get("mes"), str) or not isinstance(obj.get("is_user"), bool):
            problem = ("bad_message", "a message line needs a string `mes` and a boolean `is_user`")
            return _whole_chat_rejected(*problem, source, lineno, raw)
        speaker = obj.get("name") if isinstance(obj.get("name"), str) else ""
        role = names.get(speaker.strip().lower()) or ("user" if obj["is_user"] else "assistant")
        content_problem = _check_content(len(messages), role, obj["mes"])
        if content_problem:
            return _whole_chat_rejected(*content_problem, source, lineno, raw)
        if "swipes" in obj:  # the alternatives the user swiped through; preference data (llmtune.data.pairs)
            meta.setdefault("swipes", {})[len(messages)] = (lineno, obj.get("swipes"), obj.get("swipe_id"), _preview(raw))
        messages.append(Message(role, obj["mes"]))
    if not messages:
        return Rejection(source, first_line, "empty_conversation", "the SillyTavern chat has no messages", "")
    if not any(m.role == "assistant" for m in messages):
        return Rejection(source, first_line, "no_assistant_turn", "the SillyTavern chat has no character turn", "")
    return Conversation(messages, source, first_line, {**meta, "format": "sillytavern"})


# ---------------------------------------------------------------------------------------------
# Dispatch


def resolve_file_format(path: Path, fmt: str = "auto") -> str:
    """What to read `path` as: card, sillytavern, parquet, hf_dataset, directory, json or jsonl.

    An explicit container/whole-file format wins; otherwise the extension and, for JSON and
    JSONL, the first record's shape decide (row shapes are still detected per row).
    """
    if fmt in ("card", "sillytavern", "parquet", "hf_dataset"):
        return fmt
    if path.is_dir():
        return "hf_dataset" if is_saved_dataset(path) else "directory"
    suffix = path.suffix.lower()
    if suffix == ".png":
        return "card"
    if suffix == ".parquet":
        return "parquet"
    if suffix == ".json" and fmt == "auto":
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return "json"  # reported as bad_json when read
        is_card = isinstance(obj, dict) and (
            str(obj.get("spec", "")).startswith("chara_card") or ("first_mes" in obj and "name" in obj)
        )
        return "card" if is_card else "json"
    first = next((obj for _, _, obj in _jsonl_rows(path)), None)
    return "sillytavern" if fmt == "auto" and _is_sillytavern_row(first) else "jsonl"


def _chat_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.suffix.lower() in CHAT_FILE_SUFFIXES)


def _read_rows(path: Path, kind: str, fmt: str, role_map: dict[str, str] | None, user_name: str
               ) -> Iterator[Conversation | Rejection]:
    """Rows of one container (not a card) as conversations; role shape per row unless forced."""
    source = str(path)
    shape = fmt if fmt in ROW_SHAPES else "auto"
    if kind == "sillytavern":
        for file in _chat_files(path) if path.is_dir() else [path]:
            yield read_sillytavern_chat(file, role_map)
        return
    if kind == "directory":
        files = _chat_files(path)
        if not files:
            raise DataError(f"{path}: the directory holds no {'/'.join(CHAT_FILE_SUFFIXES)} files and is not a saved dataset")
        for file in files:
            yield from _read_rows(file, resolve_file_format(file, fmt), fmt, role_map, user_name)
        return
    if kind == "hf_dataset":
        for src, n, raw, obj in _hf_dataset_rows(path):
            if isinstance(obj, Exception):
                yield _row_error(src, n, raw, obj)
            else:
                yield row_to_conversation(obj, src, n, raw, shape, role_map, user_name)
        return
    if kind == "json":
        rows, error = _json_file_rows(path)
        if error:
            yield error
    else:
        rows = _parquet_rows(path) if kind == "parquet" else _jsonl_rows(path)
    for n, raw, obj in rows:
        if isinstance(obj, Exception):
            yield _row_error(source, n, raw, obj)
        else:
            yield row_to_conversation(obj, source, n, raw, shape, role_map, user_name)


def read_card_source(path: Path, user_name: str = "User", greeting: GreetingMode = "first") -> Iterator[Conversation | Rejection]:
    """A card on its own: its example dialogues (and greetings with `greeting: all`); see
    llmtune.data.cards.card_conversations. An unreadable card is one Rejection with its reason."""
    try:
        card = load_card(path)
    except CardError as exc:
        yield exc.to_rejection()
        return
    yield from card_conversations(card, user_name, greeting)


def read_source(
    path: Path,
    fmt: str = "auto",
    role_map: dict[str, str] | None = None,
    *,
    card: Path | CharacterCard | None = None,
    user_name: str = "User",
    greeting: GreetingMode = "first",
) -> Iterator[Conversation | Rejection]:
    """Every row of one file or directory, as a Conversation or a Rejection (source, line, reason).

    With `card`, every conversation gets the card as its system turn and the card's greeting
    as its first reply (llmtune.data.cards.attach_card). A card that cannot be read then
    stops with a DataError rather than training the logs without their character.
    """
    path = Path(path)
    kind = resolve_file_format(path, fmt)
    if kind == "card":
        if card is not None:
            raise DataError(f"{path} is read as a card, and a second card ({card}) was given; "
                            "point `path` at chat logs, or leave `card` out")
        yield from read_card_source(path, user_name, greeting)
        return
    if isinstance(card, Path):
        try:
            card = load_card(card)
        except CardError as exc:
            raise DataError(f"data.sources[].card {exc.source}: {exc.detail} ({exc.reason}); "
                            f"fix the card, or remove `card:` to train {path} without it") from None
    for item in _read_rows(path, kind, fmt, role_map, user_name):
        yield attach_card(item, card, user_name) if card is not None and isinstance(item, Conversation) else item


def read_data_source(source: DataSource, resolve: Callable[[str], Path] = Path) -> Iterator[Conversation | Rejection]:
    """Every row of one recipe source (data.sources[]): chat files, a card, or both.

    `resolve` turns recipe paths into files (prepare passes Recipe.resolve_path). Quotas
    (`weight`, `max_samples`) are not applied here: see apply_source_quota.
    """
    for key in ("path", "card"):
        value = getattr(source, key)
        if value is not None and not resolve(value).exists():
            raise DataError(f"data.sources: {key} not found: {value} (resolved to {resolve(value)})")
    card = resolve(source.card) if source.card else None
    if source.path is None:
        assert card is not None  # DataSource validates that one of path/card is set
        yield from read_card_source(card, source.user_name, source.greeting)
        return
    yield from read_source(resolve(source.path), source.format, source.role_map, card=card,
                           user_name=source.user_name, greeting=source.greeting)


# ---------------------------------------------------------------------------------------------
# Per-source quotas


def _quota_rank(conv: Conversation, seed: int) -> str:
    return hashlib.sha256(f"{seed}\0{conv.content_hash}".encode()).hexdigest()


def apply_source_quota(
    convs: Iterable[Conversation], weight: float | None = None, max_samples: int | None = None, seed: int = 0
) -> tuple[list[Conversation], list[Conversation]]:
    """Scale one source's share of the mix: returns (kept, left_out).

    `weight` repeats or sub-samples: 2.0 keeps every conversation twice, 2.5 twice plus a
    third copy of half of them, 0.5 keeps half. Which ones get the extra copy, or stay,
    is decided by a hash of (seed, content), so the choice is deterministic, independent of
    file order, and the same conversation is chosen in every run with that seed.
    `max_samples` then caps the total, dropping second copies before any first copy.
    Copies carry `meta["copy"]` = 1, 2, ... and share the original's content hash, so they
    land in the same split; run this after dedup, or dedup will count copies as duplicates.
    `left_out` holds each conversation kept zero times, for the report's counts.
    """
    if weight is not None and weight <= 0:
        raise ValueError(f"weight must be > 0, got {weight}")
    if max_samples is not None and max_samples < 0:
        raise ValueError(f"max_samples must be >= 0, got {max_samples}")
    convs = list(convs)
    whole, fraction = divmod(1.0 if weight is None else weight, 1.0)
    ranked = sorted(range(len(convs)), key=lambda i: (_quota_rank(convs[i], seed), i))
    copies = [int(whole)] * len(convs)
    for i in ranked[: int(fraction * len(convs) + 0.5)]:
        copies[i] += 1
    if max_samples is not None:
        slots = [(c, i) for c in range(max(copies, default=0)) for i in ranked if copies[i] > c][:max_samples]
        copies = [0] * len(convs)
        for _, i in slots:
            copies[i] += 1
    kept: list[Conversation] = []
    for conv, n in zip(convs, copies):
        kept += [conv if c == 0 else Conversation(conv.messages, conv.source, conv.line, {**conv.meta, "copy": c})
                 for c in range(n)]
    return kept, [conv for conv, n in zip(convs, copies) if n == 0]
