"""Character cards -> system turn, greetings and example dialogues, as the one Conversation type.

Reads the cards people share: Character Card V2 (`spec: chara_card_v2`), V3 (`chara_card_v3`)
and V1 (the older flat layout), as JSON or embedded in a PNG (tEXt/zTXt/iTXt chunk `ccv3`
for V3, `chara` for V2, each base64 JSON; `ccv3` wins when both exist, as in SillyTavern).

The system turn is built the way chat front ends build it, so a model trained on it meets
the same prompt when served:

    <system prompt>          the card's `system_prompt`, with `{{original}}` replaced by
                             DEFAULT_SYSTEM_PROMPT; DEFAULT_SYSTEM_PROMPT when it has none
    <description>
    <name>'s personality: <personality>
    Scenario: <scenario>
    Example dialogue 1: ...  each `<START>` block of `mes_example`, one after the other
    <post_history_instructions>   the final note (front ends send it after the chat; we keep it
                             in the system turn because many chat templates refuse a system
                             message in mid-conversation)

`{{char}}`/`<BOT>` become the card's name and `{{user}}`/`<USER>` the user's name, in any case.
`creator_notes` are notes for people browsing cards: they are never read into a
CharacterCard, so they cannot reach a prompt.

Also a small tool: `python -m llmtune.data.cards --embed card.json card.png` writes a PNG
carrying the card as V2 `chara` and V3 `ccv3` chunks; `--extract card.png` prints its JSON.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import re
import struct
import sys
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from llmtune.data.types import Conversation, Message, Rejection
from llmtune.errors import DataError

DEFAULT_SYSTEM_PROMPT = "Write {{char}}'s next reply in a fictional roleplay chat between {{char}} and {{user}}."
CARD_SPECS = ("chara_card_v2", "chara_card_v3")
CARD_CHUNK_PREFERENCE = ("ccv3", "chara")  # V3 first, as SillyTavern reads them
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_TEXT_CHUNKS = (b"tEXt", b"zTXt", b"iTXt")
TEXT_FIELDS = ("description", "personality", "scenario", "first_mes", "mes_example", "system_prompt",
               "post_history_instructions")

_CHAR = re.compile(r"\{\{\s*char\s*\}\}|<bot>", re.IGNORECASE)
_USER = re.compile(r"\{\{\s*user\s*\}\}|<user>", re.IGNORECASE)
_ORIGINAL = re.compile(r"\{\{\s*original\s*\}\}", re.IGNORECASE)
_START = re.compile(r"<start>", re.IGNORECASE)

GreetingMode = Literal["first", "all"]


class CardError(DataError):
    """A card that cannot be read. `reason` is the quarantine reason code."""

    def __init__(self, source: str, reason: str, detail: str) -> None:
        super().__init__(f"{source}: {detail}")
        self.source, self.reason, self.detail = source, reason, detail

    def to_rejection(self) -> Rejection:
        return Rejection(source=self.source, line=0, reason=self.reason, detail=self.detail, row="")


@dataclass(frozen=True)
class CharacterCard:
    """The prompt-relevant part of a card. Deliberately has no `creator_notes`."""

    name: str
    description: str = ""
    personality: str = ""
    scenario: str = ""
    first_mes: str = ""
    mes_example: str = ""
    system_prompt: str = ""
    post_history_instructions: str = ""
    alternate_greetings: tuple[str, ...] = ()
    spec: str = "chara_card_v2"
    source: str = ""


# ---------------------------------------------------------------------------------------------
# Reading cards: PNG chunks, base64, JSON layout


def read_png_text_chunks(data: bytes, source: str) -> dict[str, str]:
    """Every text chunk (tEXt, zTXt, iTXt) of a PNG as {lower-case keyword: text}; first one wins."""
    if not data.startswith(PNG_SIGNATURE):
        raise CardError(source, "card_bad_png", "not a PNG file (no PNG signature); export the card again as PNG or JSON")
    texts: dict[str, str] = {}
    pos = len(PNG_SIGNATURE)
    while pos < len(data):
        if pos + 8 > len(data):
            raise CardError(source, "card_bad_png", f"PNG is truncated at byte {pos} (incomplete chunk header)")
        length, ctype = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        crc_bytes = data[pos + 8 + length : pos + 12 + length]
        if len(body) != length or len(crc_bytes) != 4:
            raise CardError(source, "card_bad_png", f"PNG is truncated inside chunk {ctype!r} at byte {pos}")
        if zlib.crc32(ctype + body) != struct.unpack(">I", crc_bytes)[0]:
            raise CardError(source, "card_bad_png", f"PNG chunk {ctype!r} at byte {pos} fails its CRC check (corrupt file)")
        if ctype in PNG_TEXT_CHUNKS:
            keyword, text = _decode_text_chunk(ctype, body, source)
            texts.setdefault(keyword.lower(), text)
        if ctype == b"IEND":
            break
        pos += 12 + length
    return texts


def _decode_text_chunk(ctype: bytes, body: bytes, source: str) -> tuple[str, str]:
    keyword, sep, rest = body.partition(b"\0")
    if not sep:
        raise CardError(source, "card_bad_png", f"PNG {ctype.decode()} chunk has no keyword separator")
    try:
        if ctype == b"tEXt":
            return keyword.decode("latin-1"), rest.decode("latin-1")
        if ctype == b"zTXt":  # one byte compression method (0 = zlib), then compressed latin-1 text
            return keyword.decode("latin-1"), zlib.decompress(rest[1:]).decode("latin-1")
        # iTXt: compression flag, method, language tag\0, translated keyword\0, UTF-8 text
        flag, rest = rest[0], rest[2:]
        _lang, _, rest = rest.partition(b"\0")
        _translated, _, text = rest.partition(b"\0")
        return keyword.decode("latin-1"), (zlib.decompress(text) if flag else text).decode("utf-8")
    except (zlib.error, UnicodeDecodeError, IndexError) as exc:
        raise CardError(source, "card_bad_png", f"PNG {ctype.decode()} chunk `{keyword.decode('latin-1')}` "
                                                f"cannot be decoded: {exc}") from None


def decode_card_chunk(value: str, keyword: str, source: str) -> Any:
    """A card chunk's value: base64 of UTF-8 JSON. Whitespace and missing padding are tolerated."""
    compact = "".join(value.split())
    try:
        raw = base64.b64decode(compact + "=" * (-len(compact) % 4), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise CardError(source, "card_bad_base64",
                        f"the `{keyword}` chunk is not valid base64 ({exc}); re-export the card from its editor") from None
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CardError(source, "card_bad_json", f"the `{keyword}` chunk decodes to bytes that are not UTF-8 JSON: {exc}") from None


def card_json_from_png(data: bytes, source: str) -> Any:
    """The card JSON inside a PNG, preferring the V3 `ccv3` chunk over the V2 `chara` chunk."""
    texts = read_png_text_chunks(data, source)
    for keyword in CARD_CHUNK_PREFERENCE:
        if keyword in texts:
            return decode_card_chunk(texts[keyword], keyword, source)
    found = ", ".join(sorted(texts)) or "none"
    raise CardError(source, "card_no_chunk",
                    f"the PNG has no `chara` or `ccv3` text chunk (text chunks: {found}); it is an image, not a "
                    "character card; export the card from its editor as PNG or JSON")


def _text_field(data: dict, key: str, source: str) -> str:
    value = data.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise CardError(source, "card_bad_field", f"card field `{key}` is {type(value).__name__}, not a string")
    return value


def parse_card(obj: Any, source: str) -> CharacterCard:
    """A card's JSON (V1 flat, V2 or V3 with `data`) as a CharacterCard."""
    if not isinstance(obj, dict):
        raise CardError(source, "card_bad_json", f"a card is a JSON object, got {type(obj).__name__}")
    spec = obj.get("spec")
    if spec in CARD_SPECS:
        data = obj.get("data")
        if not isinstance(data, dict):
            raise CardError(source, "card_missing_data",
                            f"`spec: {spec}` card has no `data` object; V2/V3 cards keep every field under `data`")
    elif spec is None and "name" in obj and any(k in obj for k in TEXT_FIELDS):
        data, spec = obj, "chara_card_v1"  # V1: the same fields at top level
    else:
        raise CardError(source, "card_unknown_spec",
                        f"`spec` is {spec!r}; expected one of {', '.join(CARD_SPECS)} (or a V1 card with `name`)")
    name = data.get("name")
    if not isinstance(name, str) or not name.strip():
        raise CardError(source, "card_missing_name", "the card has no `name`; every prompt refers to the character by it")
    greetings = data.get("alternate_greetings") or []
    if not isinstance(greetings, list) or not all(isinstance(g, str) for g in greetings):
        raise CardError(source, "card_bad_field", "`alternate_greetings` must be a list of strings")
    fields = {key: _text_field(data, key, source) for key in TEXT_FIELDS}
    return CharacterCard(name=name.strip(), alternate_greetings=tuple(g for g in greetings if g.strip()),
                         spec=str(spec), source=source, **fields)


def load_card(path: Path) -> CharacterCard:
    """A card file, PNG (by signature, whatever its suffix) or JSON. Raises CardError with a reason."""
    source = str(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CardError(source, "card_unreadable", f"cannot read the card file: {exc.strerror or exc}") from None
    if data.startswith(PNG_SIGNATURE) or path.suffix.lower() == ".png":
        return parse_card(card_json_from_png(data, source), source)
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CardError(source, "card_bad_json", f"the card file is not UTF-8 JSON: {exc}") from None
    return parse_card(obj, source)


# ---------------------------------------------------------------------------------------------
# Card -> prompt text


def substitute_placeholders(text: str, char_name: str, user_name: str) -> str:
    """`{{char}}`/`<BOT>` -> the card's name, `{{user}}`/`<USER>` -> the user's, in any case."""
    text = _CHAR.sub(lambda _: char_name, text)
    return _USER.sub(lambda _: user_name, text)


def split_example_blocks(mes_example: str) -> list[str]:
    """`mes_example` cut at each `<START>` marker; empty blocks dropped (they hold nothing)."""
    return [block.strip() for block in _START.split(mes_example) if block.strip()]


def card_system_prompt(card: CharacterCard, user_name: str = "User", skip_example: int | None = None) -> str:
    """The card's system turn (layout in the module docstring).

    `skip_example` leaves one example block out: when that block is itself the training
    conversation, showing it in the prompt would teach copying instead of replying.
    """
    instruction = _ORIGINAL.sub(lambda _: DEFAULT_SYSTEM_PROMPT, card.system_prompt) if card.system_prompt.strip() \
        else DEFAULT_SYSTEM_PROMPT
    parts = [instruction.strip(), card.description.strip()]
    if card.personality.strip():
        parts.append(f"{card.name}'s personality: {card.personality.strip()}")
    if card.scenario.strip():
        parts.append(f"Scenario: {card.scenario.strip()}")
    blocks = [b for i, b in enumerate(split_example_blocks(card.mes_example)) if i != skip_example]
    parts += [f"Example dialogue {i}:\n{block}" for i, block in enumerate(blocks, start=1)]
    parts.append(card.post_history_instructions.strip())
    return substitute_placeholders("\n\n".join(p for p in parts if p), card.name, user_name)


def card_greetings(card: CharacterCard, user_name: str = "User") -> list[str]:
    """first_mes, then every alternate greeting, placeholders substituted."""
    raw = [card.first_mes, *card.alternate_greetings]
    return [substitute_placeholders(g.strip(), card.name, user_name) for g in raw if g.strip()]


def parse_example_block(block: str, card: CharacterCard, user_name: str) -> list[Message] | str:
    """One `<START>` block as user/assistant messages, or why it cannot be one.

    A line starting with `{{user}}:`, `<USER>:` or the user's name opens a user turn; with
    `{{char}}:`, `<BOT>:` or the card's name an assistant turn; other lines continue the turn.
    """
    user = rf"\{{\{{\s*user\s*\}}\}}|<user>|{re.escape(user_name)}"
    char = rf"\{{\{{\s*char\s*\}}\}}|<bot>|{re.escape(card.name)}"
    speaker = re.compile(rf"^\s*(?:(?P<user>{user})|(?P<char>{char}))\s*:\s?(?P<text>.*)$", re.IGNORECASE)
    turns: list[tuple[str, list[str]]] = []
    for line in block.splitlines():
        m = speaker.match(line)
        if m:
            turns.append(("user" if m.group("user") else "assistant", [m.group("text")]))
        elif turns:
            turns[-1][1].append(line)
        elif line.strip():
            return f"text before the first speaker line: {line.strip()[:80]!r} (lines start with {{{{user}}}}: or {{{{char}}}}:)"
    messages = [Message(role, substitute_placeholders("\n".join(lines).strip(), card.name, user_name))
                for role, lines in turns]
    if any(not m.content for m in messages):
        return "a speaker line with no text"
    roles = [m.role for m in messages]
    if "user" not in roles or "assistant" not in roles[roles.index("user"):]:
        return "no assistant reply after a user turn, so nothing to learn a reply from"
    return messages


# ---------------------------------------------------------------------------------------------
# Card -> conversations


def card_conversations(card: CharacterCard, user_name: str = "User", greeting: GreetingMode = "first"
                       ) -> Iterator[Conversation | Rejection]:
    """Training conversations from a card alone (no chat logs).

    A greeting on its own teaches no reply to a user, so what a card alone gives is its
    example dialogue: each `<START>` block becomes one conversation (card system turn with
    the *other* examples, then the block's turns). With `greeting: all` each greeting
    (first_mes and every alternate) is added as a [system, greeting] conversation, which
    teaches how to open a scene. Records are numbered examples first, then greetings;
    `meta["kind"]` says which. A card that yields nothing is one Rejection, so it is counted.
    """
    record = 0
    for i, block in enumerate(split_example_blocks(card.mes_example)):
        record += 1
        parsed = parse_example_block(block, card, user_name)
        if isinstance(parsed, str):
            yield Rejection(card.source, record, "bad_example", f"mes_example block {i + 1}: {parsed}", block[:300])
            continue
        system = Message("system", card_system_prompt(card, user_name, skip_example=i))
        yield Conversation([system, *parsed], card.source, record, {"card": card.name, "kind": "example", "example": i + 1, "format": "card"})
    if greeting == "all":
        system = Message("system", card_system_prompt(card, user_name))
        for j, text in enumerate(card_greetings(card, user_name)):
            record += 1
            yield Conversation([system, Message("assistant", text)], card.source, record,
                               {"card": card.name, "kind": "greeting", "greeting": j, "format": "card"})
    if record == 0:
        yield Rejection(card.source, 0, "card_nothing_to_train",
                        f"card `{card.name}` has no `<START>` example dialogue"
                        + (" and no greeting" if greeting == "all" else "")
                        + "; give it chat logs (data.sources[].path) or set data.sources[].greeting: all", "")


def attach_card(conv: Conversation, card: CharacterCard, user_name: str = "User") -> Conversation:
    """A chat log with the card as its system turn and the card's greeting as the first reply.

    The log's own leading system messages are replaced (kept in `meta["replaced_system"]`).
    A log that already opens with an assistant turn has its greeting (the card's, an
    alternate, or one the user edited); stacking first_mes on top would teach two openings.
    A log's own user name (SillyTavern's header, in `meta["user_name"]`) wins over the
    recipe's, because the log's messages already address the user by it.
    """
    user_name = conv.meta.get("user_name") or user_name
    body = list(conv.messages)
    replaced = []
    while body and body[0].role == "system":
        replaced.append(body.pop(0).content)
    greetings = card_greetings(card, user_name)
    if greetings and (not body or body[0].role != "assistant"):
        body.insert(0, Message("assistant", greetings[0]))
    meta = {"kind": "log", **conv.meta, "card": card.name, "format": f"{conv.meta.get('format', 'chat')}+card"}
    if replaced:
        meta["replaced_system"] = replaced
    return Conversation([Message("system", card_system_prompt(card, user_name)), *body], conv.source, conv.line, meta)


# ---------------------------------------------------------------------------------------------
# Writing card PNGs (team samples, tests, and users who keep cards as JSON)


def card_v3_from_v2(v2: dict) -> dict:
    """The same card as V3: V2's fields plus V3's required `group_only_greetings`."""
    data = {**v2.get("data", {}), "group_only_greetings": v2.get("data", {}).get("group_only_greetings", [])}
    return {"spec": "chara_card_v3", "spec_version": "3.0", "data": data}


def encode_card_chunk(card_json: dict) -> str:
    return base64.b64encode(json.dumps(card_json, ensure_ascii=False).encode("utf-8")).decode("ascii")


def _png_chunk(ctype: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + ctype + body + struct.pack(">I", zlib.crc32(ctype + body))


def solid_png(text_chunks: list[tuple[str, str]], size: int = 64, rgb: tuple[int, int, int] = (92, 124, 84)) -> bytes:
    """A size x size solid-colour RGB PNG carrying tEXt chunks (latin-1 keyword and text)."""
    header = struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    pixels = (b"\x00" + bytes(rgb) * size) * size  # filter byte 0 per row
    chunks = [_png_chunk(b"IHDR", header)]
    chunks += [_png_chunk(b"tEXt", k.encode("latin-1") + b"\0" + v.encode("latin-1")) for k, v in text_chunks]
    chunks += [_png_chunk(b"IDAT", zlib.compress(pixels, 9)), _png_chunk(b"IEND", b"")]
    return PNG_SIGNATURE + b"".join(chunks)


def embed_card(card_json: dict, out: Path) -> Path:
    """Write `out` as a PNG carrying `card_json` (V2) as `chara` and its V3 form as `ccv3`."""
    if card_json.get("spec") != "chara_card_v2":
        raise CardError(str(out), "card_unknown_spec", "--embed takes a V2 card (`spec: chara_card_v2`)")
    chunks = [("chara", encode_card_chunk(card_json)), ("ccv3", encode_card_chunk(card_v3_from_v2(card_json)))]
    out.write_bytes(solid_png(chunks))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmtune.data.cards", description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--embed", nargs=2, metavar=("CARD_JSON", "OUT_PNG"), help="write a card PNG from a V2 card JSON")
    group.add_argument("--extract", metavar="CARD_PNG", help="print the card JSON a PNG carries (V3 preferred)")
    args = parser.parse_args(argv)
    try:
        if args.embed:
            src, out = Path(args.embed[0]), Path(args.embed[1])
            embed_card(json.loads(src.read_text(encoding="utf-8")), out)
            print(f"wrote {out} (chara: V2, ccv3: V3)")
        else:
            path = Path(args.extract)
            print(json.dumps(card_json_from_png(path.read_bytes(), str(path)), indent=2, ensure_ascii=False))
    except (CardError, OSError, json.JSONDecodeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
