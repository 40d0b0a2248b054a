"""`llmtune review`: people judge two models' replies blind, side by side, and the verdicts become data.

    open_review(run_a, "base" | run_b)   generate.py: replies ahead of time, batched, seeded, screened
    serve_review(review, port)           server.py:   the page on loopback (static/ holds its assets)
    summarise(store)                     results.py:  win rate with a 95% interval, ties, per-pair outcomes
    export_judgments(store, out_dir)     export.py:   TRL preference pairs and KTO rows

Everything lives in `runs/RUN_A/review/vs-OPPONENT/` (review.sqlite, results.json, results.png,
preferences.jsonl, kto.jsonl); RUN_A's report.md shows the results.
"""
