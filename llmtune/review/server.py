"""The review page: a FastAPI app on loopback over one review file.

The page never learns which run wrote which reply: the API sends `left` and `right`, and
turns a verdict on a position back into one on RUN_A or RUN_B with the placement stored
for that pair. Assets are plain files in `llmtune/review/static/` (no CDN, no build step).
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, HTTPException
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from starlette.middleware.trustedhost import TrustedHostMiddleware

from llmtune.console import console
from llmtune.review.generate import Review
from llmtune.review.results import ReviewResults, write_results
from llmtune.review.store import Item, ReviewError

STATIC = Path(__file__).resolve().parent / "static"
LOOPBACK = "127.0.0.1"


class JudgmentIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    item_id: int
    choice: Literal["left", "right", "tie", "both_bad"]
    note: str = Field("", max_length=4000)


def _shown(item: Item) -> dict:
    left, right = (item.reply_a, item.reply_b) if item.a_on_left else (item.reply_b, item.reply_a)
    return {"id": item.id, "kind": item.kind, "messages": item.messages, "left": left, "right": right}


def _verdict(choice: str, item: Item) -> str:
    if choice in ("tie", "both_bad"):
        return choice
    return "run_a" if (choice == "left") == item.a_on_left else "run_b"


OnResults = Callable[[ReviewResults], None]


def finish(review: Review, on_results: OnResults | None = None) -> ReviewResults:
    """results.json and results.png from the judgments so far; then `on_results` (the CLI passes
    one that rewrites RUN_A's report.md: the report belongs to the top of the pipeline)."""
    results = write_results(review.store, review.directory)
    if on_results is not None:
        on_results(results)
    return results


def _report_on_exit(review: Review, on_results: OnResults | None):
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        # Shutdown (Ctrl-C, SIGTERM): uvicorn re-raises the signal afterwards, so the results are written here.
        results = finish(review, on_results)
        console.print(results.summary(), soft_wrap=True)
        console.print(f"results: {review.directory / 'results.json'}, {review.directory / 'results.png'}; "
                      f"report: {review.recipe_a.run_dir / 'report.md'}", soft_wrap=True)

    return lifespan


def create_app(review: Review, on_results: OnResults | None = None) -> FastAPI:
    store = review.store
    app = FastAPI(title="llmtune review", docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=_report_on_exit(review, on_results))
    # Only loopback names: a page elsewhere cannot reach this server through DNS rebinding.
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=[LOOPBACK, "localhost"])
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    def state() -> dict:
        item = store.next_item()
        return {"progress": store.progress(), "item": _shown(item) if item else None}

    @app.get("/", include_in_schema=False)
    def judging_page() -> FileResponse:
        return FileResponse(STATIC / "judge.html")

    @app.get("/results", include_in_schema=False)
    def results_page() -> FileResponse:
        return FileResponse(STATIC / "results.html")

    @app.get("/api/state")
    def get_state() -> dict:
        return state()

    @app.post("/api/judgments")
    def post_judgment(j: JudgmentIn) -> dict:
        item = store.item(j.item_id)
        if item is None:
            raise HTTPException(404, f"no pair {j.item_id} in this review")
        try:
            store.judge(item.id, _verdict(j.choice, item), j.note)
        except ReviewError as exc:
            raise HTTPException(409, str(exc)) from None
        return state()

    @app.post("/api/undo")
    def undo() -> dict:
        store.undo_last()
        return state()

    @app.get("/api/results")
    def results() -> dict:
        return finish(review, on_results).to_json()

    @app.get("/results.png", include_in_schema=False)
    def results_png() -> FileResponse:
        png = review.directory / "results.png"
        if not png.exists():
            finish(review, on_results)
        return FileResponse(png, headers={"Cache-Control": "no-store"})

    return app


def bind(port: int) -> socket.socket:
    """A listening socket on loopback (port 0: any free port), or an error naming the fix."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((LOOPBACK, port))
    except OSError as exc:
        sock.close()
        raise ReviewError(f"cannot listen on {LOOPBACK}:{port} ({exc.strerror}); pass another --port (0 picks a free one)") from None
    sock.listen(64)
    return sock


def serve_review(review: Review, port: int, on_results: OnResults | None = None) -> None:
    """Serve until Ctrl-C (or SIGTERM); on the way out the app writes the results and the report."""
    import uvicorn

    sock = bind(port)
    url = f"http://{LOOPBACK}:{sock.getsockname()[1]}/"
    p = review.store.progress()
    console.print(f"[bold]review page[/]: {url}  ({p['judged']} of {p['to_judge']} pairs judged; results: {url}results; "
                  "Ctrl-C to stop)", soft_wrap=True)
    server = uvicorn.Server(uvicorn.Config(create_app(review, on_results), log_level="warning", access_log=False))
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C once it has shut down
        pass
    finally:
        sock.close()
