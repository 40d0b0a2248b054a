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

from dataclasses import dataclass
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

    @property
    def trained_tokens(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


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


def _render(tokenizer, messages: list[Message], template: str, add_generation_prompt: bool = False) -> str:
    if not messages:
        return ""
    return tokenizer.apply_chat_template(
        [{"role": m.role, "content": m.content} for m in messages],
        chat_template=template,
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
    )


def render(tokenizer, conversation: Conversation, template: str, add_generation_prompt: bool = False) -> str:
    return _render(tokenizer, conversation.messages, template, add_generation_prompt)


def trained_spans(tokenizer, messages: list[Message], template: str, mask: str) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and the character spans that carry loss under `mask`."""
    full = _render(tokenizer, messages, template)
    assistant_idx = [i for i, m in enumerate(messages) if m.role == "assistant"]
    if mask == "last":
        assistant_idx = assistant_idx[-1:]
    spans: list[tuple[int, int]] = []
    for i in range(len(messages)):
        role = messages[i].role
        if mask == "all" and role == "system":
            continue
        if mask != "all" and i not in assistant_idx:
            continue
        # For assistant turns the header (`<|im_start|>assistant\n`) is prompt, not target.
        start_text = _render(tokenizer, messages[:i], template, add_generation_prompt=(role == "assistant"))
        end_text = _render(tokenizer, messages[: i + 1], template)
        if not (full.startswith(end_text) and end_text.startswith(start_text)):
            raise TemplateError(
                "the chat template does not render a conversation's prefixes as prefixes of the whole, "
                "so turn boundaries cannot be found for loss masking; use model.chat_template: chatml or a Jinja file "
                "whose output for messages[:i] is a prefix of its output for messages[:i+1]"
            )
        # Keep the end-of-turn token, drop the newline some templates put after it.
        end = max(len(start_text), len(end_text.rstrip()))
        spans.append((len(start_text), end))
    return full, spans


def tokenize_conversation(
    tokenizer: "PreTrainedTokenizerBase", conversation: Conversation, template: str, mask: str = "assistant"
) -> TokenizedConversation:
    text, spans = trained_spans(tokenizer, conversation.messages, template, mask)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    labels = []
    span_i = 0
    for token_id, (start, end) in zip(enc["input_ids"], enc["offset_mapping"]):
        while span_i < len(spans) and start >= spans[span_i][1]:
            span_i += 1
        inside = span_i < len(spans) and spans[span_i][0] <= start < spans[span_i][1] and end > start
        labels.append(token_id if inside else IGNORE_INDEX)
    return TokenizedConversation(input_ids=list(enc["input_ids"]), labels=labels)


def end_of_turn_token(tokenizer: "PreTrainedTokenizerBase", template: str) -> str:
    """The token the template closes an assistant turn with (what generation must stop at)."""
    probe = [Message("user", "x"), Message("assistant", "y")]
    text = _render(tokenizer, probe, template).rstrip()
    for tok in tokenizer.all_special_tokens + list(tokenizer.get_added_vocab()):
        if text.endswith(tok):
            return tok
    return tokenizer.eos_token
