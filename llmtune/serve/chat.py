"""`llmtune chat RUN_DIR|URL`: a terminal chat with streaming, a card as the persona, /commands.

With a URL it talks to a running gateway (key from --key or LLMTUNE_API_KEY). With a run
directory it starts vLLM and the moderated gateway on loopback for the session, with a
session key the operator (you, at this terminal) vouches for.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from llmtune.console import console

HELP = "/reset starts over, /save FILE writes the chat as JSON, /system TEXT replaces the persona, /quit leaves"


@dataclass
class ChatSession:
    model: str
    system: str | None = None
    greeting: str | None = None
    messages: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        if self.greeting:
            self.messages.append({"role": "assistant", "content": self.greeting})

    def command(self, line: str) -> str | None:
        """Handle a /command; returns what to print, or None when the line is a chat message."""
        if not line.startswith("/"):
            return None
        name, _, arg = line.partition(" ")
        if name == "/reset":
            self.reset()
            return "(new chat)" + (f"\n{self.greeting}" if self.greeting else "")
        if name == "/save":
            path = Path(arg.strip() or "chat.json")
            path.write_text(json.dumps({"model": self.model, "messages": self.messages}, indent=2, ensure_ascii=False))
            return f"(saved {len(self.messages)} messages to {path})"
        if name == "/system":
            self.system = arg.strip() or None
            self.reset()
            return "(persona replaced; new chat)"
        if name in ("/quit", "/exit"):
            raise EOFError
        return f"(unknown command) {HELP}"


def persona_from_card(card_path: Path, user_name: str = "User") -> tuple[str, str | None]:
    """The system prompt and greeting a card gives, exactly as training built them."""
    from llmtune.data.cards import card_greetings, card_system_prompt, load_card

    card = load_card(card_path)
    greetings = card_greetings(card, user_name)
    return card_system_prompt(card, user_name), (greetings[0] if greetings else None)


def stream_reply(client, session: ChatSession, write: Callable[[str], None], **sampling) -> str:
    """Send the chat, print the reply as it streams, keep it in the history."""
    import openai

    parts = []
    try:
        for chunk in client.chat.completions.create(model=session.model, messages=session.messages, stream=True, **sampling):
            if not chunk.choices:
                continue
            piece = chunk.choices[0].delta.content or ""
            parts.append(piece)
            write(piece)
            if chunk.choices[0].finish_reason == "content_filter":
                write("\n(the rest of this reply was blocked by the content policy)")
    except openai.BadRequestError as exc:
        session.messages.pop()  # the refused message does not stay in the history
        write(f"(refused: {exc.body.get('message') if isinstance(exc.body, dict) else exc})")
        return ""
    reply = "".join(parts)
    session.messages.append({"role": "assistant", "content": reply})
    return reply


def chat_loop(client, session: ChatSession, lines: Iterable[str], write: Callable[[str], None], **sampling) -> None:
    if session.greeting:
        write(session.greeting + "\n")
    for line in lines:
        line = line.strip()
        if not line:
            continue
        try:
            note = session.command(line)
        except EOFError:
            return
        if note is not None:
            write(note + "\n")
            continue
        session.messages.append({"role": "user", "content": line})
        stream_reply(client, session, write, **sampling)
        write("\n")


def _stdin_lines() -> Iterable[str]:
    while True:
        try:
            yield console.input("[bold]you>[/] ")
        except EOFError:
            return


def run_chat(target: str, card: Path | None, key: str | None, model: str | None, system: str | None,
             max_tokens: int, temperature: float, messages: list[str] | None = None) -> None:
    """Interactive unless `messages` are given: then each is sent in turn and the chat ends."""
    from openai import OpenAI

    def write(text: str) -> None:
        console.print(text, end="", markup=False, highlight=False)

    persona, greeting = persona_from_card(card) if card else (system, None)
    if persona is None and not target.startswith(("http://", "https://")):
        persona = _run_system_prompt(Path(target))
    sampling = {"max_tokens": max_tokens, "temperature": temperature}
    if target.startswith(("http://", "https://")):
        client = OpenAI(base_url=target.rstrip("/") + ("" if target.rstrip("/").endswith("/v1") else "/v1"),
                        api_key=key or os.environ.get("LLMTUNE_API_KEY", ""), max_retries=0)
        session = ChatSession(model or client.models.list().data[0].id, persona, greeting)
        lines = messages if messages else _interactive(client, session)
        chat_loop(client, session, lines, write, **sampling)
        return
    _chat_with_run(Path(target), persona, greeting, model, write, sampling, messages)


def _run_system_prompt(run_dir: Path) -> str | None:
    """The persona the run was trained with (None for a model directory)."""
    from llmtune.artifacts import PreparedData, RunDir

    return PreparedData.load(run_dir).persona() if RunDir(run_dir).prepared.exists() else None


def _interactive(client, session) -> Iterable[str]:
    console.print(f"[dim]{HELP}[/]")
    return _stdin_lines()


def _chat_with_run(run_dir: Path, persona, greeting, model, write, sampling, messages) -> None:
    import tempfile

    from openai import OpenAI

    from llmtune.moderation import load_screener
    from llmtune.serve.config import ServeConfig
    from llmtune.serve.gateway import create_app
    from llmtune.serve.keys import AgeVerification
    from llmtune.serve.run import GatewayThread, ServeRequest, vllm_config_for
    from llmtune.serve.store import open_store
    from llmtune.serve.vllm_server import VLLMServer

    with tempfile.TemporaryDirectory() as tmp:
        cfg = ServeConfig(store=f"{tmp}/session.db")
        keys = open_store(cfg.store)
        key, _ = keys.add("terminal", AgeVerification("operator-at-terminal", "local operator", "session"))
        vcfg = vllm_config_for(ServeRequest(run_dir, cfg))
        console.print(f"[dim]starting vLLM and the gateway for {run_dir} ...[/]")
        with VLLMServer(vcfg) as vllm, GatewayThread(create_app(cfg, vllm.base_url, load_screener(cfg.moderation), keys,
                                                                upstream_key=vcfg.api_key)) as gw:
            client = OpenAI(base_url=f"{gw.base_url}/v1", api_key=key, max_retries=0)
            served = model or (next(iter(vcfg.adapters)) if vcfg.adapters else vcfg.served_name)
            session = ChatSession(served, persona, greeting)
            for line in messages or []:
                write(f"you> {line}\n")
            lines = messages if messages else _interactive(client, session)
            chat_loop(client, session, lines, write, **sampling)
