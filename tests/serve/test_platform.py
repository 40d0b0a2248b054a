"""A platform's gateway: several replicas (separate processes) on one PostgreSQL store and one
Redis, all real servers on loopback. Revocation and rate limits hold across replicas; a replica
killed mid-request has committed the audit row of every request it answered."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import yaml

from llmtune.serve.keys import AgeVerification
from llmtune.serve.run import GatewayThread
from llmtune.serve.store import open_store
from tests.conftest import run_cli
from tests.fake_vllm import create_fake_vllm
from tests.servers import GatewayProcess

VERIFIED = AgeVerification("id-document", "test operator", "2026-11-25")
CHAT = [{"role": "system", "content": "You are Mara."}, {"role": "user", "content": "What is the ship called?"}]


def gateway_config(tmp_path, name: str, **settings) -> str:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(settings))
    return path


def replicas(tmp_path, config, upstream: str, count: int = 2) -> list[GatewayProcess]:
    procs = [GatewayProcess(config, upstream, tmp_path / f"gateway-{i}.log").start() for i in range(count)]
    return [p.wait_ready() for p in procs]


def chat(gw: GatewayProcess, key: str, content: str = "What is the ship called?", stream: bool = False, **kw) -> httpx.Response:
    body = {"model": kw.pop("model", "fake"), "messages": [CHAT[0], {"role": "user", "content": content}],
            "max_tokens": 24, "temperature": 0, "stream": stream, **kw}
    return httpx.post(f"{gw.base_url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"},
                      timeout=120)


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.multiproc
def test_two_replicas_on_real_vllm_revoke_through_the_cli_gets_401_on_both(merged_run, postgres, redis_server, tmp_path):
    from llmtune.serve.vllm_server import VLLMConfig, VLLMServer

    url = postgres.new_database()
    store = open_store(url)
    key, record = store.add("adult", VERIFIED)
    vcfg = VLLMConfig(model=str(merged_run.run_dir / "merged"), served_name="mara", dtype="float32", max_model_len=512)
    config = gateway_config(tmp_path, "gw", store=url, rate_limit_storage=redis_server.url, upstream_api_key=vcfg.api_key,
                            rate_limit={"requests_per_minute": 6000, "burst": 100})
    with VLLMServer(vcfg, log_path=tmp_path / "vllm.log") as vllm:
        gws = replicas(tmp_path, config, vllm.base_url)
        try:
            for gw in gws:
                r = chat(gw, key, model="mara")
                assert r.status_code == 200, r.text
                assert "Kestrel" in r.json()["choices"][0]["message"]["content"]
            rows = store.audit_rows(record.id)
            assert [r["stage"] for r in rows] == ["input", "output"] * 2 and all(r["allowed"] for r in rows)
            done = run_cli("keys", "revoke", "adult", "--reason", "verification withdrawn", "--store", url)
            assert done.returncode == 0, done.stderr
            for gw in gws:  # the very next request, no restart
                r = chat(gw, key, model="mara")
                assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", r.text
            listed = run_cli("keys", "list", "--store", url)
            assert "revoked" in listed.stdout and "verification withdrawn" in listed.stdout
            assert key not in listed.stdout and record.sha256 not in listed.stdout
        finally:
            for gw in gws:
                gw.stop()


@pytest.mark.slow
@pytest.mark.multiproc
def test_a_rate_limit_shared_by_two_replicas_allows_exactly_the_configured_burst(postgres, redis_server, tmp_path):
    url = postgres.new_database()
    store = open_store(url)
    # The key's own limit: 6 at once, then 1 a minute (so nothing refills during the test).
    key, _ = store.add("bursty", VERIFIED, requests_per_minute=1, burst=6)
    other, _ = store.add("other", VERIFIED)
    config = gateway_config(tmp_path, "gw", store=url, rate_limit_storage=redis_server.url)
    with GatewayThread(create_fake_vllm()) as upstream:
        gws = replicas(tmp_path, config, upstream.base_url)
        try:
            with ThreadPoolExecutor(10) as pool:  # all at once, spread over both replicas
                codes = list(pool.map(lambda i: chat(gws[i % 2], key, f"Request {'abcdefghijklmnopqrst'[i]}").status_code, range(20)))
            assert sorted(codes) == [200] * 6 + [429] * 14, codes
            per_replica = [[c for i, c in enumerate(codes) if i % 2 == r] for r in (0, 1)]
            assert all(429 in codes_ for codes_ in per_replica)  # each replica refuses once the shared count is spent
            assert chat(gws[0], other).status_code == 200  # another key has its own count
        finally:
            for gw in gws:
                gw.stop()


@pytest.mark.slow
@pytest.mark.multiproc
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_replica_killed_mid_request_loses_no_audit_row_of_a_request_it_answered(backend, postgres, tmp_path):
    url = str(tmp_path / "llmtune.db") if backend == "sqlite" else postgres.new_database()
    store = open_store(url)
    key, record = store.add("adult", VERIFIED)
    config = gateway_config(tmp_path, "gw", store=url, audit_content=True, screen_window_chars=8,
                            rate_limit={"requests_per_minute": 60_000, "burst": 1000})
    answered: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()
    # Slow, echoing upstream: requests overlap, and each reply names its request.
    with GatewayThread(create_fake_vllm(delay_s=0.05, echo=True)) as upstream:
        gw = replicas(tmp_path, config, upstream.base_url, count=1)[0]

        def client(worker: int) -> None:
            for i in range(10_000):
                if stop.is_set():
                    return
                marker, streamed = f"m{worker}x{i}q", bool(i % 2)
                try:
                    r = chat(gw, key, f"Say {marker}", stream=streamed, max_tokens=6)
                except httpx.HTTPError:
                    return  # the replica died under this request: it was not answered
                if r.status_code == 200 and (not streamed or r.text.rstrip().endswith("data: [DONE]")):
                    with lock:
                        answered.append(marker)

        threads = [threading.Thread(target=client, args=(w,)) for w in range(8)]
        for t in threads:
            t.start()
        deadline = time.time() + 60
        while len(answered) < 40 and time.time() < deadline:
            time.sleep(0.05)
        gw.kill()  # SIGKILL, requests in flight
        stop.set()
        for t in threads:
            t.join(timeout=60)
    assert len(answered) >= 40
    rows = store.audit_rows(record.id)
    inputs = {r["content"] for r in rows if r["stage"] == "input"}
    outputs = " ".join(r["content"] for r in rows if r["stage"] == "output")
    missing = [m for m in answered if not any(f"Say {m}\"" in c for c in inputs) or m not in outputs]
    assert not missing, f"{len(missing)} of {len(answered)} answered requests have no audit row: {missing[:5]}"


def test_an_unreachable_store_or_rate_limit_storage_is_a_503_never_an_unchecked_request(tmp_path):
    from llmtune.moderation import load_screener
    from llmtune.serve.config import ServeConfig
    from llmtune.serve.gateway import create_app
    from llmtune.serve.store import Store
    from llmtune.distributed import free_port

    store = open_store(str(tmp_path / "llmtune.db"))
    key, _ = store.add("adult", VERIFIED)
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    no_redis = ServeConfig(store=str(tmp_path / "llmtune.db"), rate_limit_storage=f"redis://{dead}/0")
    no_db = ServeConfig(store=f"postgresql://postgres:s3cret@{dead}/llmtune")
    screener = load_screener(no_redis.moderation)
    with GatewayThread(create_fake_vllm()) as upstream, \
            GatewayThread(create_app(no_redis, upstream.base_url, screener, store)) as gw_redis, \
            GatewayThread(create_app(no_db, upstream.base_url, screener, Store(no_db.store, migrate_schema=False))) as gw_db:
        for gw, what in ((gw_redis, "rate-limit storage"), (gw_db, "key and audit store")):
            r = httpx.post(f"{gw.base_url}/v1/chat/completions", json={"model": "fake", "messages": CHAT},
                           headers={"Authorization": f"Bearer {key}"}, timeout=60)
            assert r.status_code == 503 and r.json()["error"]["code"] == "service_unavailable", r.text
            assert what in r.json()["error"]["message"] and "s3cret" not in r.text
    assert store.audit_rows() == []  # nothing was screened or answered
