"""`llmtune serve` stops cleanly on SIGTERM (what systemd, supervisors and `docker stop` send):
in-flight streams finish, vLLM stops, nothing is left holding memory or a port."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import psutil
import pytest
import yaml

from llmtune.distributed import free_port
from llmtune.serve.keys import AgeVerification
from llmtune.serve.store import open_store
from tests.conftest import REPO

pytestmark = [pytest.mark.slow, pytest.mark.vllm]


def test_sigterm_finishes_streams_stops_vllm_and_exits(reply_run, tmp_path):
    keys = open_store(str(tmp_path / "llmtune.db"))
    key, _ = keys.add("adult", AgeVerification("id-document", "op", "2026-12-01"))
    port = free_port()
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump({"port": port, "store": str(tmp_path / "llmtune.db"), "shutdown_grace_s": 30}))
    proc = subprocess.Popen([sys.executable, "-m", "llmtune.cli", "serve", str(reply_run.run_dir), "--config", str(config),
                             "--max-model-len", "512"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 600
        while time.time() < deadline:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(1)
        children = psutil.Process(proc.pid).children(recursive=True)
        vllm = [c for c in children if "vllm" in " ".join(c.cmdline())]
        assert vllm, [c.cmdline() for c in children]

        got: dict = {}

        def stream():
            with httpx.stream("POST", f"{url}/v1/chat/completions", headers={"Authorization": f"Bearer {key}"}, timeout=120,
                              json={"model": reply_run.name, "messages": [{"role": "user", "content": "Tell me a long story."}],
                                    "max_tokens": 120, "stream": True, "temperature": 1.0, "ignore_eos": True}) as r:
                got["status"] = r.status_code
                got["lines"] = [line for line in r.iter_lines() if line.startswith("data: ")]

        t = threading.Thread(target=stream)
        t.start()
        time.sleep(1.5)
        os.kill(proc.pid, signal.SIGTERM)
        t.join(timeout=120)
        assert proc.wait(timeout=120) == 0
        assert got.get("status") == 200 and got["lines"][-1] == "data: [DONE]", got
        assert any(json.loads(line[6:]).get("choices") for line in got["lines"][:-1])
        deadline = time.time() + 60
        while time.time() < deadline and any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in vllm):
            time.sleep(1)
        assert not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in vllm), "vLLM outlived the gateway"
    finally:
        if proc.poll() is None:
            proc.kill()
