"""End to end, in a real browser: `llmtune review` on two tiny trained runs, judged by keyboard in
headless Chromium (Debian's `chromium` + `chromium-driver`, installed by `make install`).

Set REVIEW_SCREENSHOTS_DIR=docs to refresh docs/review-judging.png and docs/review-results.png.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import MEMORISE, REPO, copy_run, run_cli, tiny_recipe_dict, write_conversations

pytestmark = [pytest.mark.slow]

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, memorised_run):
    """RUN_A: the memorised run; RUN_B: the same data trained 4 steps (still mostly random)."""
    from llmtune.config import load_recipe, save_resolved
    from llmtune.data.prepare import prepare
    from llmtune.train.sft import train

    recipe_a = copy_run(memorised_run, tmp_path_factory.mktemp("review-a"))
    save_resolved(recipe_a, recipe_a.run_dir)
    tmp = tmp_path_factory.mktemp("review-b")
    path = tmp / "b.yaml"
    data = write_conversations(tmp / "m.jsonl", MEMORISE)
    path.write_text(yaml.safe_dump(tiny_recipe_dict(tmp, data, name="barely-trained", data={"val_fraction": 0.0},
                                                    training={"max_steps": 4, "save_steps": 100})))
    recipe_b = load_recipe(path)
    save_resolved(recipe_b, recipe_b.run_dir)
    train(recipe_b, prepare(recipe_b))
    return recipe_a.run_dir, recipe_b.run_dir


def chrome(tmp_path: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).exists()]
    assert not missing, f"{missing} not installed: run `make install` (apt-get install chromium chromium-driver)"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1280,1000", f"--user-data-dir={tmp_path / 'chrome-profile'}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


# RUN_B's replies are random tokens, which the screen sometimes withholds: more prompts, so that at
# least four pairs reach the page.
SETTINGS = ("review.max_new_tokens=24",
            'eval.prompts=["What is the ship called?","Who is the captain?","Where are we going?","What is for supper?"]')


class ReviewServer:
    """`llmtune review` as a user starts it, with its output read line by line."""

    def __init__(self, *args: str):
        self.proc = subprocess.Popen([sys.executable, "-m", "llmtune.cli", "review", *args, "--port", "0"], cwd=REPO,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        self.output: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.output.append(line)
            self.lines.put(line)

    def url(self, timeout: float = 300) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=1)
            except queue.Empty:
                assert self.proc.poll() is None, "llmtune review exited:\n" + "".join(self.output)
                continue
            if m := re.search(r"review page: (http://127\.0\.0\.1:\d+/)", line):
                return m.group(1)
        raise AssertionError("no review page within the timeout:\n" + "".join(self.output))

    def stop(self) -> str:
        self.proc.send_signal(signal.SIGINT)  # Ctrl-C
        self.proc.wait(timeout=60)
        time.sleep(0.2)
        return "".join(self.output)


def wait_for(driver, condition, timeout: float = 30):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(lambda d: condition(d))


def body(driver, key: str) -> str:
    return driver.find_element("tag name", "body").get_attribute(f"data-{key}") or ""


def press(driver, keys: str) -> None:
    from selenium.webdriver.common.action_chains import ActionChains

    ActionChains(driver).send_keys(keys).perform()


def test_judge_three_pairs_by_keyboard_resume_results_export(two_runs, tmp_path):
    from selenium.webdriver.common.keys import Keys

    run_a, run_b = two_runs
    # RUN_B's replies are random tokens, which the screen sometimes withholds: more prompts, so at
    # least four pairs reach the page
    server = ReviewServer(str(run_a), str(run_b), *SETTINGS)
    driver = None
    try:
        url = server.url()
        db = run_a / "review" / f"vs-{run_b.name}" / "review.sqlite"
        with sqlite3.connect(db) as con:
            shown = con.execute("SELECT COUNT(*) FROM items WHERE reply_a IS NOT NULL AND reply_b IS NOT NULL").fetchone()[0]
            placement = dict(con.execute("SELECT id, a_on_left FROM items"))
        assert shown >= 4, f"only {shown} pairs passed the screen; the test judges three and resumes at a fourth"

        driver = chrome(tmp_path)
        driver.get(url)
        wait_for(driver, lambda d: body(d, "ready") == "1")
        assert body(driver, "judged") == "0" and body(driver, "to-judge") == str(shown)
        shot_dir = Path(os.environ.get("REVIEW_SCREENSHOTS_DIR", tmp_path))
        shot_dir.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(shot_dir / "review-judging.png"))

        # Three pairs: A better; B better with a note typed after N and left with Esc; both bad.
        seen = {}
        for n, (keys, note) in enumerate((("a", ""), ("b", "flat, repeats the question"), ("x", "")), start=1):
            item = int(body(driver, "item"))
            seen[item] = (keys, driver.find_element("id", "left-text").text, driver.find_element("id", "right-text").text)
            if note:
                press(driver, "n")
                wait_for(driver, lambda d: d.switch_to.active_element.get_attribute("id") == "note")
                press(driver, note + Keys.ESCAPE)
            press(driver, keys)
            wait_for(driver, lambda d, n=n: body(d, "judged") == str(n))
            assert int(body(driver, "item")) != item
        fourth = body(driver, "item")
        assert "3 of" in driver.find_element("id", "progress-text").text

        # Reload: the verdicts are in SQLite, and the page resumes at the fourth pair.
        driver.refresh()
        wait_for(driver, lambda d: body(d, "ready") == "1")
        assert body(driver, "judged") == "3" and body(driver, "item") == fourth
        width = driver.find_element("id", "progress-fill").value_of_css_property("width")
        assert float(width.removesuffix("px")) > 0
        with sqlite3.connect(db) as con:
            verdicts = {i: (v, note) for i, v, note in con.execute("SELECT item_id, verdict, note FROM judgments")}
        expected = {}
        for item, (keys, _, _) in seen.items():
            if keys == "x":
                expected[item] = ("both_bad", "")
            else:  # the key names a position; the store names the run that wrote the reply there
                left_is_a = bool(placement[item])
                expected[item] = ("run_a" if (keys == "a") == left_is_a else "run_b",
                                  "flat, repeats the question" if keys == "b" else "")
        assert verdicts == expected

        # The results page: win rate with its interval, ties, the plot, every pair.
        press(driver, "r")
        wait_for(driver, lambda d: d.current_url.endswith("/results") and body(d, "ready") == "1")
        assert "2 decisive judgments" in driver.find_element("id", "summary").text
        assert driver.find_element("id", "c-bad").text == "1" and driver.find_element("id", "c-tie").text == "0"
        assert re.fullmatch(r"\d\.\d\d \[\d\.\d\d, \d\.\d\d\]", driver.find_element("id", "c-rate").text)
        wait_for(driver, lambda d: d.execute_script("const i = document.getElementById('plot'); return i.complete && i.naturalWidth > 0"))
        rows = driver.find_elements("css selector", "#outcomes tbody tr")
        assert len(rows) == len(placement)
        assert sum(r.get_attribute("data-verdict") != "" for r in rows) == 3
        driver.save_screenshot(str(shot_dir / "review-results.png"))
    finally:
        if driver:
            driver.quit()
        output = server.stop()

    assert re.search(r"3 of \d+ pairs judged; \d+ withheld", output) and "report:" in output, output  # Ctrl-C wrote the results and the report
    report = (run_a / "report.md").read_text()
    assert "## Human review (blind, side by side)" in report and f"vs-{run_b.name}/results.png" in report

    # Export: TRL conversational preference pairs and KTO rows, with the texts the judge saw.
    r = run_cli("review", "export", str(run_a), str(run_b), "--out", str(tmp_path / "export"))
    assert r.returncode == 0, r.stderr
    assert "2 preference pairs" in r.stderr and "2 KTO rows" in r.stderr
    pairs = [json.loads(x) for x in (tmp_path / "export" / "preferences.jsonl").read_text().splitlines()]
    kto = [json.loads(x) for x in (tmp_path / "export" / "kto.jsonl").read_text().splitlines()]
    assert len(pairs) == 2 and len(kto) == 2
    shown_pairs = {(keys, left, right) for keys, left, right in seen.values()}
    for p in pairs:
        assert set(p) == {"prompt", "chosen", "rejected"} and p["prompt"][-1]["role"] == "user"
        assert [m["role"] for m in p["chosen"] + p["rejected"]] == ["assistant", "assistant"]
        chosen, rejected = p["chosen"][0]["content"], p["rejected"][0]["content"]
        assert ("a", chosen, rejected) in shown_pairs or ("b", rejected, chosen) in shown_pairs
    for row in kto:
        assert set(row) == {"prompt", "completion", "label"} and row["label"] is False
        assert row["completion"][0]["role"] == "assistant"
    both_bad = next((left, right) for keys, left, right in seen.values() if keys == "x")
    assert sorted(row["completion"][0]["content"] for row in kto) == sorted(both_bad)

    # Reopening with the same settings resumes without generating; other settings would make other replies.
    from llmtune.review.generate import open_review
    from llmtune.review.store import ReviewError

    again = open_review(run_a, str(run_b), list(SETTINGS))
    assert again.resumed and again.store.progress()["judged"] == 3
    with pytest.raises(ReviewError, match="--fresh"):
        open_review(run_a, str(run_b), [*SETTINGS[1:], "review.max_new_tokens=25"])

