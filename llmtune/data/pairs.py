"""Preference sources -> PreferenceExample. Every row becomes examples or one Rejection.

Row shapes (JSONL, JSON arrays, Parquet, `datasets` folders; detected per row under `auto`):

- a pair, in TRL's preference format: `chosen` and `rejected`, each one assistant message (a
  list of one `{"role": "assistant", "content": ...}`, or a string), after a `prompt` (a list of
  messages, or a string for one user turn) or `messages` (the same list, as llmtune's chats
  name it). Without a prompt, `chosen` and `rejected` are whole conversations and the prompt is
  their common beginning (TRL's implicit prompt). Extra keys (ids, scores, timestamps) are
  ignored; this is also what the review page exports as pairs.
- a KTO row: a `prompt` and one `completion` with a boolean `label` (true: desirable), as
  TRL's unpaired preference format and the review page's KTO export have it.

Whole files: a SillyTavern chat export yields, for every character message with swipes, one
pair per swiped-away alternative: the kept message (`mes`, `swipes[swipe_id]`) is chosen, the
alternative rejected, and the chat up to that message is the prompt.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmtune.data.cards import CardError, CharacterCard, attach_card, card_system_prompt, load_card
from llmtune.data.formats import (
    _check_content,
    _chat_files,
    _dump,
    _hf_dataset_rows,
    _json_file_rows,
    _jsonl_rows,
    _message_text,
    _parquet_rows,
    _preview,
    _row_error,
    read_sillytavern_chat,
    resolve_file_format,
    role_aliases,
)
from llmtune.data.types import ROLES, Conversation, Message, PreferenceExample, Rejection
from llmtune.errors import DataError

if TYPE_CHECKING:
    from llmtune.config import PreferenceSource

ROW_KINDS = ("pairs", "kto")


class _Bad(Exception):
    """A row that cannot become a preference example: (reason, detail)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def detect_row_kind(obj: Any) -> str | None:
    """`pairs` for a row with chosen/rejected, `kto` for a completion with a label, else None."""
    if isinstance(obj, dict):
        if "chosen" in obj or "rejected" in obj:
            return "pairs"
        if "completion" in obj or "label" in obj:
            return "kto"
    return None


def _messages(value: Any, key: str, aliases: dict[str, str]) -> list[Message]:
    """A message list (role/content or ShareGPT from/value), or a string as one user turn."""
    if isinstance(value, str):
        if not value.strip():
            raise _Bad("empty_content", f"`{key}` is an empty string")
        return [Message("user", value)]
    if not isinstance(value, list):
        raise _Bad("bad_message", f"`{key}` is {type(value).__name__}, not a list of messages or a string")
    out = []
    for i, turn in enumerate(value):
        if not isinstance(turn, dict):
            raise _Bad("bad_message", f"`{key}` turn {i} is {type(turn).__name__}, not an object")
        raw_role = turn.get("role", turn.get("from"))
        if not isinstance(raw_role, str):
            raise _Bad("bad_message", f"`{key}` turn {i} has no `role` string")
        role = aliases.get(raw_role.strip().lower())
        if role not in ROLES:
            raise _Bad("unknown_role", f"`{key}` turn {i} role `{raw_role}` is not system/user/assistant or a known "
                                       "alias; map it in the recipe (preference.sources[].role_map)")
        content = _message_text(turn.get("content", turn.get("value")))
        if content is None:
            raise _Bad("bad_message", f"`{key}` turn {i} content is not a string (or a list of text parts)")
        problem = _check_content(i, role, content)
        if problem:
            raise _Bad(problem[0], f"`{key}`: {problem[1]}")
        out.append(Message(role, content))
    return out


def _reply(value: Any, key: str, aliases: dict[str, str]) -> str:
    """A completion: one assistant message (a list of one, or a string)."""
    if isinstance(value, str):
        problem = _check_content(0, "assistant", value)
        if problem:
            raise _Bad(problem[0], f"`{key}`: {problem[1]}")
        return value
    turns = _messages(value, key, aliases)
    if len(turns) != 1 or turns[0].role != "assistant":
        roles = "/".join(m.role for m in turns) or "nothing"
        raise _Bad("bad_pair", f"`{key}` must be one assistant message, got {roles}; put the turns before it in `prompt`")
    return turns[0].content


