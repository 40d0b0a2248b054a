"""Real PostgreSQL and Redis servers on loopback for the tests (Debian's `postgresql` and
`redis-server` packages; `make test` installs them), and gateway processes in front of an upstream."""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx

from llmtune.distributed import free_port
from llmtune.serve.vllm_server import LOOPBACK

REPO = Path(__file__).resolve().parents[1]


def _wait(check, what: str, log: Path, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode}:\n{log.read_text(errors='replace')[-3000:]}")
        if check():
            return
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not start in {timeout:.0f} s:\n{log.read_text(errors='replace')[-3000:]}")


class PostgresServer:
    """initdb + postgres in a temporary directory, trust auth on 127.0.0.1 only. As root, runs as `postgres`."""

    def __init__(self):
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
        if not found:
            raise RuntimeError("PostgreSQL is not installed: `make test` installs Debian's postgresql "
                               "(or: apt-get install postgresql)")
        self.bin = Path(found[-1]).parent
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="llmtune-pg-"))
        self.data = self.dir / "data"
        self.log = self.dir / "postgres.log"
        self.proc: subprocess.Popen | None = None

    def _as_owner(self, cmd: list[str]) -> list[str]:
        return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@{LOOPBACK}:{self.port}/{database}"

    def __enter__(self) -> "PostgresServer":
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres")
        subprocess.run(self._as_owner([str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust",
                                       "--no-sync", "-E", "UTF8"]), check=True, capture_output=True)
        with self.log.open("w") as log:
            if os.geteuid() == 0:
                shutil.chown(self.log, "postgres")
            self.proc = subprocess.Popen(
                self._as_owner([str(self.bin / "postgres"), "-D", str(self.data), "-h", LOOPBACK, "-p", str(self.port),
                                "-k", str(self.dir), "-c", "max_connections=200"]),
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

        def ready() -> bool:
            import psycopg

            try:
                psycopg.connect(f"host={LOOPBACK} port={self.port} user=postgres dbname=postgres", connect_timeout=2).close()
                return True
            except psycopg.OperationalError:
                return False

        _wait(ready, "postgres", self.log, self.proc)
        return self

    def new_database(self) -> str:
        """A fresh, empty database; its SQLAlchemy URL."""
        import psycopg

        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(f"host={LOOPBACK} port={self.port} user=postgres dbname=postgres", autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def __exit__(self, *exc) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # smart shutdown
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
        shutil.rmtree(self.dir, ignore_errors=True)


class RedisServer:
    def __init__(self):
        exe = shutil.which("redis-server")
        if not exe:
            raise RuntimeError("redis-server is not installed: `make test` installs Debian's redis-server")
        self.exe = exe
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="llmtune-redis-"))
        self.log = self.dir / "redis.log"
        self.url = f"redis://{LOOPBACK}:{self.port}/0"

    def __enter__(self) -> "RedisServer":
        with self.log.open("w") as log:
            self.proc = subprocess.Popen([self.exe, "--bind", LOOPBACK, "--port", str(self.port), "--save", "",
                                          "--appendonly", "no", "--dir", str(self.dir)],
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        import redis

        def ready() -> bool:
            try:
                return redis.Redis(host=LOOPBACK, port=self.port, socket_timeout=2).ping()
            except redis.ConnectionError:
                return False

        _wait(ready, "redis-server", self.log, self.proc)
        return self

    def flush(self) -> None:
        import redis

        redis.Redis(host=LOOPBACK, port=self.port).flushall()

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)
        shutil.rmtree(self.dir, ignore_errors=True)


class GatewayProcess:
    """`llmtune serve --upstream URL` as its own process (a replica), on a loopback port."""

    def __init__(self, config: Path, upstream: str, log: Path, env: dict | None = None):
        self.port = free_port()
        self.base_url = f"http://{LOOPBACK}:{self.port}"
        self.log = log
        self.cmd = [sys.executable, "-m", "llmtune.cli", "serve", "--upstream", upstream, "--config", str(config),
                    "--host", LOOPBACK, "--port", str(self.port)]
        self.env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}

    def start(self) -> "GatewayProcess":
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=self.env)
        return self

    def wait_ready(self, timeout: float = 180) -> "GatewayProcess":
        def ready() -> bool:
            try:
                return httpx.get(f"{self.base_url}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        _wait(ready, f"gateway on port {self.port}", self.log, self.proc, timeout)
        return self

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()
