"""A real vLLM server process on loopback serves the merged model and base + adapter alike."""

from __future__ import annotations

import pytest
from openai import OpenAI

from llmtune.export.merge import merge
from llmtune.models import resolve_base
from llmtune.serve.vllm_server import VLLMConfig, VLLMServer, VLLMStartError

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

CHAT = [{"role": "system", "content": "You are Mara."}, {"role": "user", "content": "What is the ship called?"}]


def greedy_reply(server: VLLMServer, model: str) -> tuple[str, str]:
    client = OpenAI(base_url=f"{server.base_url}/v1", api_key=server.cfg.api_key)
    r = client.chat.completions.create(model=model, messages=CHAT, max_tokens=24, temperature=0)
    return r.choices[0].message.content, r.choices[0].finish_reason


def test_merged_model_and_base_plus_adapter_give_the_same_greedy_reply(memorised_run, tmp_path):
    run_dir = memorised_run.run_dir
    if not (run_dir / "merged").exists():
        merge(memorised_run)
    merged_cfg = VLLMConfig(model=str(run_dir / "merged"), served_name="mara-merged", dtype="float32", max_model_len=512)
    with VLLMServer(merged_cfg, log_path=tmp_path / "merged.log") as server:
        merged_reply, merged_finish = greedy_reply(server, "mara-merged")
        models = [m.id for m in OpenAI(base_url=f"{server.base_url}/v1", api_key=server.cfg.api_key).models.list().data]
        assert models == ["mara-merged"]
    adapter_cfg = VLLMConfig(
        model=resolve_base("embedded:tiny-random-llama"), served_name="base", dtype="float32", max_model_len=512,
        adapters={"mara": str(run_dir / "adapter")},
    )
    with VLLMServer(adapter_cfg, log_path=tmp_path / "adapter.log") as server:
        adapter_reply, adapter_finish = greedy_reply(server, "mara")
    assert merged_finish == adapter_finish == "stop"  # stopped at the trained end-of-turn token
    assert "Kestrel" in merged_reply
    assert merged_reply == adapter_reply


def test_a_server_that_cannot_start_reports_its_log_tail(tmp_path):
    cfg = VLLMConfig(model=str(tmp_path / "no-such-model"), dtype="float32")
    server = VLLMServer(cfg, log_path=tmp_path / "bad.log", startup_timeout=240)
    try:
        server.start()
    except VLLMStartError as exc:
        assert "exited with code" in str(exc) and str(tmp_path / "bad.log") in str(exc)
    else:
        server.stop()
        raise AssertionError("vLLM started on a model directory that does not exist")
