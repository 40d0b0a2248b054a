"""Fail before the work, not after it: the run directory must be writable and have room."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from llmtune.errors import LlmtuneError


def cache_dir() -> Path:
    """Where llmtune caches what it builds per machine: converted embedded models, the precision
    probe (`LLMTUNE_CACHE`, default ~/.cache/llmtune)."""
    return Path(os.environ.get("LLMTUNE_CACHE", Path.home() / ".cache" / "llmtune"))


class StorageError(LlmtuneError):
    """The run directory cannot hold what the stage is about to write."""


def ensure_writable(directory: Path, need_bytes: int, what: str) -> None:
    """Create `directory`, prove a file can be written there, and check free space for `need_bytes`."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".write-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise StorageError(
            f"cannot write to {directory} ({exc.strerror or exc}); {what} would be lost. "
            "Make it writable or set output.dir to a writable location (e.g. output.dir=/tmp/runs)"
        ) from None
    free = shutil.disk_usage(directory).free
    if free < need_bytes:
        raise StorageError(
            f"{directory} has {free / 2**20:.0f} MiB free but {what} needs about {need_bytes / 2**20:.0f} MiB; "
            "free some space or set output.dir to another disk"
        )


def model_bytes(model_dir_or_id: str) -> int:
    """On-disk size of a local model directory (0 for hub ids: unknown here)."""
    path = Path(model_dir_or_id)
    if not path.is_dir():
        return 0
    return sum(f.stat().st_size for f in path.glob("*.safetensors")) or sum(f.stat().st_size for f in path.glob("*.bin"))


def file_sha256(path: Path) -> str:
    """sha256 of a file, read in 1 MiB blocks."""
    import hashlib

    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
