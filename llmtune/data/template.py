"""Chat templates and loss masks.

A conversation is rendered with the chat template into text, and the trained character
spans are found by rendering growing prefixes of the conversation: the assistant turn i is
the text between `render(messages[:i], add_generation_prompt=True)` and
`render(messages[:i + 1])`, so the end-of-turn token the template writes after the reply
is inside the span and is trained. Tokens are labelled from their character offsets.
This works for any template whose renders of growing prefixes are prefixes of each other
(ChatML, Llama 3, Mistral, Gemma all are) and needs no `{% generation %}` markers.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from llmtune.data.types import Conversation, Message
from llmtune.errors import TemplateError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100

# Named templates for bases whose tokenizer ships none (or the wrong one).
NAMED_TEMPLATES = {
    "chatml": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
}


@dataclass
class TokenizedConversation:
    input_ids: list[int]
    labels: list[int]
    trained_tokens: int = -1  # computed on creation

    def __post_init__(self) -> None:
        if self.trained_tokens < 0:
            self.trained_tokens = len(self.labels) - self.labels.count(IGNORE_INDEX)


def resolve_chat_template(tokenizer: "PreTrainedTokenizerBase", spec: str | None, recipe_dir: Path | None = None) -> str:
    """The template text to train with: the tokenizer's own, a named one, or a Jinja file."""
    if spec is None:
        if not tokenizer.chat_template:
            raise TemplateError(
                "the base tokenizer has no chat template; set model.chat_template to `chatml` or to a Jinja file"
            )
        return tokenizer.chat_template
    if spec in NAMED_TEMPLATES:
        return NAMED_TEMPLATES[spec]
    path = Path(spec)
    if not path.is_absolute() and recipe_dir is not None and (recipe_dir / path).exists():
        path = recipe_dir / path
    if not path.is_file():
        names = ", ".join(NAMED_TEMPLATES)
        raise TemplateError(f"model.chat_template: `{spec}` is neither a named template ({names}) nor a Jinja file")
    return path.read_text(encoding="utf-8")


def _merge_system(messages: list[Message]) -> list[Message]:
    """All system messages joined into one leading system message."""
    system = [m.content for m in messages if m.role == "system"]
    rest = [m for m in messages if m.role != "system"]
    return ([Message("system", "\n\n".join(system))] if system else []) + rest


def _merge_runs(messages: list[Message]) -> list[Message]:
    """Consecutive messages of one role joined, so user and assistant alternate."""
    out: list[Message] = []
    for m in messages:
        if out and out[-1].role == m.role:
            out[-1] = Message(m.role, out[-1].content + "\n\n" + m.content)
        else:
            out.append(m)
    return out


def _fold_system(messages: list[Message]) -> list[Message]:
    """For templates with no system role (Gemma): the system text opens the first user turn."""
    if not messages or messages[0].role != "system":
        return messages
    system, rest = messages[0].content, messages[1:]
    if rest and rest[0].role == "user":
        return [Message("user", f"{system}\n\n{rest[0].content}"), *rest[1:]]
    return [Message("user", system), *rest]


def _renders_every_message(tokenizer, messages: list[Message], template: str) -> bool:
    """True if the template renders the conversation and drops none of its messages."""
    try:
        text = _render(tokenizer, messages, template)
    except Exception:  # jinja's raise_exception ("roles must alternate", "system role not supported")
        return False
    return all(m.content.strip() in text for m in messages)


def fit_to_template(tokenizer, messages: list[Message], template: str) -> tuple[list[Message], str | None]:
    """Reshape a conversation the template refuses or silently truncates (several system messages,
    non-alternating roles, no system role) instead of crashing.
    Returns the messages and what was changed (None when nothing was)."""
    steps = (
        ("merged system messages", _merge_system),
        ("merged consecutive same-role turns", _merge_runs),
        ("folded the system prompt into the first user turn", _fold_system),
    )
    changed: list[str] = []
    if _renders_every_message(tokenizer, messages, template):
        return messages, None
    for what, step in steps:
        reshaped = step(messages)
        if reshaped != messages:
            messages = reshaped
            changed.append(what)
            if _renders_every_message(tokenizer, messages, template):
                return messages, ", ".join(changed)
    raise TemplateError(
        "the chat template rejects this conversation even after merging system messages and same-role turns "
        "and folding the system prompt into the first user turn; set model.chat_template to a template that fits"
    )


