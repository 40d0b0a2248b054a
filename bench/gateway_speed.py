"""Gateway overhead against direct vLLM, measured in the same run on the same server.

    .venv/bin/python bench/gateway_speed.py [--model embedded:smollm2-135m-instruct] [--requests 20]
    .venv/bin/python bench/gateway_speed.py --platform   # 2 replicas, PostgreSQL + Redis

One vLLM server (CPU: float32, eager) on loopback; the gateway (real screen, real keys) in
front of it: by default one in-process gateway on the SQLite store; with --platform two gateway
processes (replicas) on one PostgreSQL store and one Redis rate-limit storage, real servers
started on loopback (Debian's postgresql and redis-server, as in the tests), requests spread
round-robin over the replicas as a load balancer would. For 32-token chat completions
(ignore_eos, so every reply is 32 tokens): p50 latency of single requests (direct and gateway
interleaved), then throughput at concurrency 8. Targets: p50 ratio <= 1.10, throughput ratio >= 0.90.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

from openai import OpenAI

CHAT = [{"role": "system", "content": "You are Captain Mara Vell of the airship Kestrel."},
        {"role": "user", "content": "Tell me about the ship, deckhand style."}]


def one(client: OpenAI, model: str, tokens: int) -> float:
    start = time.perf_counter()
    r = client.chat.completions.create(model=model, messages=CHAT, max_tokens=tokens, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == tokens, r.usage
    return time.perf_counter() - start


def throughput(clients: list[OpenAI], model: str, tokens: int, concurrency: int, total: int) -> float:
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(lambda i: one(clients[i % len(clients)], model, tokens), range(total)))
    return total * tokens / (time.perf_counter() - start)


def measure(direct: OpenAI, gateways: list[OpenAI], args) -> tuple[float, float, float, float, int]:
    for c in (direct, *gateways):  # warm up every path
        one(c, "m", args.tokens)
    lat_d, lat_g = [], []
    for i in range(args.requests):
        lat_d.append(one(direct, "m", args.tokens))
        lat_g.append(one(gateways[i % len(gateways)], "m", args.tokens))
    # Alternate direct and gateway rounds so drift in the machine's speed hits both alike.
    total = args.concurrency * 4
    rounds_d, rounds_g = [], []
    for _ in range(args.rounds):
        rounds_d.append(throughput([direct], "m", args.tokens, args.concurrency, total))
        rounds_g.append(throughput(gateways, "m", args.tokens, args.concurrency, total))
    return (statistics.median(lat_d), statistics.median(lat_g), statistics.mean(rounds_d), statistics.mean(rounds_g),
            total)


def platform(args, vcfg, tmp: str) -> tuple:
    """Two gateway processes on PostgreSQL + Redis in front of one vLLM."""
    import sys
    from pathlib import Path

    import yaml

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/servers.py starts the real servers

    from llmtune.serve.keys import AgeVerification
    from llmtune.serve.store import open_store
    from llmtune.serve.vllm_server import VLLMServer
    from tests.servers import GatewayProcess, PostgresServer, RedisServer

    with PostgresServer() as pg, RedisServer() as redis:
        url = pg.new_database()
        key, _ = open_store(url).add("bench", AgeVerification("bench", "bench", "2026-11-25"))
        config = Path(tmp) / "gateway.yaml"
        config.write_text(yaml.safe_dump({"store": url, "rate_limit_storage": redis.url, "upstream_api_key": vcfg.api_key,
                                          "rate_limit": {"requests_per_minute": 100_000, "burst": 1000}}))
        with VLLMServer(vcfg) as vllm:
            replicas = [GatewayProcess(config, vllm.base_url, Path(tmp) / f"gw{i}.log").start() for i in range(2)]
            try:
                for r in replicas:
                    r.wait_ready()
                direct = OpenAI(base_url=f"{vllm.base_url}/v1", api_key=vcfg.api_key, max_retries=0)
                gateways = [OpenAI(base_url=f"{r.base_url}/v1", api_key=key, max_retries=0) for r in replicas]
                return measure(direct, gateways, args)
            finally:
                for r in replicas:
                    r.stop()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="embedded:smollm2-135m-instruct")
    ap.add_argument("--requests", type=int, default=20)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3, help="throughput rounds per path, alternating")
    ap.add_argument("--platform", action="store_true", help="2 gateway processes on PostgreSQL + Redis")
    args = ap.parse_args()

    from llmtune.models import resolve_base
    from llmtune.moderation import load_screener
    from llmtune.serve.config import RateLimit, ServeConfig
    from llmtune.serve.gateway import create_app
    from llmtune.serve.keys import AgeVerification
    from llmtune.serve.run import GatewayThread
    from llmtune.serve.store import open_store
    from llmtune.serve.vllm_server import VLLMConfig, VLLMServer

    vcfg = VLLMConfig(model=resolve_base(args.model), served_name="m", dtype="float32", max_model_len=1024)
    with tempfile.TemporaryDirectory() as tmp:
        if args.platform:
            p50_d, p50_g, tput_d, tput_g, total = platform(args, vcfg, tmp)
            setup = "2 gateway replicas (processes), PostgreSQL store, Redis rate limits, round-robin"
        else:
            cfg = ServeConfig(store=f"{tmp}/llmtune.db", rate_limit=RateLimit(requests_per_minute=100_000, burst=1000))
            keys = open_store(cfg.store)
            key, _ = keys.add("bench", AgeVerification("bench", "bench", "2026-11-25"))
            with VLLMServer(vcfg) as vllm, GatewayThread(create_app(cfg, vllm.base_url, load_screener(cfg.moderation), keys,
                                                                    upstream_key=vcfg.api_key)) as gw:
                direct = OpenAI(base_url=f"{vllm.base_url}/v1", api_key=vcfg.api_key, max_retries=0)
                gateway = OpenAI(base_url=f"{gw.base_url}/v1", api_key=key, max_retries=0)
                p50_d, p50_g, tput_d, tput_g, total = measure(direct, [gateway], args)
            setup = "1 in-process gateway, SQLite store, in-memory rate limits"
    print(f"setup: {setup}")
    print(f"model {args.model}, {args.tokens}-token chat completions, vLLM CPU float32 eager")
    print(f"p50 latency: direct {p50_d * 1000:.0f} ms, gateway {p50_g * 1000:.0f} ms -> ratio {p50_g / p50_d:.3f} (target <= 1.10)")
    print(f"throughput at concurrency {args.concurrency} (mean of {args.rounds} alternating rounds of {total} requests): "
          f"direct {tput_d:.1f} tok/s, gateway {tput_g:.1f} tok/s "
          f"-> ratio {tput_g / tput_d:.3f} (target >= 0.90)")


if __name__ == "__main__":
    main()
