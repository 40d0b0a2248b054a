"""The review's SQLite file: the pairs generated ahead of time and the judge's verdicts.

One file per comparison (`runs/A/review/vs-B/review.sqlite`). Every verdict is committed
as it is made, so closing the page, the browser or the command loses nothing; opening it
again resumes at the first pair without a verdict. Replies the moderation screen blocked
are never stored: only that they were withheld, and why.
"""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path

from llmtune.errors import LlmtuneError

SCHEMA_VERSION = 1
VERDICTS = ("run_a", "run_b", "tie", "both_bad")

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY,               -- the order pairs are shown in
    kind TEXT NOT NULL CHECK (kind IN ('prompt', 'conversation')),
    source TEXT NOT NULL,                 -- where the chat came from: eval.prompts[0], val.jsonl:3
    messages TEXT NOT NULL,               -- JSON chat the replies answer; ends with a user turn
    reply_a TEXT,                         -- NULL when withheld
    reply_b TEXT,
    withheld_a TEXT,                      -- NULL, or why the screen blocked RUN_A's reply
    withheld_b TEXT,
    a_on_left INTEGER NOT NULL CHECK (a_on_left IN (0, 1))
);
CREATE TABLE IF NOT EXISTS judgments (
    item_id INTEGER PRIMARY KEY REFERENCES items(id),
    verdict TEXT NOT NULL CHECK (verdict IN ('run_a', 'run_b', 'tie', 'both_bad')),
    note TEXT NOT NULL DEFAULT '',
    judged_at TEXT NOT NULL
);
"""


class ReviewError(LlmtuneError):
    """A review cannot be opened, judged or exported as asked."""


@dataclass
class Item:
    id: int
    kind: str
    source: str
    messages: list[dict]
    reply_a: str | None
    reply_b: str | None
    withheld_a: str | None
    withheld_b: str | None
    a_on_left: bool

    @property
    def shown(self) -> bool:
        """Both replies passed the screen, so the pair can be judged."""
        return self.reply_a is not None and self.reply_b is not None


@dataclass
class Judgment:
    item_id: int
    verdict: str
    note: str
    judged_at: str


class ReviewStore:
    """Typed access to one review file. Connections are short-lived: the server's threads share nothing."""

    def __init__(self, path: Path):
        self.path = Path(path)

    @contextmanager
    def _db(self):
        with closing(sqlite3.connect(self.path, timeout=30)) as con:
            con.row_factory = sqlite3.Row
            con.execute("PRAGMA foreign_keys = ON")
            with con:  # one transaction: committed on success, rolled back on error
                yield con

    # -- creation ---------------------------------------------------------------------------

    @classmethod
    def create(cls, path: Path, meta: dict[str, str], items: list[Item]) -> ReviewStore:
        """Write a new review file atomically (a half-written one never looks complete)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".partial")
        tmp.unlink(missing_ok=True)
        store = cls(tmp)
        with store._db() as con:
            con.executescript(SCHEMA)
            con.executemany("INSERT INTO meta VALUES (?, ?)",
                            [("schema_version", str(SCHEMA_VERSION)), *sorted(meta.items())])
            con.executemany(
                "INSERT INTO items VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(i.id, i.kind, i.source, json.dumps(i.messages, ensure_ascii=False), i.reply_a, i.reply_b,
                  i.withheld_a, i.withheld_b, int(i.a_on_left)) for i in items],
            )
        tmp.replace(path)
        return cls(path)

    @classmethod
    def open(cls, path: Path) -> ReviewStore:
        if not path.is_file():
            raise ReviewError(f"no review at {path}; start one with `llmtune review RUN_A [RUN_B|base]`")
        store = cls(path)
        version = store.meta().get("schema_version")
        if version != str(SCHEMA_VERSION):
            raise ReviewError(f"{path} has review schema version {version}, this llmtune reads {SCHEMA_VERSION}; "
                              "start a new review with --fresh (the old file is kept)")
        return store

    # -- reading ----------------------------------------------------------------------------

    def meta(self) -> dict[str, str]:
        with self._db() as con:
            return {r["key"]: r["value"] for r in con.execute("SELECT key, value FROM meta")}

    def items(self) -> list[Item]:
        with self._db() as con:
            return [_item(r) for r in con.execute("SELECT * FROM items ORDER BY id")]

    def item(self, item_id: int) -> Item | None:
        with self._db() as con:
            row = con.execute("SELECT * FROM items WHERE id = ?", (item_id,)).fetchone()
        return _item(row) if row else None

    def judgments(self) -> dict[int, Judgment]:
        with self._db() as con:
            return {r["item_id"]: Judgment(r["item_id"], r["verdict"], r["note"], r["judged_at"])
                    for r in con.execute("SELECT * FROM judgments")}

    def next_item(self) -> Item | None:
        """The first pair that can be judged and has no verdict yet."""
        with self._db() as con:
            row = con.execute(
                "SELECT * FROM items WHERE reply_a IS NOT NULL AND reply_b IS NOT NULL "
                "AND id NOT IN (SELECT item_id FROM judgments) ORDER BY id LIMIT 1"
            ).fetchone()
        return _item(row) if row else None

    def progress(self) -> dict[str, int]:
        with self._db() as con:
            total, shown = con.execute(
                "SELECT COUNT(*), COALESCE(SUM(reply_a IS NOT NULL AND reply_b IS NOT NULL), 0) FROM items").fetchone()
            judged = con.execute("SELECT COUNT(*) FROM judgments").fetchone()[0]
        return {"judged": judged, "to_judge": shown, "withheld": total - shown, "pairs": total}

    # -- writing ----------------------------------------------------------------------------

    def judge(self, item_id: int, verdict: str, note: str = "") -> Judgment:
        """Record (or replace) the verdict on one pair."""
        if verdict not in VERDICTS:
            raise ReviewError(f"verdict `{verdict}` is not one of {', '.join(VERDICTS)}")
        item = self.item(item_id)
        if item is None:
            raise ReviewError(f"pair {item_id} is not in {self.path}")
        if not item.shown:
            raise ReviewError(f"pair {item_id} has a reply withheld by the moderation screen; it cannot be judged")
        j = Judgment(item_id, verdict, note.strip(), dt.datetime.now(dt.UTC).isoformat(timespec="microseconds"))
        with self._db() as con:
            con.execute("INSERT OR REPLACE INTO judgments VALUES (?, ?, ?, ?)", (j.item_id, j.verdict, j.note, j.judged_at))
        return j

    def undo_last(self) -> int | None:
        """Remove the most recent verdict; returns its pair's id (None when nothing was judged)."""
        with self._db() as con:
            row = con.execute("SELECT item_id FROM judgments ORDER BY judged_at DESC, rowid DESC LIMIT 1").fetchone()
            if row is None:
                return None
            con.execute("DELETE FROM judgments WHERE item_id = ?", (row["item_id"],))
            return row["item_id"]


def _item(row: sqlite3.Row) -> Item:
    return Item(row["id"], row["kind"], row["source"], json.loads(row["messages"]), row["reply_a"], row["reply_b"],
                row["withheld_a"], row["withheld_b"], bool(row["a_on_left"]))