class ChatRenderer:
    """`tokenizer.apply_chat_template(..., tokenize=False)`, with the Jinja template compiled once.

    prepare renders every conversation a few times; going through apply_chat_template costs
    ~150 us of argument handling per call, the compiled template alone a fraction of that."""

    def __init__(self, tokenizer: "PreTrainedTokenizerBase", template: str):
        from transformers.utils.chat_template_utils import _compile_jinja_template

        self.tokenizer = tokenizer
        self.compiled = _compile_jinja_template(template)
        self.special_tokens = dict(tokenizer.special_tokens_map)

    def __call__(self, messages: list[Message], add_generation_prompt: bool = False) -> str:
        if not messages:
            return ""
        return self.compiled.render(
            messages=[{"role": m.role, "content": m.content} for m in messages],
            tools=None, documents=None, add_generation_prompt=add_generation_prompt, **self.special_tokens,
        )


_RENDERERS: dict[str, ChatRenderer] = {}


_LAST_RENDER: list = [None, ""]  # (key, text): prepare renders each conversation twice in a row


def _render(tokenizer, messages: list[Message], template: str, add_generation_prompt: bool = False) -> str:
    key = (id(tokenizer), template, tuple(messages), add_generation_prompt)
    if _LAST_RENDER[0] == key:
        return _LAST_RENDER[1]
    renderer = _RENDERERS.get(template)
    if renderer is None or renderer.tokenizer is not tokenizer:
        renderer = _RENDERERS[template] = ChatRenderer(tokenizer, template)
    text = renderer(messages, add_generation_prompt)
    _LAST_RENDER[:] = [key, text]
    return text


def _trained_indices(messages: list[Message], mask: str) -> list[int]:
    if mask == "all":
        return [i for i, m in enumerate(messages) if m.role != "system"]
    assistant = [i for i, m in enumerate(messages) if m.role == "assistant"]
    return assistant[-1:] if mask == "last" else assistant


# Private-use code points: they survive templating untouched and never occur in chat text.
_OPEN, _MID, _CLOSE = "\ue000", "\ue001", "\ue002"
_MARKER = re.compile(f"{_OPEN}(\\d+){_MID}|{_CLOSE}(\\d+){_MID}")


def _spans_by_markers(tokenizer, messages, template, trained, eot) -> tuple[str, list[tuple[int, int]]] | None:
    """One render with each message's content fenced by markers: a trained span is the content
    plus the end-of-turn token that follows it. None when the template alters the fenced content
    (e.g. trims it), in which case the prefix method decides."""
    plain = _render(tokenizer, messages, template)  # usually cached: fit_to_template just rendered it
    fenced = [Message(m.role, f"{_OPEN}{i}{_MID}{m.content}{_CLOSE}{i}{_MID}") for i, m in enumerate(messages)]
    marked = _render(tokenizer, fenced, template)
    pieces, bounds, pos, cut = [], {}, 0, 0
    for match in _MARKER.finditer(marked):
        pieces.append(marked[cut : match.start()])
        pos += match.start() - cut
        cut = match.end()
        if match.group(1) is not None:
            bounds[int(match.group(1))] = [pos, None]
        elif int(match.group(2)) in bounds:
            bounds[int(match.group(2))][1] = pos
    pieces.append(marked[cut:])
    text = "".join(pieces)
    if text != plain or any(b[1] is None for b in bounds.values()):
        return None
    spans = []
    for i in trained:
        if i not in bounds:
            return None
        start, end = bounds[i]
        follows = text[end:].lstrip(" ")
        if eot and follows.startswith(eot):
            end = len(text) - len(follows) + len(eot)
        spans.append((start, end))
    return text, spans


def _spans_by_prefixes(tokenizer, messages, template, trained) -> tuple[str, list[tuple[int, int]]]:
    """Render growing prefixes: turn i spans from its content to the end of render(messages[:i+1])."""
    full = _render(tokenizer, messages, template)
    spans = []
    for i in trained:
        start_text = _render(tokenizer, messages[:i], template, add_generation_prompt=messages[i].role == "assistant")
        end_text = _render(tokenizer, messages[: i + 1], template)
        if not (full.startswith(end_text) and end_text.startswith(start_text)):
            raise TemplateError(
                "the chat template does not render a conversation's prefixes as prefixes of the whole, "
                "so turn boundaries cannot be found for loss masking; use model.chat_template: chatml or a Jinja file "
                "whose output for messages[:i] is a prefix of its output for messages[:i+1]"
            )
        content_at = full.find(messages[i].content.strip(), len(start_text))
        start = content_at if content_at >= 0 else len(start_text)
        # Keep the end-of-turn token, drop the newline some templates put after it.
        spans.append((start, max(start, len(end_text.rstrip()))))
    return full, spans


def trained_spans(tokenizer, messages: list[Message], template: str, mask: str) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and the character spans that carry loss under `mask`: each trained
    message's content and the end-of-turn token after it (never the role header)."""
    trained = _trained_indices(messages, mask)
    found = _spans_by_markers(tokenizer, messages, template, trained, end_of_turn_token(tokenizer, template))
    return found if found is not None else _spans_by_prefixes(tokenizer, messages, template, trained)


