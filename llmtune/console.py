"""The one console every stage prints to: stderr (stdout stays for --json), no hard wrapping of paths."""

import contextlib

from rich.console import Console

console = Console(stderr=True, soft_wrap=True)


def exit_with(message: str):
    """End a command on a user error: one line `error: ...` on stderr and exit code 2 (no traceback)."""
    import sys

    import typer

    print(f"error: {message}", file=sys.stderr)
    raise typer.Exit(2)


@contextlib.contextmanager
def user_errors():
    """Around a command's work: a user-facing error (LlmtuneError, a missing file) ends it via
    `exit_with`; anything else is a bug and keeps its traceback."""
    from llmtune.errors import LlmtuneError

    try:
        yield
    except (LlmtuneError, FileNotFoundError) as exc:
        exit_with(str(exc))


def call(fn, *args, **kwargs):
    """`fn(*args, **kwargs)` inside `user_errors()`."""
    with user_errors():
        return fn(*args, **kwargs)
