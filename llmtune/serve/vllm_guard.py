"""ASGI middleware loaded INTO the managed vLLM server (`--middleware llmtune.serve.vllm_guard.RequireKey`).

vLLM's own `--api-key` guards only /v1, /v2 and /inference; /invocations (the same inference
under SageMaker's name), /tokenize, /metrics and the rest stay open to any local process. This
requires the gateway's key on every path but /health, so nothing on the machine can reach the
model around the gateway. The key comes from LLMTUNE_VLLM_KEY in vLLM's environment, set by
llmtune.serve.vllm_server and known only to the gateway.
"""

from __future__ import annotations

import hmac
import json
import os

OPEN_PATHS = ("/health",)


class RequireKey:
    def __init__(self, app):
        self.app = app
        self.key = os.environ.get("LLMTUNE_VLLM_KEY", "")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("path") in OPEN_PATHS or not self.key:
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"authorization", b"").decode("latin-1")
        if hmac.compare_digest(given, f"Bearer {self.key}"):
            return await self.app(scope, receive, send)
        body = json.dumps({"error": {"message": "this server only answers the llmtune gateway", "type": "invalid_request_error",
                                     "code": "invalid_api_key"}}).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
