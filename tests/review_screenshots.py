"""Screenshots of the review page for docs/, taken the way the browser test drives it.

    python -m tests.review_screenshots runs/demo-cpu base --out docs [--judge ABXTA]

Starts `llmtune review` on the given runs, shoots the judging page, judges pairs with the
given keys (if the review has none yet), shoots the results page, then stops the server.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from tests.review.test_review_browser import ReviewServer, body, chrome, press, wait_for


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--out", type=Path, default=Path("docs"))
    parser.add_argument("--judge", default="ABXTA", help="keys pressed, one per pair, after the first screenshot")
    args = parser.parse_args()
    server = ReviewServer(*args.runs)
    driver = None
    try:
        url = server.url(timeout=3600)  # a real model generates every reply first
        driver = chrome(Path(tempfile.mkdtemp()))
        driver.get(url)
        wait_for(driver, lambda d: body(d, "ready") == "1")
        fresh = body(driver, "judged") == "0"
        if fresh:  # judge one pair first, so the progress bar shows progress
            press(driver, args.judge[0].lower())
            wait_for(driver, lambda d: body(d, "judged") == "1")
        args.out.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(args.out / "review-judging.png"))
        if fresh:
            for n, key in enumerate(args.judge[1:], start=2):
                if not body(driver, "item"):
                    break
                press(driver, key.lower())
                wait_for(driver, lambda d, n=n: body(d, "judged") == str(n))
        driver.get(url + "results")
        wait_for(driver, lambda d: body(d, "ready") == "1")
        wait_for(driver, lambda d: d.execute_script("const i = document.getElementById('plot'); return i.complete && i.naturalWidth > 0"))
        driver.set_window_size(1280, min(3000, driver.execute_script("return document.body.scrollHeight") + 40))
        driver.save_screenshot(str(args.out / "review-results.png"))
    finally:
        if driver:
            driver.quit()
        print(server.stop())


if __name__ == "__main__":
    main()
