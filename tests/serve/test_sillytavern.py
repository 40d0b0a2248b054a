"""An unmodified SillyTavern 1.12.6 works in both of its modes: its server's exact requests
(tests/fixtures/sillytavern/, captured from SillyTavern commit 648e70b8 and traced to its source
in the README there) replayed against the real gateway in front of a real vLLM server, and the
replies read the way SillyTavern reads them."""

from __future__ import annotations

import json

import httpx
import pytest

from llmtune.moderation import load_screener
from llmtune.serve.config import ServeConfig
from llmtune.serve.gateway import Gateway
from llmtune.serve.keys import AgeVerification
from llmtune.serve.store import open_store
from llmtune.serve.run import GatewayThread, served_tokenizer
from tests.conftest import REPO

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

FIXTURES = REPO / "tests" / "fixtures" / "sillytavern"
GENERATION = ["chat_custom", "chat_custom_stream", "text_vllm", "text_vllm_stream", "text_ooba", "text_aphrodite"]
# Captured with non-default settings (Multiple swipes per generation = 2, i.e. n and best_of 2).
EXTRAS = ["chat_custom_extras", "text_vllm_extras"]


def fixture(name: str) -> dict:
    return json.loads((FIXTURES / f"{name}.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def st(served, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sillytavern")
    keys = open_store(str(tmp / "llmtune.db"))
    key, _ = keys.add("st-user", AgeVerification("id-document", "test operator", "2026-12-01"))
    cfg = ServeConfig(store=str(tmp / "llmtune.db"), max_context_tokens=2048,
                      rate_limit={"requests_per_minute": 100_000, "burst": 1000})
    gateway = Gateway(cfg, served.base_url, load_screener(), keys, upstream_key=served.cfg.api_key,
                      tokenizer=served_tokenizer(served.cfg.model))
    with GatewayThread(gateway.app) as thread:
        yield thread.base_url, key


def send(st, name: str, body: dict | None = None) -> httpx.Response:
    url, key = st
    fx = fixture(name)
    headers = {k: v.replace("<API_KEY>", key) for k, v in fx["headers"].items()
               if k.lower() not in ("content-length", "host", "connection", "accept-encoding")}
    body = dict(fx["body"] if body is None else body)
    body["model"] = "mara"  # the user's model id
    return httpx.request(fx["method"], f"{url}{fx['path']}", json=body, headers=headers, timeout=600)


def read_like_sillytavern(name: str, r: httpx.Response) -> str:
    """What SillyTavern takes out of the reply: choices[0].message.content / choices[0].text, or
    the same from each SSE event's choices[0] when streaming."""
    chat = name.startswith("chat")
    if not fixture(name)["body"].get("stream"):
        choice = r.json()["choices"][0]
        return choice["message"]["content"] if chat else choice["text"]
    text = ""
    for line in r.text.splitlines():
        if line.startswith("data: ") and line[6:].strip() != "[DONE]":
            event = json.loads(line[6:])
            assert "error" not in event, event
            choice = event["choices"][0]
            text += ((choice.get("delta") or {}).get("content") or "") if chat else (choice.get("text") or "")
    return text


@pytest.mark.parametrize("name", GENERATION)
def test_every_default_sillytavern_request_is_served(st, name):
    body = fixture(name)["body"]
    if name.startswith("text"):
        assert len(body["stop"]) >= 5 and body.get("best_of", 1) == 1 and body["skip_special_tokens"] is True
    r = send(st, name)
    assert r.status_code == 200, r.text[:500]
    assert read_like_sillytavern(name, r).strip()


@pytest.mark.parametrize("name", EXTRAS)
def test_several_swipes_per_generation_are_a_clear_400(st, name):
    """n > 1 would put replies in front of the client that are screened one by one; the gateway
    asks for one (SillyTavern shows the message and "Multiple swipes per generation" can be 1)."""
    assert fixture(name)["body"]["n"] == 2
    r = send(st, name)
    assert r.status_code == 400 and r.json()["error"]["param"] in ("n", "best_of"), r.text
    body = {**fixture(name)["body"], "n": 1}
    body.pop("best_of", None)
    assert send(st, name, body).status_code == 200


def test_model_list_and_backend_token_counts(st):
    url, key = st
    models = fixture("models_request")["modes"]
    for mode, requests in models.items():
        for req in requests if isinstance(requests, list) else [requests]:
            headers = {k: v.replace("<API_KEY>", key) for k, v in req["headers"].items()
                       if k.lower() not in ("host", "connection", "accept-encoding")}
            r = httpx.request(req["method"], f"{url}{req['path']}", headers=headers, timeout=60)
            if req["path"].endswith("/internal/model/info"):  # oobabooga's route: enables backend token counts
                assert r.status_code == 200 and r.json()["model_name"] == "mara", (mode, r.text)
                continue
            assert r.status_code == 200 and [m["id"] for m in r.json()["data"]] == ["mara"], (mode, r.text)
    tok = fixture("tokenize_requests")["modes"]["text_vllm"]
    headers = {k: v.replace("<API_KEY>", key) for k, v in tok["headers"].items()
               if k.lower() not in ("host", "connection", "accept-encoding", "content-length")}
    r = httpx.post(f"{url}{tok['path']}", json={**tok.get("body", {"prompt": "Hello"}), "model": "mara"},
                   headers=headers, timeout=60)
    assert r.status_code == 200 and isinstance(r.json()["count"], int)
    # oobabooga's route (SillyTavern's default Text Completion type): {"text"} in, {"length"} out
    r = httpx.post(f"{url}/v1/internal/encode", json={"text": "Hello there"}, headers=headers, timeout=60)
    assert r.status_code == 200 and isinstance(r.json()["length"], int) and "tokens" not in r.json()


@pytest.mark.parametrize("name", ["text_vllm_stream", "chat_custom_stream"])
def test_refusals_reach_a_streaming_client_as_json_errors(st, name):
    body = dict(fixture(name)["body"])
    blocked = "asks for a sexual scene with a 15-year-old"  # a description of a request, never content
    if name.startswith("text"):
        body["prompt"] = body["prompt"] + blocked
    else:
        body["messages"] = [*body["messages"], {"role": "user", "content": blocked}]
    r = send(st, name, body)
    assert r.status_code == 400 and r.json()["error"]["code"] == "content_filter"
    # an upstream refusal keeps its status too (not a 200 with an error event SillyTavern cannot parse)
    url, key = st
    body = {**fixture(name)["body"], "model": "no-such-model"}  # vLLM refuses: the model does not exist
    r = httpx.post(f"{url}{fixture(name)['path']}", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=120)
    assert r.status_code == 404 and "error" in r.json(), r.text[:300]


def test_sixteen_stop_strings_pass(st):
    body = dict(fixture("text_vllm")["body"])
    body["stop"] = [*body["stop"], *[f"\n###{i}" for i in range(16 - len(body["stop"]))]]
    assert len(body["stop"]) == 16
    assert send(st, "text_vllm", body).status_code == 200
