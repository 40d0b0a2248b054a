"""vLLM killed mid-stream: a clean error event for the client, /health unhealthy, then back after a restart."""

from __future__ import annotations

import os
import signal
import time

import httpx
import openai
import pytest
from openai import OpenAI

from llmtune.moderation import load_screener
from llmtune.moderation.policy import ModerationConfig
from llmtune.serve.config import ServeConfig
from llmtune.serve.gateway import create_app
from llmtune.serve.keys import AgeVerification
from llmtune.serve.run import GatewayThread
from llmtune.serve.store import open_store
from llmtune.serve.vllm_server import VLLMConfig, VLLMServer, VLLMSupervisor

pytestmark = [pytest.mark.slow, pytest.mark.vllm]


def test_vllm_killed_mid_stream_then_restarted(merged_run, tmp_path):
    run_dir = merged_run.run_dir
    cfg = ServeConfig(store=str(tmp_path / "llmtune.db"), screen_window_chars=4)
    keys = open_store(cfg.store)
    key, _ = keys.add("adult", AgeVerification("id-document", "test", "2026-11-25"))
    server = VLLMServer(VLLMConfig(model=str(run_dir / "merged"), served_name="mara", dtype="float32", max_model_len=2048),
                        log_path=tmp_path / "vllm.log")
    # The tiny model's temperature-1 tokens are gibberish, and the classifier has scored such a run of
    # them 0.79 for illegal_instructions (CI, 2026-12-01): the reply was withheld before the kill and the
    # test saw a policy stop instead of the upstream failure it is about. Only the hard floor screens here.
    screener = load_screener(ModerationConfig(enabled=False))
    with VLLMSupervisor(server, backoff_s=1) as sup, GatewayThread(create_app(cfg, server.base_url, screener, keys, upstream_key=server.cfg.api_key)) as gw:
        client = OpenAI(base_url=f"{gw.base_url}/v1", api_key=key, max_retries=0)
        stream = client.chat.completions.create(
            model="mara", messages=[{"role": "user", "content": "Tell me a long story."}], max_tokens=1900,
            temperature=1.0, seed=0, stream=True, extra_body={"ignore_eos": True})
        got_text, error = "", None
        try:
            for i, chunk in enumerate(stream):
                if chunk.choices:
                    got_text += chunk.choices[0].delta.content or ""
                if i == 2:  # ~1,900 tokens ignore_eos: vLLM is still generating when this chunk arrives
                    os.killpg(server.proc.pid, signal.SIGKILL)
        except openai.APIError as exc:
            error = exc
        assert error is not None and "failed mid-stream" in str(error), (error, got_text)
        health = httpx.get(f"{gw.base_url}/health", timeout=10)
        assert health.status_code == 503 and health.json()["status"] == "unhealthy"
        deadline = time.time() + 540
        # Healthy again once the supervisor's restart has returned (vLLM may answer /health a moment earlier).
        while time.time() < deadline and not (sup.restarts and httpx.get(f"{gw.base_url}/health", timeout=10).status_code == 200):
            time.sleep(2)
        assert sup.restarts == 1
        r = client.chat.completions.create(model="mara", messages=[{"role": "user", "content": "Hello"}], max_tokens=4,
                                           temperature=0.0)
        # Served again: a whole reply (vLLM may give content None when the first sampled token ends it).
        assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens >= 1
