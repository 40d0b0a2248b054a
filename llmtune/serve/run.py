"""`llmtune serve`: vLLM on loopback + the moderated gateway on the public port, one command.

Entry point: `serve(ServeRequest)`. A run directory serves its merged model when there is one,
else its base with the adapter; a model directory serves as is; `--adapter name=path` adds
LoRA adapters by model name. Ctrl-C stops the gateway and vLLM cleanly. `serve_gateway(cfg,
upstream)` runs the gateway alone in front of a vLLM that runs elsewhere (another container).
"""

from __future__ import annotations

import contextlib
import signal

from dataclasses import dataclass, field
from pathlib import Path

from llmtune.console import console
from llmtune.errors import LlmtuneError
from llmtune.serve.config import ServeConfig
from llmtune.serve.vllm_server import VLLMConfig, VLLMServer, VLLMSupervisor


@dataclass
class ServeRequest:
    target: Path
    config: ServeConfig
    adapters: dict[str, str] = field(default_factory=dict)
    enforce_eager: bool = VLLMConfig.enforce_eager
    tensor_parallel_size: int = VLLMConfig.tensor_parallel_size
    max_model_len: int = VLLMConfig.max_model_len


def vllm_config_for(req: ServeRequest) -> VLLMConfig:
    """What vLLM should load for a run directory or a model directory."""
    from llmtune.artifacts import served_model
    from llmtune.models import device_type

    served_by = served_model(req.target, adapters=req.adapters)
    model, served, adapters = served_by.model, served_by.served_name, served_by.adapters
    dtype = "float32" if device_type() == "cpu" else VLLMConfig.dtype
    rank = max([_adapter_rank(p) for p in adapters.values()] or [16])
    return VLLMConfig(model=model, served_name=served, adapters=adapters, max_lora_rank=rank, dtype=dtype,
                      enforce_eager=req.enforce_eager, tensor_parallel_size=req.tensor_parallel_size,
                      max_model_len=req.max_model_len)


def _adapter_rank(path: str) -> int:
    import json

    r = json.loads((Path(path) / "adapter_config.json").read_text()).get("r", 16)
    return next(x for x in (8, 16, 32, 64, 128, 256, 320, 512) if x >= r)


def open_gateway_state(cfg: ServeConfig):
    """The store (schema migrated) and the rate limiter the gateway uses, with what they are printed."""
    from llmtune.serve.ratelimit import KeyRateLimiter
    from llmtune.serve.store import open_store

    store = open_store(cfg.store)
    limiter = KeyRateLimiter(cfg.rate_limit_storage, cfg.rate_limit, cfg.key_rate_limits)
    shared = "shared by every replica" if not cfg.rate_limit_storage.startswith("memory") else "this process only"
    console.print(f"  keys and audit: {store.display}; rate limits: {limiter.display} ({shared})")
    if not any(k.age_verification and not k.revoked for k in store.records):
        console.print(f"[yellow]warning[/]: no age-verified key in {store.display}; every request will be refused. "
                      "Add one: llmtune keys add NAME --age-verified-by METHOD")
    return store, limiter


def served_tokenizer(model: str):
    """The served model's fast tokenizer (tokenizer.json), for the gateway's context check; None if it has none."""
    from tokenizers import Tokenizer

    path = Path(model) / "tokenizer.json"
    return Tokenizer.from_file(str(path)) if path.is_file() else None


class _Stop(Exception):
    """Raised by the signal handler while vLLM is still starting: unwind and stop it."""


@contextlib.contextmanager
def _stop_on_signals(box: dict):
    """SIGTERM (systemd, docker stop), SIGINT (Ctrl-C), SIGHUP (closed terminal): stop taking
    requests, let in-flight streams finish within shutdown_grace_s, then unwind (stopping vLLM)."""
    def stop(signum, _frame):
        console.print(f"[bold]serve[/]: {signal.Signals(signum).name}: shutting down")
        uv = box.get("server")
        if uv is None:
            raise _Stop()
        if uv.should_exit:
            uv.force_exit = True  # a second signal: stop waiting for in-flight streams
        uv.should_exit = True

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        yield
    except _Stop:
        pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _run_gateway(cfg: ServeConfig, upstream: str, store, limiter, screener, box: dict, upstream_key: str | None = None,
                 tokenizer=None, watermark: str | None = None) -> None:
    import uvicorn

    from llmtune.serve.gateway import Gateway

    gateway = Gateway(cfg, upstream, screener, store, upstream_key=upstream_key, tokenizer=tokenizer, limiter=limiter,
                      watermark=watermark)
    config = uvicorn.Config(gateway.app, host=cfg.host, port=cfg.port, log_level="warning",
                            h11_max_incomplete_event_size=cfg.max_header_bytes, timeout_graceful_shutdown=cfg.shutdown_grace_s)
    uv = uvicorn.Server(config)
    # Ours stay in place: uvicorn's would ignore SIGHUP, and after a graceful stop it re-raises
    # SIGTERM with the default handler, which kills this process before it stops vLLM (that was
    # how `kill` left an orphaned vLLM holding its memory and port).
    uv.capture_signals = contextlib.nullcontext
    box["server"] = uv
    uv.run()


