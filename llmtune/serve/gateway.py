"""The gateway: an OpenAI-compatible endpoint in front of vLLM that screens everything.

`Gateway(cfg, upstream, screener, keys, audit).app` is the FastAPI app (`create_app(...)` builds
one). Per request, one method per concern, in order:

1. `authorize`: API key (401 unknown or revoked, looked up in the store on every request, so a
   revocation holds on every replica from the next request on; 403 without an age-verification
   record), then the rate limit (429, counted in the shared `limits` storage).
2. `parse`: size limits (413), JSON (400), then `validate_request`: only the roles the API
   defines, only text content, bounded `logit_bias` and stop strings, no parameter that would
   put unscreened text in front of the model or the client; the text to screen is collected
   from every message, every `name`, and every string of a `response_format` schema.
3. `check_context`: text beyond what the served context can hold is a 400 before any screening.
4. `screen_input`: the whole conversation through `Screener.conversation_state` (cached by
   conversation prefix, so a resent history is not screened again), on a pool of screening
   workers under a time budget (503 past it: the gateway fails closed). Blocked: 400
   `content_filter`.
5. `respond` / `stream`: vLLM on loopback (with a key only the gateway knows); the reply is
   screened in the context of its conversation, at checkpoints that depend only on the reply's
   text, so a plain and a streamed reply reach the same decision and release the same text. A
   block ends the reply with `withheld_text` (visible to chat apps that ignore
   `finish_reason`) and finish_reason `content_filter`.

Every decision goes to the audit table (llmtune/serve/store.py): key id, time, categories, content
hash, committed before what it decided is sent. docs/serving.md lists what the gateway refuses
and why.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmtune.moderation.conversation import ConversationState
from llmtune.serve.config import ServeConfig
from llmtune.serve.keys import KeyRecord
from llmtune.serve.ratelimit import KeyRateLimiter, RateLimiterUnavailable
from llmtune.serve.store import AuditLog, Store, StoreUnavailable

# Sampling parameters chat apps send (SillyTavern included) that vLLM understands; anything else
# a client sends is not forwarded (it cannot reach the model), and docs/serving.md says so.
PASSTHROUGH = {
    "model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "min_p",
    "repetition_penalty", "presence_penalty", "frequency_penalty", "stop", "stop_token_ids", "seed", "stream",
    "stream_options", "n", "user", "logit_bias", "min_tokens", "typical_p", "length_penalty", "ignore_eos",
    "include_stop_str_in_output", "response_format", "skip_special_tokens", "spaces_between_special_tokens",
    "best_of", "truncate_prompt_tokens", "bad_words",
}
# Parameters that would put text in front of the client or the model without screening.
REFUSED = {
    "chat_template": "would replace the chat template with unscreened text",
    "chat_template_kwargs": "would inject unscreened template variables",
    "documents": "would add unscreened documents to the prompt",
    "tools": "tool definitions are not screened; this endpoint serves chat only",
    "functions": "function definitions are not screened; this endpoint serves chat only",
    "logprobs": "log-probabilities reveal unscreened alternative tokens",
    "top_logprobs": "log-probabilities reveal unscreened alternative tokens",
    "prompt_logprobs": "log-probabilities reveal unscreened alternative tokens",
    "echo": "echo is not supported",
    "suffix": "suffix is not supported",
    "continue_final_message": "would continue an unscreened partial reply",
    "add_generation_prompt": "the chat template's generation prompt is fixed",
    "mm_processor_kwargs": "multimodal input is not supported",
    "guided_json": "guided decoding forces the reply; use response_format (its strings are screened)",
    "guided_regex": "guided decoding forces the reply",
    "guided_choice": "guided decoding forces the reply",
    "guided_grammar": "guided decoding forces the reply",
    "structured_outputs": "guided decoding forces the reply; use response_format (its strings are screened)",
    "grammar_string": "guided decoding forces the reply",
    "json_schema": "guided decoding forces the reply; use response_format (its strings are screened)",
    "allowed_token_ids": "restricting the vocabulary can force the reply",
    "prompt_embeds": "embeddings cannot be screened",
}
ROLES = ("system", "developer", "user", "assistant")
MESSAGE_KEYS = ("role", "content", "name")
MAX_STOP_STRINGS = 64
MAX_STOP_CHARS = 256
MAX_NAME_CHARS = 64
MAX_LOGIT_BIAS_ENTRIES = 300
MAX_LOGIT_BIAS = 1.0  # a bias may suppress a token or nudge it, never force it
MAX_SCHEMA_BYTES = 65_536


_SAMPLING_SCHEMA = {
    "model": {"type": "string"}, "max_tokens": {"type": "integer"}, "temperature": {"type": "number"},
    "top_p": {"type": "number"}, "top_k": {"type": "integer"}, "min_p": {"type": "number"},
    "repetition_penalty": {"type": "number"}, "presence_penalty": {"type": "number"},
    "frequency_penalty": {"type": "number"}, "stop": {"type": "array", "items": {"type": "string"}},
    "seed": {"type": "integer"}, "stream": {"type": "boolean"}, "n": {"type": "integer"},
}
CHAT_REQUEST_SCHEMA = {
    "type": "object", "required": ["model", "messages"],
    "properties": {**_SAMPLING_SCHEMA, "messages": {"type": "array", "items": {
        "type": "object", "required": ["role", "content"],
        "properties": {"role": {"type": "string", "enum": list(ROLES)}, "content": {"type": "string"}}}}},
}
COMPLETION_REQUEST_SCHEMA = {
    "type": "object", "required": ["model", "prompt"], "properties": {**_SAMPLING_SCHEMA, "prompt": {"type": "string"}},
}


def error_body(message: str, code: str, type_: str = "invalid_request_error", param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error(status: int, message: str, code: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, code, param=param), status_code=status)


@dataclass
class Metrics:
    registry: CollectorRegistry
    requests: Counter
    blocks: Counter
    latency: Histogram

    @classmethod
    def create(cls) -> "Metrics":
        reg = CollectorRegistry()
        return cls(
            registry=reg,
            requests=Counter("llmtune_gateway_requests_total", "Requests by route and status", ["route", "status"], registry=reg),
            blocks=Counter("llmtune_gateway_blocks_total", "Moderation blocks by stage and category", ["stage", "category"], registry=reg),
            latency=Histogram("llmtune_gateway_request_seconds", "Time to the full response", ["route"], registry=reg),
        )


class BadRequest(Exception):
    """A client error found while validating: becomes a 400 with the parameter path."""

    def __init__(self, message: str, code: str = "invalid_request", param: str | None = None):
        super().__init__(message)
        self.code, self.param = code, param

    def response(self, status: int = 400) -> JSONResponse:
        return error(status, str(self), self.code, self.param)


# ---------------------------------------------------------------------------------------------
# Validation: what may pass, and the text to screen


def _content_text(content, where: str) -> str:
    """The text of a message's content: a string, or a list of text parts."""
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise BadRequest(f"{where} must be a string or a list of text parts", param=where)
    texts = []
    for j, part in enumerate(content):
        at = f"{where}[{j}]"
        if not isinstance(part, dict) or part.get("type") != "text":
            raise BadRequest(f"{at} must be a text part ({{\"type\": \"text\", \"text\": ...}}); this endpoint serves text only", param=at)
        if not isinstance(part.get("text"), str):
            raise BadRequest(f"{at}.text must be a string", param=f"{at}.text")
        extra = set(part) - {"type", "text"}
        if extra:
            raise BadRequest(f"{at} has unsupported key(s) {sorted(extra)}", param=at)
        texts.append(part["text"])
    return "\n".join(texts)


