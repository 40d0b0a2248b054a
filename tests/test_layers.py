"""llmtune's imports run one way (docs/architecture.md): no circle, and no stage imports another stage.

Parsed from the source (ast), so the check costs no imports. Imports under `if TYPE_CHECKING:` are
type hints only and do not count.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "llmtune"

# Stage packages: each one entry point per stage; they hand each other files in the run directory.
STAGES = ("data", "moderation", "train", "eval", "export", "serve", "watermark", "review", "estimate")
# On top: they call the stages in order (and the report reads every stage's artifacts).
TOP = {"llmtune.cli", "llmtune.run", "llmtune.report", "llmtune.recipe_docs"}
# Inside a stage package but part of the layer below the stages, each for a reason docs/architecture.md gives.
SHARED = {
    # The recipe's `moderation:` section lives beside the screen it configures (config imports it).
    "llmtune.moderation.policy": "config",
    # One Conversation/Message type and one chat template at the edge, for every stage.
    "llmtune.data.types": "shared",
    "llmtune.data.cards": "shared",
    "llmtune.data.formats": "shared",
    "llmtune.data.template": "shared",
    # The screen: every stage screens what it reads and writes (the hard floor holds everywhere).
    **{f"llmtune.moderation{m}": "shared" for m in (
        "", ".adapter", ".bulk", ".conversation", ".decision", ".decode", ".errors", ".facts", ".lexicon",
        ".normalize", ".obfuscate", ".rules", ".screener")},
    # The memory model: `estimate` prints it; train decides training.gradient_checkpointing=auto with it.
    "llmtune.estimate.arch": "shared",
    "llmtune.estimate.memory": "shared",
    # The watermark scheme and key: serve embeds it, `llmtune watermark detect` tests for it.
    "llmtune.watermark.scheme": "shared",
    "llmtune.watermark.secret": "shared",
    "llmtune.watermark.vllm_processor": "shared",
}
RANK = {"config": 0, "shared": 1, "stage": 2, "top": 3}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py") if "migrations" not in p.parts}


def _type_checking_only(node: ast.AST, parents: dict) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The llmtune modules `name` imports, at module level or inside functions."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        if _type_checking_only(node, parents):
            continue
        found.update(t for t in targets if t.startswith("llmtune") and t != name)
    return found


def layer(name: str) -> str:
    if name in TOP:
        return "top"
    if name in SHARED:
        return SHARED[name]
    return "stage" if stage_of(name) else "config"


def stage_of(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in STAGES else None


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(name, path, set(mods)) for name, path in mods.items()}


def test_the_parser_sees_imports(graph):
    # Guards the test itself: a parser that found nothing would pass everything below.
    assert "llmtune.artifacts" in graph["llmtune.train.sft"]
    assert "llmtune.moderation.policy" in graph["llmtune.config"]
    assert all(m in graph for m in TOP | set(SHARED))


def test_no_import_circle(graph):
    # Tarjan's strongly connected components; any component of two or more modules is a circle.
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not circles, f"import circles: {circles}"


def test_imports_only_go_down(graph):
    wrong = []
    for importer, targets in sorted(graph.items()):
        for target in sorted(t for t in targets if t in graph):
            upward = RANK[layer(target)] > RANK[layer(importer)]
            sideways = (layer(target) == "stage" and layer(importer) == "stage"
                        and stage_of(target) != stage_of(importer))
            if upward or sideways:
                wrong.append(f"{importer} ({layer(importer)}) -> {target} ({layer(target)})")
    assert not wrong, "imports against the layer order (docs/architecture.md):\n" + "\n".join(wrong)


def test_plots_import_nothing_from_llmtune(graph):
    assert graph["llmtune.plots"] == set()
