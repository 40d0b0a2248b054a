"""The gateway: an OpenAI-compatible endpoint in front of vLLM that screens everything.

`create_app(...)` builds the FastAPI app. Per request: API key (401 unknown, 403 without an
age-verification record) -> rate limit (429) -> size limits (413) -> parameter check (only
parameters that cannot smuggle unscreened text through pass) -> every message screened
(400 with code `content_filter` when blocked) -> vLLM on loopback -> output screened: whole
for plain responses, in a sliding window for streams, so no text reaches the client before
it was screened (a block ends the response with finish_reason `content_filter`). Every
decision goes to the audit table: key id, time, categories, content hash.

The state behind a request lives outside the process (llmtune/serve/store.py, ratelimit.py):
the key is looked up in the store on every request, the rate limit is counted in the shared
`limits` storage, and each audit row is committed before what it decided is sent, so any
number of replicas can serve the same keys.
"""

from __future__ import annotations

import asyncio
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

from llmtune.serve.config import ServeConfig
from llmtune.serve.keys import KeyRecord
from llmtune.serve.ratelimit import KeyRateLimiter, RateLimiterUnavailable
from llmtune.serve.store import AuditLog, Store, StoreUnavailable

# Sampling parameters chat apps send (SillyTavern included); anything else is dropped.
PASSTHROUGH = {
    "model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "min_p",
    "repetition_penalty", "presence_penalty", "frequency_penalty", "stop", "stop_token_ids", "seed", "stream",
    "stream_options", "n", "user", "logit_bias", "min_tokens", "typical_p", "length_penalty", "ignore_eos",
    "include_stop_str_in_output", "response_format",
}
# Parameters that would put text in front of the client or the model without screening.
REFUSED = {
    "chat_template": "would replace the chat template with unscreened text",
    "chat_template_kwargs": "would inject unscreened template variables",
    "documents": "would add unscreened documents to the prompt",
    "tools": "tool definitions are not screened; this endpoint serves chat only",
    "logprobs": "log-probabilities reveal unscreened alternative tokens",
    "top_logprobs": "log-probabilities reveal unscreened alternative tokens",
    "prompt_logprobs": "log-probabilities reveal unscreened alternative tokens",
    "echo": "echo is not supported",
    "best_of": "only one completion per request is supported",
    "suffix": "suffix is not supported",
    "continue_final_message": "would continue an unscreened partial reply",
    "skip_special_tokens": "special tokens are handled by the server",
    "mm_processor_kwargs": "multimodal input is not supported",
}


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
        "properties": {"role": {"type": "string"}, "content": {"type": "string"}}}}},
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


def message_texts(body: dict) -> list[dict]:
    """The request's text as messages for the screen (chat messages or completion prompts)."""
    if "messages" in body:
        return body["messages"]
    prompt = body.get("prompt")
    prompts = prompt if isinstance(prompt, list) else [prompt]
    return [{"role": "user", "content": p} for p in prompts]


def validate_request(body: dict, chat: bool, cfg: ServeConfig) -> tuple[dict | None, JSONResponse | None]:
    """The body to forward (refused parameters rejected, unknown ones dropped), or an error."""
    if not isinstance(body, dict):
        return None, error(400, "the request body must be a JSON object", "invalid_request")
    for name, why in REFUSED.items():
        if body.get(name) not in (None, False, 0):
            return None, error(400, f"`{name}` is not accepted here: {why}", "unsupported_parameter", name)
    if chat:
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            return None, error(400, "`messages` must be a non-empty list", "invalid_request", "messages")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                return None, error(400, f"messages[{i}] must be an object with a `role`", "invalid_request", "messages")
            content = m.get("content")
            parts_ok = isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content)
            if not (content is None or isinstance(content, str) or parts_ok):
                return None, error(400, f"messages[{i}].content must be text", "invalid_request", "messages")
    else:
        prompt = body.get("prompt")
        if not (isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt))):
            return None, error(400, "`prompt` must be a string or a list of strings", "invalid_request", "prompt")
    if body.get("n", 1) != 1:
        return None, error(400, "only n=1 is supported", "unsupported_parameter", "n")
    limit = body.get("max_tokens") or body.get("max_completion_tokens")
    if limit is not None and (not isinstance(limit, int) or limit > cfg.max_tokens_limit or limit < 1):
        return None, error(400, f"max_tokens must be an integer from 1 to {cfg.max_tokens_limit}", "invalid_request", "max_tokens")
    return {k: v for k, v in body.items() if k in PASSTHROUGH}, None


