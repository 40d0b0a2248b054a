"""A stand-in for vLLM's OpenAI server (unit tests of the gateway under fuzzing and load only;
the end-to-end tests use a real vLLM process)."""

from __future__ import annotations

import asyncio
import json
import random
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

REPLY = "Aye, deckhand, the Kestrel sails at dawn past the copper cliffs."


def create_fake_vllm(delay_s: float = 0.0, echo: bool = False) -> FastAPI:
    """delay_s: each reply (and each streamed word) waits up to this long, at random; echo: the
    reply starts with the last message's last word, so a test can tell whose reply it is."""
    app = FastAPI()

    async def pause():
        if delay_s:
            await asyncio.sleep(random.uniform(0, delay_s))

    @app.get("/health")
    async def health():
        return JSONResponse({})

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "fake", "object": "model", "created": 0, "owned_by": "test"}]}

    async def complete(request: Request, chat: bool):
        body = await request.json()
        reply = REPLY
        if echo:
            last = body["messages"][-1]["content"] if chat else body["prompt"]
            reply = f"{str(last).split()[-1]} {REPLY}"
        words = reply.split(" ")[: max(1, min(int(body.get("max_tokens") or 12), 12))]
        await pause()
        base = {"id": "cmpl-1", "object": "chat.completion.chunk" if chat else "text_completion", "created": int(time.time()),
                "model": body.get("model", "fake")}
        if body.get("stream"):
            async def events():
                for i, w in enumerate(words):
                    await pause()
                    text = (" " if i else "") + w
                    finish = "stop" if i == len(words) - 1 else None
                    choice = {"index": 0, "delta": {"content": text}, "finish_reason": finish} if chat else \
                        {"index": 0, "text": text, "finish_reason": finish}
                    yield f"data: {json.dumps({**base, 'choices': [choice]})}\n\n"
                yield "data: [DONE]\n\n"
            return StreamingResponse(events(), media_type="text/event-stream")
        text = " ".join(words)
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"} if chat else \
            {"index": 0, "text": text, "finish_reason": "stop"}
        return {**base, "object": "chat.completion" if chat else "text_completion", "choices": [choice],
                "usage": {"prompt_tokens": 5, "completion_tokens": len(words), "total_tokens": 5 + len(words)}}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await complete(request, True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await complete(request, False)

    return app
