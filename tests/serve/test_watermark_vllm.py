"""The watermark end to end: `llmtune serve` (real vLLM with the logits processor, the real gateway)
on the tiny random model, once with the watermark (on by default: the secret is made at this first
serve) and once with `watermark.enabled: false`; replies sampled at temperature 1.0, plain and
streamed, scored as the client received them, with the CLI from the same place."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import httpx
import pytest
import yaml

from llmtune.serve.keys import AgeVerification
from llmtune.serve.store import open_store
from llmtune.distributed import free_port
from llmtune.watermark.detect import DetectRequest, Detector
from llmtune.watermark.scheme import SCHEME, WatermarkKey
from llmtune.watermark.secret import SECRET_ENV, deployment_key
from tests.conftest import REPO, run_cli

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

MESSAGES = [{"role": "system", "content": "You are Mara, captain of the Kestrel."},
            {"role": "user", "content": "Tell me about the voyage north."}]


class Serve:
    """`llmtune serve MODEL --config CONFIG` as a process; `.url` once healthy."""

    def __init__(self, model: str, tmp, watermark: dict):
        self.store = str(tmp / "llmtune.db")
        self.key, _ = open_store(self.store).add("adult", AgeVerification("id-document", "op", "2026-12-01"))
        self.port = free_port()
        self.config = tmp / "gateway.yaml"
        # Only the hard floor screens here: the tiny random model's temperature-1 gibberish can score
        # high on a configurable category (0.79 illegal_instructions in CI, 2026-12-01), and a withheld
        # reply would leave the detector a 9-token notice instead of the 200 tokens this test is about.
        self.config.write_text(yaml.safe_dump({"port": self.port, "store": self.store, "watermark": watermark,
                                               "moderation": {"enabled": False}}))
        self.log = (tmp / "serve.log").open("w")
        self.proc = subprocess.Popen([sys.executable, "-m", "llmtune.cli", "serve", model, "--config", str(self.config),
                                      "--max-model-len", "1024"], cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={k: v for k, v in os.environ.items() if k != SECRET_ENV})
        self.url = f"http://127.0.0.1:{self.port}"
        self.model = os.path.basename(model)  # `llmtune serve` names a model directory's model after it
        self.log_path = tmp / "serve.log"

    def wait(self) -> "Serve":
        deadline = time.time() + 900
        while time.time() < deadline:
            assert self.proc.poll() is None, self.log_path.read_text()[-4000:]
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise AssertionError(f"llmtune serve did not become healthy:\n{self.log_path.read_text()[-4000:]}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()

    def reply(self, seed: int, stream: bool) -> tuple[str, httpx.Headers, list[dict]]:
        body = {"model": self.model, "messages": MESSAGES, "max_tokens": 200, "temperature": 1.0,
                "ignore_eos": True, "seed": seed, "stream": stream}
        auth = {"Authorization": f"Bearer {self.key}"}
        if not stream:
            r = httpx.post(f"{self.url}/v1/chat/completions", json=body, headers=auth, timeout=300)
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["message"]["content"], r.headers, [r.json()]
        with httpx.stream("POST", f"{self.url}/v1/chat/completions", json=body, headers=auth, timeout=300) as r:
            assert r.status_code == 200
            events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ") and line != "data: [DONE]"]
            text = "".join((e["choices"][0].get("delta") or {}).get("content") or "" for e in events if e.get("choices"))
            return text, r.headers, events


@pytest.fixture(scope="module")
def deployments(tmp_path_factory):
    from llmtune.models import resolve_base

    model = resolve_base("embedded:tiny-random-llama")
    marked = Serve(model, tmp_path_factory.mktemp("marked"), {"enabled": True})
    plain = Serve(model, tmp_path_factory.mktemp("plain"), {"enabled": False})
    try:
        yield {"model": model, "marked": marked.wait(), "plain": plain.wait()}
    finally:
        marked.stop()
        plain.stop()


def test_plain_and_streamed_replies_are_detected_and_marked(deployments, monkeypatch):
    monkeypatch.delenv(SECRET_ENV, raising=False)
    marked = deployments["marked"]
    key = deployment_key(open_store(marked.store), 0.25, create=False)  # made by this first serve, kept in its store
    detect = Detector(DetectRequest(deployments["model"], key))
    for seed in (1, 2):
        for stream in (False, True):
            text, headers, events = marked.reply(seed, stream)
            d = detect(text)
            assert d.scored >= 100 and d.watermarked and d.p_value < 1e-6, (stream, d, text[:200])
            assert headers["x-llmtune-generated"] == "true" and headers["x-llmtune-watermark"] == SCHEME
            assert all(e["llmtune"] == {"generated": True, "watermark": SCHEME} for e in events)
            assert not Detector(DetectRequest(deployments["model"], WatermarkKey(b"another deployment")))(text).watermarked
    models = httpx.get(f"{marked.url}/v1/models", headers={"Authorization": f"Bearer {marked.key}"}).json()["data"]
    assert models[0]["llmtune"] == {"generated": True, "watermark": SCHEME}
    assert f"watermark: {SCHEME}" in marked.log_path.read_text() and key.fingerprint in marked.log_path.read_text()


def test_the_same_model_served_without_the_watermark_is_not_detected(deployments):
    marked, plain = deployments["marked"], deployments["plain"]
    key = deployment_key(open_store(marked.store), 0.25, create=False)
    detect = Detector(DetectRequest(deployments["model"], key))
    for seed, stream in ((1, False), (2, True), (3, False)):
        text, headers, events = plain.reply(seed, stream)
        d = detect(text)
        assert d.scored >= 100 and not d.watermarked and d.p_value > 1e-3, d
        assert headers["x-llmtune-generated"] == "true" and headers["x-llmtune-watermark"] == "none"
        assert events[-1]["llmtune"] == {"generated": True, "watermark": None}
    models = httpx.get(f"{plain.url}/v1/models", headers={"Authorization": f"Bearer {plain.key}"}).json()["data"]
    assert models[0]["llmtune"]["watermark"] is None
    assert open_store(plain.store).deployment_secret("watermark/kgw-v1", create=False) is None  # off: no secret made


def test_detect_cli_from_the_same_place_finds_the_serve_secret(deployments, tmp_path):
    marked, plain = deployments["marked"], deployments["plain"]
    streamed, _, _ = marked.reply(7, stream=True)
    unmarked, _, _ = plain.reply(7, stream=False)
    r = run_cli("watermark", "detect", deployments["model"], "--config", str(marked.config), "--text", streamed,
                env={SECRET_ENV: ""})
    assert r.returncode == 0 and ": watermarked" in r.stdout and "p-value" in r.stdout, r.stdout + r.stderr
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"reply": t, "source": s}) + "\n" for t, s in ((streamed, "marked"), (unmarked, "plain"))))
    r = run_cli("watermark", "detect", deployments["model"], "--config", str(marked.config), "--input", str(rows),
                "--output", str(tmp_path / "out.jsonl"), "--field", "reply", env={SECRET_ENV: ""})
    assert r.returncode == 0, r.stderr
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [(o["source"], o["watermarked"]) for o in out] == [("marked", True), ("plain", False)]
    assert out[0]["reply"] == streamed
