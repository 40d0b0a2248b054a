"""Peak-memory estimates for recipes, offline: `estimate(recipe, gpu_mem_gb)` and `llmtune estimate`."""

from llmtune.estimate.arch import Arch, load_arch
from llmtune.estimate.memory import Estimate, Suggestion, estimate

__all__ = ["Arch", "Estimate", "Suggestion", "estimate", "estimate_command", "load_arch"]


def __getattr__(name: str):
    # The typer command pulls in rich tables; import it only when asked for.
    if name == "estimate_command":
        from llmtune.estimate.command import estimate_command

        return estimate_command
    raise AttributeError(name)
