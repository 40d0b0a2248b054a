"""The review's parts around the browser test: the SQLite store, blind placement, the screen,
the statistics, the export shapes, the API and the report. The real page, real models and a
real browser are in test_review_browser.py."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from llmtune.review.export import export_judgments
from llmtune.review.generate import build_items, screen_reply
from llmtune.review.results import summarise, wilson_interval, write_results
from llmtune.review.store import Item, ReviewError, ReviewStore
from tests.conftest import run_cli

CHAT = [{"role": "system", "content": "You are Mara."}, {"role": "user", "content": "What is the ship called?"}]


def make_store(tmp_path: Path, n: int = 4, withheld: tuple[int, ...] = ()) -> ReviewStore:
    items = [
        Item(i, "prompt", f"eval.prompts[{i}]", [*CHAT[:1], {"role": "user", "content": f"question {i}"}],
             None if i in withheld else f"a{i}", f"b{i}", "blocked (x) by rules" if i in withheld else None, None,
             a_on_left=i % 2 == 1)
        for i in range(1, n + 1)
    ]
    return ReviewStore.create(tmp_path / "review" / "vs-base" / "review.sqlite", {"label_a": "mara-ft", "label_b": "mara-base"}, items)


def test_store_resumes_at_first_unjudged_pair_and_skips_withheld(tmp_path):
    store = make_store(tmp_path, n=4, withheld=(2,))
    assert store.progress() == {"judged": 0, "to_judge": 3, "withheld": 1, "pairs": 4}
    assert store.next_item().id == 1
    store.judge(1, "run_a", "  crisp  ")
    reopened = ReviewStore.open(store.path)  # another process, same file
    assert reopened.next_item().id == 3  # 2 is withheld: never offered
    assert reopened.judgments()[1].note == "crisp"
    with pytest.raises(ReviewError, match="withheld"):
        reopened.judge(2, "tie")
    with pytest.raises(ReviewError, match="not one of"):
        reopened.judge(3, "left")
    reopened.judge(3, "tie")
    assert reopened.undo_last() == 3
    assert reopened.next_item().id == 3
    assert reopened.progress()["judged"] == 1


def test_open_refuses_a_missing_file(tmp_path):
    with pytest.raises(ReviewError, match="llmtune review RUN_A"):
        ReviewStore.open(tmp_path / "nope.sqlite")


@dataclass
class FakeDecision:
    allowed: bool
    categories: list
    layer: str = "rules"


class ReplyScreener:
    """Blocks replies containing BLOCKME; has the per-reply API."""

    def __init__(self):
        self.calls = []

    def screen_conversation(self, messages, reply=None, fast=False):
        self.calls.append((messages, reply))
        blocked = reply is not None and "BLOCKME" in reply
        return FakeDecision(not blocked, ["minor_sexual"] if blocked else [])


class ConversationOnlyScreener:
    def __init__(self):
        self.calls = []

    def screen_conversation(self, messages, fast=False):
        self.calls.append(messages)
        return FakeDecision(True, [])


def test_screen_reply_uses_the_reply_in_its_conversation():
    s = ReplyScreener()
    screen_reply(s, CHAT, "hello")
    assert s.calls == [(CHAT, "hello")]
    old = ConversationOnlyScreener()
    screen_reply(old, CHAT, "hello")
    assert old.calls == [[*CHAT, {"role": "assistant", "content": "hello"}]]


def test_blocked_reply_is_withheld_and_never_stored(tmp_path):
    chats = [("prompt", f"eval.prompts[{i}]", [*CHAT[:1], {"role": "user", "content": f"q{i}"}]) for i in range(40)]
    replies_a = [f"a{i}" for i in range(40)]
    replies_b = [f"b{i}" for i in range(40)]
    replies_b[7] = "text with BLOCKME inside"
    items = build_items(chats, replies_a, replies_b, ReplyScreener(), seed=3)
    assert sorted(i.source for i in items) == sorted(c[1] for c in chats)  # every chat once, shuffled
    assert [i.source for i in items] != [c[1] for c in chats]
    assert {i.a_on_left for i in items} == {True, False}
    blocked = next(i for i in items if i.source == "eval.prompts[7]")
    assert blocked.reply_b is None and blocked.reply_a == "a7" and "minor_sexual" in blocked.withheld_b
    assert not blocked.shown
    store = ReviewStore.create(tmp_path / "r.sqlite", {"label_a": "x", "label_b": "y"}, items)
    assert "BLOCKME" not in store.path.read_bytes().decode("utf-8", "replace")
    assert build_items(chats, replies_a, replies_b, ReplyScreener(), seed=3) == items  # seeded


def test_wilson_interval_matches_known_values():
    low, high = wilson_interval(7, 10)
    assert low == pytest.approx(0.3968, abs=1e-4) and high == pytest.approx(0.8922, abs=1e-4)
    low, high = wilson_interval(0, 5)
    assert low == pytest.approx(0.0, abs=1e-12) and 0.4 < high < 0.5


def test_summary_counts_verdicts_by_run_not_by_position(tmp_path):
    store = make_store(tmp_path, n=6, withheld=(6,))
    for item_id, verdict in ((1, "run_a"), (2, "run_a"), (3, "run_b"), (4, "tie"), (5, "both_bad")):
        store.judge(item_id, verdict, "meh" if item_id == 5 else "")
    r = summarise(store)
    assert (r.wins_a, r.wins_b, r.ties, r.both_bad, r.judged, r.to_judge, r.withheld) == (2, 1, 1, 1, 5, 5, 1)
    assert r.win_rate_a == pytest.approx(2 / 3)
    assert (r.ci_low, r.ci_high) == pytest.approx(wilson_interval(2, 3))
    # Items 1 and 3 had RUN_A on the left: the left reply won 1 (run_a) + 0 (run_b on the right), item 2 had it on the right.
    assert r.left_chosen == 1
    assert r.outcomes[4].note == "meh" and r.outcomes[5].withheld == ["mara-ft: blocked (x) by rules"]
    assert "win rate 0.67" in r.summary()
    out = write_results(store, store.path.parent)
    assert json.loads((store.path.parent / "results.json").read_text())["wins_a"] == 2
    assert (store.path.parent / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.decisive == 3


def test_export_writes_trl_preference_pairs_and_kto_rows(tmp_path):
    store = make_store(tmp_path, n=6, withheld=(6,))
    for item_id, verdict in ((1, "run_a"), (2, "run_b"), (3, "tie"), (4, "both_bad")):
        store.judge(item_id, verdict)
    result = export_judgments(store, tmp_path / "out")
    assert (result.pairs, result.kto_rows, result.ties, result.unjudged, result.withheld) == (2, 2, 1, 1, 1)
    pairs = [json.loads(x) for x in result.pairs_path.read_text().splitlines()]
    prompt = lambda i: [CHAT[0], {"role": "user", "content": f"question {i}"}]
    assert pairs == [
        {"prompt": prompt(1), "chosen": [{"role": "assistant", "content": "a1"}], "rejected": [{"role": "assistant", "content": "b1"}]},
        {"prompt": prompt(2), "chosen": [{"role": "assistant", "content": "b2"}], "rejected": [{"role": "assistant", "content": "a2"}]},
    ]
    kto = [json.loads(x) for x in result.kto_path.read_text().splitlines()]
    assert kto == [{"prompt": prompt(4), "completion": [{"role": "assistant", "content": t}], "label": False} for t in ("a4", "b4")]


@pytest.fixture
def client(tmp_path):
    from fastapi.testclient import TestClient

    from llmtune.review.generate import Review
    from llmtune.review.server import create_app

    store = make_store(tmp_path, n=3)
    review = Review(store, store.path.parent, recipe_a=None, label_a="mara-ft", label_b="mara-base", resumed=False)
    return TestClient(create_app(review), base_url="http://127.0.0.1"), store


def test_api_is_blind_and_maps_positions_back_to_runs(client):
    http, store = client
    state = http.get("/api/state").json()
    item = state["item"]
    assert item["id"] == 1 and set(item) == {"id", "kind", "messages", "left", "right"}
    assert "mara-" not in json.dumps(state)  # no run names on the judging side
    assert (item["left"], item["right"]) == ("a1", "b1")  # item 1 has RUN_A on the left
    state = http.post("/api/judgments", json={"item_id": 1, "choice": "right", "note": "warmer"}).json()
    assert store.judgments()[1].verdict == "run_b" and store.judgments()[1].note == "warmer"
    assert state["progress"]["judged"] == 1 and state["item"]["id"] == 2
    assert (state["item"]["left"], state["item"]["right"]) == ("b2", "a2")  # item 2 has RUN_A on the right
    http.post("/api/judgments", json={"item_id": 2, "choice": "right"})
    assert store.judgments()[2].verdict == "run_a"
    assert http.post("/api/judgments", json={"item_id": 9, "choice": "tie"}).status_code == 404
    assert http.post("/api/judgments", json={"item_id": 3, "choice": "A"}).status_code == 422
    assert http.post("/api/undo").json()["item"]["id"] == 2
    assert http.get("/", headers={"host": "attacker.example"}).status_code == 400  # loopback names only
    assert "judge.js" in http.get("/").text and http.get("/static/judge.js").status_code == 200


def test_report_shows_review_results(tmp_path, tiny_recipe):
    from llmtune.config import load_recipe
    from llmtune.report import write_run_report

    recipe = load_recipe(tiny_recipe())
    store = make_store(recipe.run_dir, n=2)
    store.judge(1, "run_a", "better voice")
    write_results(store, store.path.parent)
    report = write_run_report(recipe).read_text()
    assert "## Human review (blind, side by side)" in report
    assert "mara-ft preferred over mara-base in 1 of 1 decisive judgments" in report
    assert "![review results](review/vs-base/results.png)" in report
    assert "| 1 | question 1 | mara-ft better | better voice |" in report


@pytest.mark.slow
def test_cli_usage_errors(tmp_path):
    r = run_cli("review", "a", "b", "c")
    assert r.returncode == 2 and "usage: llmtune review RUN_A" in r.stderr
    r = run_cli("review", "export")
    assert r.returncode == 2 and "usage: llmtune review export" in r.stderr
    r = run_cli("review", str(tmp_path))
    assert r.returncode == 2 and "not a run directory" in r.stderr