def _schema_strings(node, out: list[str], depth: int = 0) -> None:
    """Every string in a JSON schema: enum and const values, patterns, descriptions, titles,
    defaults, examples, property names. Guided decoding can force any of them into the reply."""
    if depth > 64:
        raise BadRequest("response_format schema is nested too deeply", param="response_format")
    if isinstance(node, str):
        out.append(node)
    elif isinstance(node, dict):
        for k, v in node.items():
            out.append(str(k))
            _schema_strings(v, out, depth + 1)
    elif isinstance(node, list):
        for v in node:
            _schema_strings(v, out, depth + 1)


def _response_format(value) -> str | None:
    """The text a response_format could force, to screen with the conversation (or None)."""
    if value is None:
        return None
    if not isinstance(value, dict) or value.get("type") not in ("text", "json_object", "json_schema"):
        raise BadRequest("response_format must be {\"type\": \"text\" | \"json_object\" | \"json_schema\", ...}", param="response_format")
    if value["type"] != "json_schema":
        return None
    if len(json.dumps(value)) > MAX_SCHEMA_BYTES:
        raise BadRequest(f"response_format schema over {MAX_SCHEMA_BYTES} bytes", param="response_format")
    strings: list[str] = []
    _schema_strings(value.get("json_schema"), strings)
    return "\n".join(s for s in strings if s.strip())