def watermark_for(cfg: ServeConfig, store, vcfg: VLLMConfig) -> str | None:
    """Give vLLM the deployment's watermark key (made now if this store has none); the scheme, or None when off."""
    from llmtune.watermark.scheme import SCHEME
    from llmtune.watermark.secret import deployment_key

    if not cfg.watermark.enabled:
        console.print("  watermark: [yellow]off[/] (watermark.enabled: false); replies are still marked x-llmtune-generated")
        return None
    vcfg.watermark, vcfg.watermark_delta = deployment_key(store, cfg.watermark.gamma), cfg.watermark.delta
    console.print(f"  watermark: {SCHEME} (delta {cfg.watermark.delta:g}, gamma {cfg.watermark.gamma:g}), secret "
                  f"{vcfg.watermark.fingerprint} from {store.display}; check a reply: llmtune watermark detect --text ...")
    return SCHEME


def serve(req: ServeRequest) -> None:
    from llmtune.moderation import load_screener

    cfg = req.config
    box: dict = {}
    with _stop_on_signals(box):
        store, limiter = open_gateway_state(cfg)
        screener = load_screener(cfg.moderation)
        vcfg = vllm_config_for(req)
        cfg.max_context_tokens = vcfg.max_model_len
        watermark = watermark_for(cfg, store, vcfg)
        console.print(f"[bold]serve[/]: starting vLLM on loopback ({vcfg.model}) ...")
        server = VLLMServer(vcfg)
        with VLLMSupervisor(server):  # restarts vLLM if it dies; /health is 503 until it is back
            served = [vcfg.served_name, *vcfg.adapters]
            console.print(f"  vLLM ready at {server.base_url} (loopback only, answers only the gateway's key); "
                          f"models: {', '.join(served)}")
            console.print(f"[bold green]gateway[/]: http://{cfg.host}:{cfg.port}/v1 (Ctrl-C or SIGTERM stops both)")
            _run_gateway(cfg, server.base_url, store, limiter, screener, box, vcfg.api_key, served_tokenizer(vcfg.model),
                         watermark)
    console.print("stopped")


def serve_gateway(cfg: ServeConfig, upstream: str) -> None:
    """The gateway alone, in front of a vLLM server at `upstream` that something else runs (its
    key, if it has one, from `upstream_api_key` or $LLMTUNE_UPSTREAM_KEY)."""
    import os

    from llmtune.moderation import load_screener

    box: dict = {}
    with _stop_on_signals(box):
        store, limiter = open_gateway_state(cfg)
        screener = load_screener(cfg.moderation)
        console.print("  watermark: reported as none (this gateway cannot tell whether its upstream vLLM watermarks; "
                      "docs/serving.md#inside-vllm-and-async-scheduling)")
        console.print(f"[bold green]gateway[/]: http://{cfg.host}:{cfg.port}/v1 in front of {upstream} (Ctrl-C stops it)")
        _run_gateway(cfg, upstream.rstrip("/"), store, limiter, screener, box,
                     cfg.upstream_api_key or os.environ.get("LLMTUNE_UPSTREAM_KEY"))
    console.print("stopped")


class GatewayThread:
    """The gateway app on loopback in a background thread (tests, `llmtune chat RUN_DIR`)."""

    def __init__(self, app, port: int = 0, max_header_bytes: int = 16_384):
        import threading

        import uvicorn

        from llmtune.distributed import free_port
        from llmtune.serve.vllm_server import LOOPBACK

        self.port = port or free_port()
        self.base_url = f"http://{LOOPBACK}:{self.port}"
        config = uvicorn.Config(app, host=LOOPBACK, port=self.port, log_level="warning",
                                h11_max_incomplete_event_size=max_header_bytes)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "GatewayThread":
        import time

        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise LlmtuneError("the gateway did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