def _implicit_prompt(chosen: list[Message], rejected: list[Message]) -> tuple[list[Message], str, str]:
    """TRL's implicit prompt: the common beginning of two whole conversations; each must then end in
    one assistant reply."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    rest_c, rest_r = chosen[n:], rejected[n:]
    for key, rest in (("chosen", rest_c), ("rejected", rest_r)):
        if len(rest) != 1 or rest[0].role != "assistant":
            raise _Bad("bad_pair", f"without a `prompt`, `chosen` and `rejected` must be the same conversation up to one "
                                   f"final assistant reply; `{key}` differs in {len(rest)} message(s) after the common start")
    return chosen[:n], rest_c[0].content, rest_r[0].content


def row_to_example(obj: Any, source: str, line: int, raw: str, kind: str = "auto",
                   role_map: dict[str, str] | None = None) -> PreferenceExample | Rejection:
    """One parsed row (a pair or a KTO row) as a PreferenceExample, or why not."""
    try:
        if not isinstance(obj, dict):
            raise _Bad("not_an_object", f"expected a JSON object per row, got {type(obj).__name__}")
        found = detect_row_kind(obj)
        if found is None:
            raise _Bad("unknown_format", "a preference row needs `chosen` and `rejected` (a pair) or `completion` and "
                                         f"`label` (a KTO row); keys: {', '.join(sorted(obj)) or 'none'}")
        if kind in ROW_KINDS and found != kind:
            raise _Bad("unknown_format", f"format: {kind} was set for this source, but the row is a "
                                         f"{'pair' if found == 'pairs' else 'KTO row'}")
        aliases = role_aliases(role_map)
        prompt_key = "prompt" if "prompt" in obj else "messages" if "messages" in obj else None
        prompt = _messages(obj[prompt_key], prompt_key, aliases) if prompt_key else None
        if found == "pairs":
            if "chosen" not in obj or "rejected" not in obj:
                missing = "rejected" if "chosen" in obj else "chosen"
                raise _Bad("bad_pair", f"a pair needs both `chosen` and `rejected`; `{missing}` is missing "
                                       "(a row with one reply and a `label` is a KTO row)")
            if prompt is None:
                if not all(isinstance(obj[k], list) for k in ("chosen", "rejected")):
                    raise _Bad("bad_pair", "without a `prompt`, `chosen` and `rejected` must be whole conversations")
                prompt, chosen, rejected = _implicit_prompt(_messages(obj["chosen"], "chosen", aliases),
                                                            _messages(obj["rejected"], "rejected", aliases))
            else:
                chosen, rejected = _reply(obj["chosen"], "chosen", aliases), _reply(obj["rejected"], "rejected", aliases)
            if chosen.strip() == rejected.strip():
                raise _Bad("same_reply", "`chosen` and `rejected` are the same reply; the pair teaches nothing")
            meta = {"format": "pair"}
        else:
            if "completion" not in obj or not isinstance(obj.get("label"), bool):
                raise _Bad("bad_kto_row", "a KTO row needs a `completion` and a boolean `label` (true: desirable)")
            if prompt is None:
                raise _Bad("empty_prompt", "a KTO row needs a `prompt` (the conversation the completion answers)")
            reply = _reply(obj["completion"], "completion", aliases)
            chosen, rejected = (reply, None) if obj["label"] else (None, reply)
            meta = {"format": "kto"}
        if not prompt:
            raise _Bad("empty_prompt", "the prompt has no message; a reply needs a conversation to answer")
        return PreferenceExample(prompt, chosen, rejected, source, line, meta)
    except _Bad as bad:
        return Rejection(source, line, bad.reason, bad.detail, _preview(raw))


def swipe_pairs(conv: Conversation | Rejection, offset: int = 0) -> Iterator[PreferenceExample | Rejection]:
    """A SillyTavern chat's pairs: each kept character message against each alternative swiped away.

    `offset` is how far a card (attach_card) moved the messages: meta["swipes"] is indexed by the
    message's position in the export."""
    if isinstance(conv, Rejection):
        yield conv
        return
    for index, (line, swipes, swipe_id, raw) in sorted(conv.meta.get("swipes", {}).items()):
        i = index + offset
        kept = conv.messages[i]
        if kept.role != "assistant":
            continue  # only character messages are swiped for; a user line's swipes are not a judgment
        if not (isinstance(swipes, list) and all(isinstance(s, str) for s in swipes)
                and isinstance(swipe_id, int) and not isinstance(swipe_id, bool) and 0 <= swipe_id < len(swipes)):
            yield Rejection(conv.source, line, "bad_swipes",
                            "`swipes` must be a list of strings and `swipe_id` the index of the kept one", raw)
            continue
        prompt = conv.messages[:i]
        alternatives = [s for j, s in enumerate(swipes) if j != swipe_id and s.strip() and s.strip() != kept.content.strip()]
        for alternative in alternatives:
            if not prompt:
                yield Rejection(conv.source, line, "empty_prompt",
                                "a swiped greeting with nothing before it; give the source a `card:` or `system:` so "
                                "the pair has the character's system prompt as its prompt", raw)
                continue
            problem = _check_content(i, "assistant", alternative)
            if problem:
                yield Rejection(conv.source, line, problem[0], f"a swipe: {problem[1]}", raw)
                continue
            yield PreferenceExample(list(prompt), kept.content, alternative, conv.source, line,
                                    {"format": "sillytavern", "message": index})