def _check_sampling(body: dict, cfg: ServeConfig) -> None:
    if body.get("n", 1) not in (None, 1):
        raise BadRequest("only n=1 is supported", "unsupported_parameter", "n")
    if body.get("best_of", 1) not in (None, 1):
        raise BadRequest("only best_of=1 is supported (one completion per request)", "unsupported_parameter", "best_of")
    limit = body.get("max_tokens") or body.get("max_completion_tokens")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit > cfg.max_tokens_limit or limit < 1):
        raise BadRequest(f"max_tokens must be an integer from 1 to {cfg.max_tokens_limit}", param="max_tokens")
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise BadRequest("stop must be a string or a list of strings", param="stop")
        if len(stops) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_CHARS for s in stops):
            raise BadRequest(f"at most {MAX_STOP_STRINGS} stop strings of at most {MAX_STOP_CHARS} characters", param="stop")
    bias = body.get("logit_bias")
    if bias is not None:
        if not isinstance(bias, dict) or len(bias) > MAX_LOGIT_BIAS_ENTRIES:
            raise BadRequest(f"logit_bias must map at most {MAX_LOGIT_BIAS_ENTRIES} token ids to numbers", param="logit_bias")
        for token, value in bias.items():
            if not str(token).lstrip("-").isdigit() or not isinstance(value, (int, float)) or isinstance(value, bool):
                raise BadRequest("logit_bias maps token ids to numbers", param=f"logit_bias.{token}")
            if not -100 <= value <= MAX_LOGIT_BIAS:
                raise BadRequest(f"logit_bias values must be between -100 and {MAX_LOGIT_BIAS:g}: a bias may suppress a "
                                 "token or nudge it, never force it", "unsupported_parameter", f"logit_bias.{token}")