def label_tokens(encoding, spans: list[tuple[int, int]]) -> list[int]:
    """Labels for one `tokenizers.Encoding`: the token id where the token starts inside a trained
    span, else IGNORE_INDEX. Only the tokens at span edges are looked up, not every offset."""
    ids = encoding.ids
    labels = [IGNORE_INDEX] * len(ids)
    for start, end in spans:
        first = encoding.char_to_token(start)
        if first is None:
            continue
        if encoding.token_to_chars(first)[0] < start:  # token straddles the span start
            first += 1
        last = encoding.char_to_token(end - 1)
        if last is None or last < first:
            continue
        labels[first : last + 1] = ids[first : last + 1]
    return labels


def tokenize_rendered(tokenizer: "PreTrainedTokenizerBase", rendered: list[tuple[str, list[tuple[int, int]]]]) -> list[TokenizedConversation]:
    """Tokenize many (text, trained spans) pairs in one batch (the Rust tokenizer uses every core)."""
    encodings = tokenizer.backend_tokenizer.encode_batch([text for text, _ in rendered], add_special_tokens=False)
    return [TokenizedConversation(input_ids=enc.ids, labels=label_tokens(enc, spans)) for enc, (_, spans) in zip(encodings, rendered)]


def tokenize_conversation(
    tokenizer: "PreTrainedTokenizerBase", conversation: Conversation, template: str, mask: str = "assistant"
) -> TokenizedConversation:
    return tokenize_rendered(tokenizer, [trained_spans(tokenizer, conversation.messages, template, mask)])[0]


@functools.lru_cache(maxsize=16)
def _end_of_turn(tokenizer: "PreTrainedTokenizerBase", template: str) -> str:
    probe = [Message("user", "x"), Message("assistant", "y")]
    text = _render(tokenizer, probe, template).rstrip()
    for tok in tokenizer.all_special_tokens + list(tokenizer.get_added_vocab()):
        if text.endswith(tok):
            return tok
    return tokenizer.eos_token


def end_of_turn_token(tokenizer: "PreTrainedTokenizerBase", template: str) -> str:
    """The token the template closes an assistant turn with (what generation must stop at)."""
    return _end_of_turn(tokenizer, template)


@dataclass(frozen=True)
class RoleSequences:
    """What the template writes around each role's content, and where generation stops."""

    bos: str
    system_prefix: str
    system_suffix: str
    user_prefix: str
    user_suffix: str
    assistant_prefix: str
    assistant_suffix: str
    stop: list[str] = field(default_factory=list)


def role_sequences(tokenizer, template: str, eot: str) -> RoleSequences:
    """Read the per-role wrappers off a rendered probe conversation (for chat-app presets, and the
    role markers eval looks for in replies)."""
    S, U1, A1, U2, A2 = "\ue010S\ue011", "\ue010U1\ue011", "\ue010A1\ue011", "\ue010U2\ue011", "\ue010A2\ue011"
    probe = [Message("system", S), Message("user", U1), Message("assistant", A1), Message("user", U2), Message("assistant", A2)]
    text = _render(tokenizer, probe, template)
    if any(marker not in text for marker in (S, U1, A1, U2, A2)):
        raise TemplateError("the chat template drops or rewrites messages; cannot derive chat-app presets from it")
    pre_s, rest = text.split(S, 1)
    s_to_u1, rest = rest.split(U1, 1)
    u1_to_a1, rest = rest.split(A1, 1)
    a1_to_u2, rest = rest.split(U2, 1)
    _, after_a2 = rest.split(A2, 1)
    gen_prompt = _render(tokenizer, probe[:2], template, add_generation_prompt=True)[len(_render(tokenizer, probe[:2], template)):]
    assistant_prefix = gen_prompt or u1_to_a1
    user_suffix = u1_to_a1[: len(u1_to_a1) - len(assistant_prefix)] if u1_to_a1.endswith(assistant_prefix) else u1_to_a1
    assistant_suffix = after_a2
    user_prefix = a1_to_u2[len(assistant_suffix):] if a1_to_u2.startswith(assistant_suffix) else a1_to_u2
    system_suffix = s_to_u1[: len(s_to_u1) - len(user_prefix)] if s_to_u1.endswith(user_prefix) else s_to_u1
    # A BOS the template writes once at the start, unless it is the token that opens every role (ChatML).
    b = tokenizer.bos_token
    bos = b if b and pre_s.startswith(b) and not user_prefix.startswith(b) else ""
    system_prefix = pre_s[len(bos):]
    stops = [eot] + ([user_prefix.strip()] if user_prefix.strip() and user_prefix.strip() != eot else [])
    return RoleSequences(bos, system_prefix, system_suffix, user_prefix, user_suffix, assistant_prefix,
                         assistant_suffix, stops)
