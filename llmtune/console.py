"""The one console every stage prints to: stderr (stdout stays for --json), no hard wrapping of paths."""

from rich.console import Console

console = Console(stderr=True, soft_wrap=True)