def validate_request(body: dict, chat: bool, cfg: ServeConfig) -> tuple[dict, list[dict]]:
    """(the body to forward, the messages to screen). Raises BadRequest."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    for name, why in REFUSED.items():
        if body.get(name) not in (None, False, 0, "", [], {}):
            raise BadRequest(f"`{name}` is not accepted here: {why}", "unsupported_parameter", name)
    _check_sampling(body, cfg)
    screened: list[dict] = []
    forward = {k: v for k, v in body.items() if k in PASSTHROUGH}
    if chat:
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise BadRequest("`messages` must be a non-empty list", param="messages")
        clean = []
        for i, m in enumerate(msgs):
            at = f"messages[{i}]"
            if not isinstance(m, dict):
                raise BadRequest(f"{at} must be an object with `role` and `content`", param=at)
            role = m.get("role")
            if role not in ROLES:
                shown = json.dumps(role)[:40] if isinstance(role, str) else type(role).__name__
                raise BadRequest(f"{at}.role must be one of {', '.join(ROLES)} (got {shown}); tool and function messages "
                                 "are not supported", param=f"{at}.role")
            text = _content_text(m.get("content"), f"{at}.content")
            out = {"role": role, "content": text}
            name = m.get("name")
            if name is not None:
                if not isinstance(name, str) or len(name) > MAX_NAME_CHARS or any(c in name for c in "\n\r\t<>|{}"):
                    raise BadRequest(f"{at}.name must be a short name (at most {MAX_NAME_CHARS} characters, one line)",
                                     param=f"{at}.name")
                out["name"] = name
            clean.append(out)  # only role, content and name reach the chat template
            screened.append(out)
        forward["messages"] = clean
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            prompts = [prompt]
        elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            prompts = prompt
        else:
            raise BadRequest("`prompt` must be a string or a list of strings (token ids cannot be screened)", param="prompt")
        if len(prompts) > 1:
            raise BadRequest("one prompt per request", "unsupported_parameter", "prompt")
        screened = [{"role": "user", "content": p} for p in prompts]
    forced = _response_format(body.get("response_format"))
    if forced:
        screened = [*screened, {"role": "system", "content": forced}]
    return forward, screened


# ---------------------------------------------------------------------------------------------


def _text_of(choice: dict, chat: bool) -> str:
    return ((choice.get("message") or {}).get("content") or "") if chat else (choice.get("text") or "")


def _delta_of(choice: dict, chat: bool) -> str:
    return ((choice.get("delta") or {}).get("content") or "") if chat else (choice.get("text") or "")


def _sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n"


class Gateway:
    """The app and its state: the upstream client, the screening pool, rate-limit buckets, metrics."""

    def __init__(self, cfg: ServeConfig, upstream: str, screener, keys: Store, audit: AuditLog | None = None,
                 upstream_key: str | None = None, tokenizer=None, limiter: KeyRateLimiter | None = None,
                 watermark: str | None = None):
        self.cfg, self.upstream, self.screener, self.keys = cfg, upstream, screener, keys
        # Machine-readable marking (EU AI Act Art. 50(2)) on every reply: a header and a field, plus the
        # watermark scheme vLLM samples with (None: this gateway's upstream does not watermark).
        self.marking = {"generated": True, "watermark": watermark}
        self.marking_headers = {"x-llmtune-generated": "true", "x-llmtune-watermark": watermark or "none"}
        self.audit = audit or AuditLog(keys, cfg.audit_content)
        self.limiter = limiter or KeyRateLimiter(cfg.rate_limit_storage, cfg.rate_limit, cfg.key_rate_limits)
        self.upstream_key = upstream_key
        self.tokenizer = tokenizer  # a `tokenizers.Tokenizer` of the served model, for the context check
        self.metrics = Metrics.create()
        self.pool = ThreadPoolExecutor(max_workers=cfg.screen_workers, thread_name_prefix="screen")
        # key lookups and rate-limit hits are network calls (database, Redis): threads, off the event loop
        self.state_pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="state")
        self.client: httpx.AsyncClient | None = None
        self.app = self._build()

    # -- 1. who may ask --------------------------------------------------------------------

    def check_key(self, key: str) -> tuple[KeyRecord | None, int]:
        """The key's record and the status it earns: 200, 401 unknown or revoked, 403 unverified, 429 over its limit."""
        record = self.keys.lookup(key) if key else None  # no cache: a revocation holds from the next request on
        if record is None:
            return None, 401
        if record.age_verification is None:
            return record, 403
        return record, 200 if self.limiter.allow(record) else 429

    async def authorize(self, request: Request) -> tuple[KeyRecord | None, JSONResponse | None]:
        header = request.headers.get("authorization", "")
        key = header[7:].strip() if header.lower().startswith("bearer ") else request.headers.get("x-api-key", "")
        record, status = await asyncio.get_running_loop().run_in_executor(self.state_pool, self.check_key, key)
        if status == 401:
            return None, error(401, "missing or invalid API key (Authorization: Bearer KEY)", "invalid_api_key")
        if status == 403:
            return None, error(403, "this key has no age-verification record; this service is for verified adults only",
                               "age_verification_required")
        if status == 429:
            return None, error(429, "rate limit exceeded for this key; retry later", "rate_limit_exceeded")
        return record, None

    # -- 2-3. what is asked ----------------------------------------------------------------

    async def parse(self, request: Request, chat: bool) -> tuple[dict, list[dict]]:
        raw = await request.body()
        if len(raw) > self.cfg.max_body_bytes:
            raise BadRequest(f"request body over {self.cfg.max_body_bytes} bytes", "request_too_large")
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise BadRequest("the request body is not valid JSON", "invalid_json") from None
        forward, screened = validate_request(body, chat, self.cfg)
        self.check_context(screened, forward)
        return forward, screened

    def check_context(self, messages: list[dict], body: dict) -> None:
        """Refuse text the served context cannot hold, before spending any screening on it."""
        limit = self.cfg.max_context_tokens
        texts = [m.get("content") or "" for m in messages] + [m.get("name") or "" for m in messages]
        chars = sum(map(len, texts))
        if self.tokenizer is not None and chars <= 16 * limit:
            tokens = sum(len(e.ids) for e in self.tokenizer.encode_batch([t for t in texts if t], add_special_tokens=False))
        else:
            tokens = chars // 4 if self.tokenizer is None else chars  # no tokenizer: a generous bound (4 chars a token)
        if tokens > limit:
            raise BadRequest(f"the request holds about {tokens} tokens of text; the served context holds {limit} "
                             "(shorten the history or the prompt)", "context_length_exceeded", "messages")

    # -- 4. screening ----------------------------------------------------------------------

    async def run_screen(self, fn, *args):
        """`fn(*args)` on the screening pool, under the time budget (past it: fail closed)."""
        loop = asyncio.get_running_loop()
        try:
            return await asyncio.wait_for(loop.run_in_executor(self.pool, functools.partial(fn, *args)),
                                          timeout=self.cfg.screen_timeout_s)
        except asyncio.TimeoutError:
            raise TimeoutError(f"screening took longer than {self.cfg.screen_timeout_s:g} s") from None

    def record_block(self, stage: str, decision) -> None:
        for category in decision.categories or ["unspecified"]:
            self.metrics.blocks.labels(stage, category).inc()

    # -- 5. the reply ----------------------------------------------------------------------

    def reply_screen(self, state: ConversationState):
        return state.reply(self.cfg.screen_window_chars, self.cfg.screen_context_chars)

    def _headers(self) -> dict:
        return {"Authorization": f"Bearer {self.upstream_key}"} if self.upstream_key else {}

    async def respond(self, route: str, body: dict, key: KeyRecord, chat: bool, state: ConversationState):
        try:
            r = await self.client.post(route, json=body, headers=self._headers())
        except httpx.HTTPError as exc:
            return error(503, f"the model server is unavailable ({type(exc).__name__})", "upstream_unavailable")
        if r.status_code != 200:
            return self._upstream_error(r.status_code, r.content)
        data = r.json()
        for choice in data.get("choices", []):
            text = _text_of(choice, chat)
            decision, released = await self.run_screen(self.reply_screen(state).screen, text)
            await self.audit.write(key, route, "output", text, decision)
            if not decision.allowed:
                self.record_block("output", decision)
                shown = text[:released] + self.cfg.withheld_text
                if chat:
                    choice["message"]["content"] = shown
                else:
                    choice["text"] = shown
                choice["finish_reason"] = "content_filter"
        data["llmtune"] = self.marking
        return JSONResponse(data, headers=self.marking_headers)

    def _upstream_error(self, status: int, content: bytes) -> JSONResponse:
        try:
            return JSONResponse(json.loads(content), status_code=status)
        except ValueError:
            return error(502 if status < 500 else status, f"the model server answered {status}", "upstream_error")

    async def open_stream(self, route: str, body: dict):
        """The upstream stream, opened before the client's response starts, so an upstream
        refusal reaches the client with its own status code (not a 200 with an error event)."""
        request = self.client.build_request("POST", route, json=body, headers=self._headers())
        response = await self.client.send(request, stream=True)
        if response.status_code != 200:
            content = await response.aread()
            await response.aclose()
            return None, self._upstream_error(response.status_code, content)
        return response, None

    async def stream(self, upstream: httpx.Response, route: str, key: KeyRecord, chat: bool,
                     state: ConversationState) -> AsyncIterator[str]:
        """Relay vLLM's stream, releasing text only up to the last screened checkpoint."""
        reply_screen = self.reply_screen(state)
        reply, sent, shell, sent_role = "", 0, {}, False
        finish = None
        decision = None

        def chunk(text: str | None, finish_reason: str | None) -> dict:
            nonlocal sent_role
            out = {k: shell.get(k) for k in ("id", "object", "created", "model")}
            out["llmtune"] = self.marking
            if chat:
                delta: dict = {}
                if not sent_role:
                    delta["role"] = "assistant"
                    sent_role = True
                if text:
                    delta["content"] = text
                out["choices"] = [{"index": 0, "delta": delta, "finish_reason": finish_reason}]
            else:
                out["choices"] = [{"index": 0, "text": text or "", "finish_reason": finish_reason}]
            return out

        async def release(final: bool):
            nonlocal sent, decision
            decision, released = await self.run_screen(reply_screen.check, reply, final)
            out = reply[sent:released]
            sent = released
            return out

        try:
            async for line in upstream.aiter_lines():
                if not line.startswith("data: "):
                    continue
                payload = line[6:].strip()
                if payload == "[DONE]":
                    break
                event = json.loads(payload)
                shell = shell or event
                choices = event.get("choices") or []
                if not choices:
                    if event.get("usage"):
                        yield _sse({**{k: shell.get(k) for k in ("id", "object", "created", "model")}, "choices": [],
                                    "usage": event["usage"]})
                    continue
                reply += _delta_of(choices[0], chat)
                finish = choices[0].get("finish_reason") or finish
                out = await release(final=bool(finish))
                if not decision.allowed:
                    break
                if out:
                    yield _sse(chunk(out, None))
            if decision is None or decision.allowed:
                out = await release(final=True)  # the end: whatever is left, screened whole
                if out and decision.allowed:
                    yield _sse(chunk(out, None))
            await self.audit.write(key, route, "output", reply, decision)
            if not decision.allowed:
                self.record_block("output", decision)
                yield _sse(chunk(self.cfg.withheld_text or None, "content_filter"))
            else:
                yield _sse(chunk(None, finish or "stop"))
        except (httpx.HTTPError, json.JSONDecodeError) as exc:
            yield _sse(error_body(f"the model server failed mid-stream ({type(exc).__name__})", "upstream_unavailable", "server_error"))
        except TimeoutError as exc:
            yield _sse(error_body(f"{exc}; the reply was withheld", "screening_timeout", "server_error"))
        finally:
            await upstream.aclose()
        yield _sse("[DONE]")

    # -- the routes ------------------------------------------------------------------------

    async def completion(self, request: Request, chat: bool):
        route = "/v1/chat/completions" if chat else "/v1/completions"
        key, denied = await self.authorize(request)
        if denied:
            return denied
        try:
            forward, messages = await self.parse(request, chat)
        except BadRequest as exc:
            return exc.response(413 if exc.code == "request_too_large" else 400)
        try:
            state = await self.run_screen(self.screener.conversation_state, messages)
        except TimeoutError as exc:
            return error(503, f"{exc}; the request was not served", "screening_timeout")
        decision = state.decision()
        await self.audit.write(key, route, "input", json.dumps(messages, ensure_ascii=False), decision)
        if not decision.allowed:
            self.record_block("input", decision)
            return error(400, f"the request was blocked by the content policy ({', '.join(decision.categories)})",
                         "content_filter", "messages" if chat else "prompt")
        if not forward.get("stream"):
            try:
                return await self.respond(route, forward, key, chat, state)
            except TimeoutError as exc:
                return error(503, f"{exc}; the reply was withheld", "screening_timeout")
        try:
            upstream, refused = await self.open_stream(route, forward)
        except httpx.HTTPError as exc:
            return error(503, f"the model server is unavailable ({type(exc).__name__})", "upstream_unavailable")
        if refused is not None:
            return refused
        return StreamingResponse(self.stream(upstream, route, key, chat, state), media_type="text/event-stream",
                                 headers=self.marking_headers)

    def _build(self) -> FastAPI:
        """The app: lifespan, error shapes, limits and metrics, then the routes, one method each."""
        docs = {} if self.cfg.openapi_docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
        app = FastAPI(title="llmtune gateway", version="1", lifespan=self._lifespan, **docs)
        self._error_handlers(app)
        self._limits_and_metrics(app)
        self._health_routes(app)
        self._model_routes(app)
        self._tokenize_routes(app)
        self._completion_routes(app)
        app.state.metrics = self.metrics
        app.state.gateway = self
        return app

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: FastAPI):
        """The upstream client and the metrics port for the app's life; the screen pools after it."""
        cfg = self.cfg
        self.client = httpx.AsyncClient(base_url=self.upstream, timeout=httpx.Timeout(cfg.upstream_timeout_s, connect=5))
        metrics_server = None
        if cfg.metrics_port:
            from prometheus_client import start_http_server

            metrics_server, _ = start_http_server(cfg.metrics_port, addr=cfg.metrics_host, registry=self.metrics.registry)
        yield
        await self.client.aclose()
        self.pool.shutdown(wait=False)
        self.state_pool.shutdown(wait=False)
        if metrics_server is not None:
            metrics_server.shutdown()

    def _error_handlers(self, app: FastAPI) -> None:
        """Every error is an OpenAI-style JSON error object; a store or limiter that is down is a 503."""
        @app.exception_handler(StarletteHTTPException)
        async def http_errors(request: Request, exc: StarletteHTTPException):
            return error(exc.status_code, str(exc.detail), "not_found" if exc.status_code == 404 else "invalid_request")

        @app.exception_handler(StoreUnavailable)
        @app.exception_handler(RateLimiterUnavailable)
        async def state_unavailable(request: Request, exc: Exception):
            return error(503, f"{exc}; retry later", "service_unavailable")

        @app.exception_handler(Exception)
        async def unexpected(request: Request, exc: Exception):
            return error(500, f"internal error ({type(exc).__name__}); see the gateway log", "internal_error")

    def _limits_and_metrics(self, app: FastAPI) -> None:
        """Header and body size limits before anything is read; request counts and latency per route."""
        cfg = self.cfg

        @app.middleware("http")
        async def size_and_metrics(request: Request, call_next):
            start = time.perf_counter()
            length = request.headers.get("content-length")
            header_bytes = sum(len(k) + len(v) + 4 for k, v in request.headers.raw)
            if header_bytes > cfg.max_header_bytes:
                response = error(431, f"request headers over {cfg.max_header_bytes} bytes", "headers_too_large")
            elif length is not None and (not length.isdigit() or int(length) > cfg.max_body_bytes):
                response = error(413, f"request body over {cfg.max_body_bytes} bytes", "request_too_large")
            else:
                response = await call_next(request)
            route = request.url.path if request.url.path in {"/v1/chat/completions", "/v1/completions", "/v1/models",
                                                             "/tokenize", "/health"} else "other"
            self.metrics.requests.labels(route, str(response.status_code)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - start)
            return response

    def _health_routes(self, app: FastAPI) -> None:
        """/health (the upstream's), and /metrics on the gateway port when configured (API key required)."""
        cfg = self.cfg

        @app.get("/health")
        async def health():
            try:
                r = await self.client.get("/health", timeout=3)
                ok = r.status_code == 200
            except httpx.HTTPError:
                ok = False
            return JSONResponse({"status": "ok" if ok else "unhealthy", "upstream": ok}, status_code=200 if ok else 503)

        if cfg.metrics_on_gateway:
            @app.get("/metrics")
            async def prometheus(request: Request):
                _, denied = await self.authorize(request)
                if denied:
                    return denied
                return PlainTextResponse(generate_latest(self.metrics.registry).decode(), media_type="text/plain; version=0.0.4")

    def _model_routes(self, app: FastAPI) -> None:
        """vLLM's model list as chat apps ask for it (OpenAI, SillyTavern's oobabooga probe)."""
        async def served_models(request: Request) -> tuple[list[dict] | None, JSONResponse | None]:
            """vLLM's model list for an authorised request, or the response that refuses it."""
            _, denied = await self.authorize(request)
            if denied:
                return None, denied
            try:
                r = await self.client.get("/v1/models", headers=self._headers())
            except httpx.HTTPError as exc:
                return None, error(503, f"the model server is unavailable ({type(exc).__name__})", "upstream_unavailable")
            if r.status_code != 200:
                return None, self._upstream_error(r.status_code, r.content)
            return r.json().get("data", []), None

        @app.get("/v1/models")
        @app.get("/models")  # SillyTavern's Custom source uses the URL as typed: without /v1 too
        async def models(request: Request):
            listed, refused = await served_models(request)
            if refused:
                return refused
            return JSONResponse({"object": "list", "data": [{**{k: m[k] for k in ("id", "object", "created", "owned_by") if k in m},
                                                             "llmtune": self.marking} for m in listed]})

        @app.get("/v1/internal/model/info")
        async def ooba_model_info(request: Request):
            # SillyTavern's default Text Completion type (oobabooga) asks this after /v1/models; a
            # 2xx turns on its backend token counting (/v1/internal/encode below).
            listed, refused = await served_models(request)
            if refused:
                return refused
            ids = [m.get("id") for m in listed]
            return JSONResponse({"model_name": ids[0] if ids else "", "lora_names": ids[1:]})

    def _tokenize_routes(self, app: FastAPI) -> None:
        """Token counts for chat apps that count on the backend; nothing is generated, so nothing is screened."""
        cfg = self.cfg

        @app.post("/tokenize")
        @app.post("/v1/tokenize")
        @app.post("/v1/internal/encode")
        async def tokenize(request: Request):
            # SillyTavern's Text Completion counts tokens on the backend ("Best match" tokenizer):
            # one call per piece of the prompt (`{"prompt"}`; oobabooga's route: `{"text"}`). Nothing
            # is generated, so nothing is screened; the reply is the count only (never token ids).
            _, denied = await self.authorize(request)
            if denied:
                return denied
            raw = await request.body()
            if len(raw) > cfg.max_body_bytes:
                return error(413, f"request body over {cfg.max_body_bytes} bytes", "request_too_large")
            try:
                body = json.loads(raw)
            except (ValueError, UnicodeDecodeError):
                return error(400, "the request body is not valid JSON", "invalid_json")
            ooba = request.url.path.endswith("/internal/encode")
            field = "text" if ooba else "prompt"
            if not isinstance(body, dict) or not isinstance(body.get(field), str):
                return error(400, f"`{field}` must be a string", "invalid_request", field)
            forward = {k: body[k] for k in ("model", "prompt", "add_special_tokens") if k in body}
            if ooba:
                forward = {"prompt": body["text"]}  # vLLM counts with the served model's tokenizer
            try:
                r = await self.client.post("/tokenize", json=forward, headers=self._headers())
            except httpx.HTTPError as exc:
                return error(503, f"the model server is unavailable ({type(exc).__name__})", "upstream_unavailable")
            if r.status_code != 200:
                return self._upstream_error(r.status_code, r.content)
            data = r.json()
            if ooba:
                return JSONResponse({"length": data.get("count")})
            return JSONResponse({k: data[k] for k in ("count", "max_model_len") if k in data})

    def _completion_routes(self, app: FastAPI) -> None:
        """Chat and text completions: screened in, screened out (`completion`)."""
        @app.post("/v1/chat/completions", openapi_extra={"requestBody": {"required": True, "content": {
            "application/json": {"schema": CHAT_REQUEST_SCHEMA}}}})
        async def chat_completions(request: Request):
            return await self.completion(request, chat=True)

        app.add_api_route("/chat/completions", chat_completions, methods=["POST"], include_in_schema=False)

        @app.post("/v1/completions", openapi_extra={"requestBody": {"required": True, "content": {
            "application/json": {"schema": COMPLETION_REQUEST_SCHEMA}}}})
        async def completions(request: Request):
            return await self.completion(request, chat=False)


def create_app(cfg: ServeConfig, upstream: str, screener, keys: Store, audit: AuditLog | None = None,
               upstream_key: str | None = None, tokenizer=None, limiter: KeyRateLimiter | None = None,
               watermark: str | None = None) -> FastAPI:
    return Gateway(cfg, upstream, screener, keys, audit, upstream_key, tokenizer, limiter, watermark).app