def _with_system(example: PreferenceExample | Rejection, card: CharacterCard | None, system: str | None,
                 user_name: str):
    """The source's system prompt (its card's, or `system`) before a prompt that has none."""
    if (card is None and system is None) or isinstance(example, Rejection) or example.prompt[0].role == "system":
        return example
    example.prompt.insert(0, Message("system", card_system_prompt(card, user_name) if card else system))
    if card is not None:
        example.meta["card"] = card.name
    return example


def _sillytavern_examples(path: Path, role_map, card: CharacterCard | None, system: str | None, user_name: str):
    for file in _chat_files(path) if path.is_dir() else [path]:
        conv = read_sillytavern_chat(file, role_map)
        offset = 0
        if isinstance(conv, Conversation) and card is not None:
            leading = next((i for i, m in enumerate(conv.messages) if m.role != "system"), len(conv.messages))
            carded = attach_card(conv, card, user_name)
            # attach_card replaced the `leading` system messages with one system turn (and maybe a greeting).
            offset = len(carded.messages) - len(conv.messages)
            carded.meta["swipes"] = {k: v for k, v in conv.meta.get("swipes", {}).items() if k >= leading}
            conv = carded
        elif isinstance(conv, Conversation) and system is not None and conv.messages[0].role != "system":
            conv = Conversation([Message("system", system), *conv.messages], conv.source, conv.line, conv.meta)
            offset = 1
        yield from swipe_pairs(conv, offset)


def read_preference_file(path: Path, kind: str = "auto", role_map: dict[str, str] | None = None,
                         card: CharacterCard | None = None, user_name: str = "User", system: str | None = None
                         ) -> Iterator[PreferenceExample | Rejection]:
    """Every row of one preference file or directory as PreferenceExamples or Rejections."""
    path = Path(path)
    container = resolve_file_format(path, "sillytavern" if kind == "sillytavern" else "auto")
    if container == "sillytavern":
        yield from _sillytavern_examples(path, role_map, card, system, user_name)
        return
    if container == "card":
        yield Rejection(str(path), 0, "unknown_format",
                        "a character card holds no preference judgments; name it as the source's `card:` instead", "")
        return
    if container == "directory":
        files = _chat_files(path)
        if not files:
            raise DataError(f"{path}: the directory holds no .jsonl/.json/.parquet files and is not a saved dataset")
        for file in files:
            yield from read_preference_file(file, kind, role_map, card, user_name, system)
        return
    if container == "hf_dataset":
        rows = ((src, n, raw, obj) for src, n, raw, obj in _hf_dataset_rows(path))
    else:
        if container == "json":
            found, error = _json_file_rows(path)
            if error:
                yield error
        else:
            found = _parquet_rows(path) if container == "parquet" else _jsonl_rows(path)
        rows = ((str(path), n, raw, obj) for n, raw, obj in found)
    for source, n, raw, obj in rows:
        if isinstance(obj, Exception):
            yield _row_error(source, n, raw, obj)
        else:
            yield _with_system(row_to_example(obj, source, n, raw or _dump(obj), kind, role_map), card, system, user_name)


def read_preference_source(source: PreferenceSource, resolve: Callable[[str], Path] = Path
                           ) -> Iterator[PreferenceExample | Rejection]:
    """Every row of one recipe preference source (preference.sources[])."""
    path = resolve(source.path)
    if not path.exists():
        raise DataError(f"preference.sources: path not found: {source.path} (resolved to {path})")
    card = None
    if source.card:
        try:
            card = load_card(resolve(source.card))
        except CardError as exc:
            raise DataError(f"preference.sources[].card {exc.source}: {exc.detail} ({exc.reason}); fix the card or "
                            "remove `card:`") from None
    yield from read_preference_file(path, source.format, source.role_map, card, source.user_name, source.system)