def create_app(cfg: ServeConfig, upstream: str, screener, keys: Store, audit: AuditLog | None = None,
               limiter: KeyRateLimiter | None = None) -> FastAPI:
    audit = audit or AuditLog(keys, cfg.audit_content)
    limiter = limiter or KeyRateLimiter(cfg.rate_limit_storage, cfg.rate_limit, cfg.key_rate_limits)
    metrics = Metrics.create()
    # Key lookups and rate-limit hits are network calls (database, Redis): threads, off the event loop.
    state_pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="state")
    # One thread screens: the encoder is CPU-bound and the event loop must keep streaming.
    screen_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="screen")
    state: dict = {}

    async def lifespan(app: FastAPI):
        state["client"] = httpx.AsyncClient(base_url=upstream, timeout=httpx.Timeout(cfg.upstream_timeout_s, connect=5))
        yield
        await state["client"].aclose()
        screen_pool.shutdown(wait=False)
        state_pool.shutdown(wait=False)

    app = FastAPI(title="llmtune gateway", version="1", lifespan=lifespan)

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

    async def screen(fn, *args):
        # fast: the screen skips work that cannot change a decision (plain text with no cue any
        # rule or adapter gate needs); the decision is the full screen's.
        return await asyncio.get_running_loop().run_in_executor(screen_pool, functools.partial(fn, fast=True), *args)

    def record_block(stage: str, decision) -> None:
        for category in decision.categories or ["unspecified"]:
            metrics.blocks.labels(stage, category).inc()

    def check_key(key: str) -> tuple[KeyRecord | None, int]:
        """The key's record and the status it earns: 200, 401 unknown or revoked, 403 unverified, 429 over its limit."""
        record = keys.lookup(key) if key else None  # no cache: a revocation holds from the next request on
        if record is None:
            return None, 401
        if record.age_verification is None:
            return record, 403
        return record, 200 if limiter.allow(record) else 429

    async def authorize(request: Request) -> tuple[KeyRecord | None, JSONResponse | None]:
        header = request.headers.get("authorization", "")
        key = header[7:].strip() if header.lower().startswith("bearer ") else request.headers.get("x-api-key", "")
        record, status = await asyncio.get_running_loop().run_in_executor(state_pool, check_key, key)
        if status == 401:
            return None, error(401, "missing or invalid API key (Authorization: Bearer KEY)", "invalid_api_key")
        if status == 403:
            return None, error(403, "this key has no age-verification record; this service is for verified adults only",
                               "age_verification_required")
        if status == 429:
            return None, error(429, "rate limit exceeded for this key; retry later", "rate_limit_exceeded")
        return record, None

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
                                                         "/health", "/metrics"} else "other"
        metrics.requests.labels(route, str(response.status_code)).inc()
        metrics.latency.labels(route).observe(time.perf_counter() - start)
        return response

    @app.get("/health")
    async def health():
        try:
            r = await state["client"].get("/health", timeout=3)
            ok = r.status_code == 200
        except httpx.HTTPError:
            ok = False
        return JSONResponse({"status": "ok" if ok else "unhealthy", "upstream": ok}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(generate_latest(metrics.registry).decode(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(request: Request):
        _, denied = await authorize(request)
        if denied:
            return denied
        try:
            r = await state["client"].get("/v1/models")
        except httpx.HTTPError as exc:
            return error(503, f"the model server is unavailable ({type(exc).__name__})", "upstream_unavailable")
        data = r.json()
        return JSONResponse({"object": "list", "data": [{k: m[k] for k in ("id", "object", "created", "owned_by") if k in m}
                                                        for m in data.get("data", [])]})

    async def completion(request: Request, chat: bool):
        route = "/v1/chat/completions" if chat else "/v1/completions"
        key, denied = await authorize(request)
        if denied:
            return denied
        raw = await request.body()
        if len(raw) > cfg.max_body_bytes:
            return error(413, f"request body over {cfg.max_body_bytes} bytes", "request_too_large")
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            return error(400, "the request body is not valid JSON", "invalid_json")
        forward, bad = validate_request(body, chat, cfg)
        if bad:
            return bad
        messages = message_texts(forward)
        decision = await screen(screener.screen_conversation, messages)
        await audit.write(key, route, "input", json.dumps(messages, ensure_ascii=False), decision)
        if not decision.allowed:
            record_block("input", decision)
            return error(400, f"the request was blocked by the content policy ({', '.join(decision.categories)})",
                         "content_filter", "messages" if chat else "prompt")
        if forward.get("stream"):
            return StreamingResponse(stream(route, forward, key, chat), media_type="text/event-stream")
        return await respond(route, forward, key, chat)

    def text_of(choice: dict, chat: bool) -> str:
        if chat:
            return (choice.get("message") or {}).get("content") or ""
        return choice.get("text") or ""

    def delta_text(choice: dict, chat: bool) -> str:
        if chat:
            return (choice.get("delta") or {}).get("content") or ""
        return choice.get("text") or ""

    async def respond(route: str, body: dict, key: KeyRecord, chat: bool):
        try:
            r = await state["client"].post(route, json=body)
        except httpx.HTTPError as exc:
            return error(503, f"the model server is unavailable ({type(exc).__name__})", "upstream_unavailable")
        if r.status_code != 200:
            try:
                return JSONResponse(r.json(), status_code=r.status_code)
            except ValueError:
                return error(502, "the model server returned an invalid response", "upstream_error")
        data = r.json()
        for choice in data.get("choices", []):
            text = text_of(choice, chat)
            decision = await screen(screener.screen, text)
            await audit.write(key, route, "output", text, decision)
            if not decision.allowed:
                record_block("output", decision)
                if chat:
                    choice["message"]["content"] = ""
                else:
                    choice["text"] = ""
                choice["finish_reason"] = "content_filter"
        return JSONResponse(data)

    def sse(obj: dict | str) -> str:
        return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n"

    async def stream(route: str, body: dict, key: KeyRecord, chat: bool) -> AsyncIterator[str]:
        """Relay vLLM's stream, releasing text only in screened windows."""
        released, pending = "", ""
        shell: dict = {}
        sent_role = False

        def chunk(text: str | None, finish: str | None) -> dict:
            out = {k: shell.get(k) for k in ("id", "object", "created", "model")}
            if chat:
                delta: dict = {}
                if not sent_role:
                    delta["role"] = "assistant"
                if text:
                    delta["content"] = text
                out["choices"] = [{"index": 0, "delta": delta, "finish_reason": finish}]
            else:
                out["choices"] = [{"index": 0, "text": text or "", "finish_reason": finish}]
            return out

        try:
            async with state["client"].stream("POST", route, json=body) as r:
                if r.status_code != 200:
                    detail = (await r.aread()).decode(errors="replace")[:500]
                    yield sse(error_body(f"the model server refused the request: {detail}", "upstream_error", "server_error"))
                    yield sse("[DONE]")
                    return
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    payload = line[6:].strip()
                    if payload == "[DONE]":
                        break
                    event = json.loads(payload)
                    if not shell:
                        shell = event
                    usage = event.get("usage")
                    choices = event.get("choices") or []
                    if not choices:
                        if usage:
                            yield sse({**{k: shell.get(k) for k in ("id", "object", "created", "model")}, "choices": [], "usage": usage})
                        continue
                    choice = choices[0]
                    pending += delta_text(choice, chat)
                    finish = choice.get("finish_reason")
                    if len(pending) < cfg.screen_window_chars and not finish:
                        continue
                    window = released[-cfg.screen_context_chars:] + pending if cfg.screen_context_chars else pending
                    decision = await screen(screener.screen, window)
                    await audit.write(key, route, "output", window, decision)
                    if not decision.allowed:
                        record_block("output", decision)
                        yield sse(chunk(None, "content_filter"))
                        yield sse("[DONE]")
                        return
                    # Hold back a trailing partial word: a term split across windows ("Kest" + "rel")
                    # must be screened whole before any of it is released.
                    cut = len(pending) if finish else max(pending.rfind(" "), pending.rfind("\n")) + 1
                    if not cut and len(pending) < 4 * cfg.screen_window_chars:
                        continue
                    out = pending[: cut or len(pending)]
                    if out or finish:
                        yield sse(chunk(out, finish))
                        sent_role = True
                        released, pending = released + out, pending[len(out):]
                if pending:  # the stream ended without a finish reason: screen what is left
                    decision = await screen(screener.screen, released[-cfg.screen_context_chars:] + pending)
                    await audit.write(key, route, "output", pending, decision)
                    if not decision.allowed:
                        record_block("output", decision)
                        yield sse(chunk(None, "content_filter"))
                    else:
                        yield sse(chunk(pending, None))
        except (httpx.HTTPError, json.JSONDecodeError) as exc:
            yield sse(error_body(f"the model server failed mid-stream ({type(exc).__name__})", "upstream_unavailable", "server_error"))
        yield sse("[DONE]")

    @app.post("/v1/chat/completions", openapi_extra={"requestBody": {"required": True, "content": {
        "application/json": {"schema": CHAT_REQUEST_SCHEMA}}}})
    async def chat_completions(request: Request):
        return await completion(request, chat=True)

    @app.post("/v1/completions", openapi_extra={"requestBody": {"required": True, "content": {
        "application/json": {"schema": COMPLETION_REQUEST_SCHEMA}}}})
    async def completions(request: Request):
        return await completion(request, chat=False)

    app.state.metrics = metrics
    return app
