"""JSON Lines: one reader whose errors name the file and the line, one writer."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from llmtune.errors import LlmtuneError


def json_objects(path: Path, what: str, error: type[LlmtuneError] = LlmtuneError) -> Iterator[tuple[int, str, dict]]:
    """(line number, "file:line", object) for every non-blank line of a JSON Lines file of `what`
    (named in the not-found message). A missing file, a line that is not JSON, or one that is not a
    JSON object raises `error` naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} not found: {path}")
    try:
        f = path.open(encoding="utf-8")
    except OSError as exc:
        raise error(f"cannot read {what} {path}: {exc.strerror}") from None
    with f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise error(f"{where}: not valid JSON ({exc.msg}); one JSON object per line") from None
            if not isinstance(obj, dict):
                raise error(f"{where}: not a JSON object; one JSON object per line")
            yield n, where, obj


def write_json_lines(path: Path, rows: Iterable[dict]) -> Path:
    """One JSON object per line (UTF-8, not ASCII-escaped)."""
    with Path(path).open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return Path(path)


def write_rejections(data_dir: Path, rejections: Iterable, duplicates: Iterable[dict]) -> Path:
    """prepare's quarantine.jsonl (every row left out, with its reason: `Rejection.to_json()`) and
    duplicates.jsonl in `data_dir`; returns the quarantine file."""
    write_json_lines(Path(data_dir) / "duplicates.jsonl", duplicates)
    return write_json_lines(Path(data_dir) / "quarantine.jsonl", (r.to_json() for r in rejections))
