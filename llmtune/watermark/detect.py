"""`llmtune watermark detect`: is this text a reply of this deployment?

Entry points: `detect_text(req, text)` and `detect_file(req, input, output)`. The key is the one
`llmtune serve` uses from the same place (the serve config's `store`, or --store, or
$LLMTUNE_WATERMARK_SECRET); the tokenizer is the served model's (a run or model directory, as
`llmtune serve` takes). The text is what the client received: the gateway changes no token of a
released reply, so streamed and plain replies score alike; a blocked reply's withheld notice is
simply text without the watermark.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from llmtune.errors import LlmtuneError
from llmtune.jsonl import json_objects
from llmtune.watermark.scheme import Detection, WatermarkKey, detect_tokens


class DetectError(LlmtuneError):
    """A detection input that cannot be read or has no text to score."""


@dataclass
class DetectRequest:
    target: Path  # run directory, model directory, or a directory with tokenizer.json
    key: WatermarkKey
    p_value: float = 1e-3
    field: str = "text"


def served_tokenizer_path(target: Path) -> Path:
    """tokenizer.json of what `llmtune serve TARGET` serves."""
    target = Path(target)
    if (target / "tokenizer.json").is_file():
        return target / "tokenizer.json"
    if (target / "recipe.yaml").exists():
        from llmtune.artifacts import served_model

        model = Path(served_model(target).model)
        if (model / "tokenizer.json").is_file():
            return model / "tokenizer.json"
    raise DetectError(f"{target}: no tokenizer.json here; give the run or model directory `llmtune serve` serves")


class Detector:
    def __init__(self, req: DetectRequest):
        from tokenizers import Tokenizer

        self.req = req
        self.tokenizer = Tokenizer.from_file(str(served_tokenizer_path(req.target)))
        self.tables = req.key.tables(self.tokenizer.get_vocab_size(with_added_tokens=True))

    def __call__(self, text: str) -> Detection:
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        return detect_tokens(ids, self.req.key, self.req.p_value, self.tables)


def detect_text(req: DetectRequest, text: str) -> Detection:
    return Detector(req)(text)


def detect_file(req: DetectRequest, source: Path, out: Path) -> tuple[int, int]:
    """Write every row of `source` to `out` with `watermarked` and `p_value` added; returns (rows, watermarked)."""
    detector = Detector(req)
    rows, marked = [], 0
    for _, where, row in json_objects(source, "--input", DetectError):
        if not isinstance(row.get(req.field), str):
            raise DetectError(f"{where}: no string field `{req.field}`; name the text field with --field")
        d = detector(row[req.field])
        rows.append({**row, "watermarked": d.watermarked, "p_value": d.p_value})
        marked += d.watermarked
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return len(rows), marked
