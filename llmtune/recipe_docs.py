"""docs/recipes.md, generated from the config schemas so the docs cannot drift from the code.

    python -m llmtune.recipe_docs > docs/recipes.md

Four kinds of file, one loader (llmtune.schema): the recipe, the gateway's serve config, the
moderation recipe and a platform policy file. Every key's type, bounds, default and meaning come from its
pydantic field.
"""

from __future__ import annotations

import json
import typing

from pydantic import BaseModel

from llmtune.config import Recipe
from llmtune.moderation.policy import PolicyFile
from llmtune.moderation.train import ModerationRecipe
from llmtune.serve.config import ServeConfig

HEADER = """\
# Recipe reference

Generated from the schemas (`llmtune/config.py`, `llmtune/serve/config.py`, `llmtune/moderation/train.py`,
`llmtune/moderation/policy.py`) by
`python -m llmtune.recipe_docs`; a test fails when it is stale. All four are read by one loader
(`llmtune/schema.py`): errors name the file, the line and the key.

A recipe is a YAML file with the sections below. Every key can be overridden from the shell as
`section.key=value` (values are YAML: `training.max_steps=20`, `lora.target_modules=[q_proj,v_proj]`,
`data.sources.0.license=MIT`). Unknown keys are errors that name the file, the line and the
closest valid key. The fully resolved recipe is saved as `runs/NAME/recipe.yaml`.

A recipe may start from another file: `extends: base/qlora-gpu.yaml` (a path relative to the recipe)
takes every key of that file, then the recipe's own keys on top (sections merge key by key; lists and
values replace). The GPU recipes in recipes/ extend recipes/base/qlora-gpu.yaml and state only their
model and memory tier; an error in either file names that file and line.
"""


def _type_name(annotation) -> str:
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in typing.get_args(annotation))
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " or ".join(_type_name(a) for a in typing.get_args(annotation))
    if origin in (list, dict):
        args = ", ".join(_type_name(a) for a in typing.get_args(annotation))
        return f"{origin.__name__}[{args}]"
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))


_BOUNDS = (("gt", ">"), ("ge", "≥"), ("lt", "<"), ("le", "≤"), ("min_length", "length ≥"), ("max_length", "length ≤"))


def _bounds(field) -> str:
    """`, ≥ -1, < 65536` from the field's constraints (annotated_types metadata)."""
    shown = []
    for meta in field.metadata:
        for attr, sign in _BOUNDS:
            value = getattr(meta, attr, None)
            if value is not None:
                shown.append(f"{sign} {value}")
    return (", " + ", ".join(shown)) if shown else ""


def _default(field) -> str:
    if field.is_required():
        return "**required**"
    value = field.default_factory() if field.default_factory is not None else field.default
    if isinstance(value, BaseModel):
        return "(section)"
    return f"`{json.dumps(value)}`"


def _section(title: str, model: type[BaseModel], level: str = "##") -> list[str]:
    lines = [f"{level} `{title}`" if title else f"{level} Top level", "", "| key | type | default | meaning |", "|---|---|---|---|"]
    nested = []
    for name, field in model.model_fields.items():
        if field.exclude:
            continue
        ann = field.annotation
        inner = [a for a in (ann, *typing.get_args(ann)) if isinstance(a, type) and issubclass(a, BaseModel)]
        if inner:
            suffix = {list: "[]", dict: ".<name>"}.get(typing.get_origin(ann), "")
            nested.append((f"{title}.{name}".strip(".") + suffix, inner[0]))
            if typing.get_origin(ann) is not list:
                continue
        lines.append(f"| `{name}` | {_type_name(ann)}{_bounds(field)} | {_default(field)} | {(field.description or '').replace('|', '/')} |")
    lines.append("")
    for sub_title, sub in nested:
        lines += _section(sub_title, sub, level)
    return lines


SERVE_HEADER = """\
# Serve config (`llmtune serve --config FILE`)

The gateway's YAML file (serve/gateway.example.yaml shows every key). `--port`, `--host`, `--store` and
`--rate-limit-storage` on the command line replace the file's value and are checked by the same rules.
"""

MODERATION_HEADER = """\
# Moderation recipe (`llmtune moderation train FILE`)

Trains the moderation adapter (recipes/moderation.yaml); overrides work as in a recipe.
"""


POLICY_HEADER = """\
# Platform policy file (`moderation.policy_file`)

A platform's own categories (rules only: keywords and regular expressions, matched on the normalised
text) and its own list of real people's names; see docs/moderation.md, 'Adding categories and names'.
The hard floor's categories cannot be redefined or switched off here.
"""


def render() -> str:
    return "\n".join([
        HEADER, *_section("", Recipe),
        SERVE_HEADER, *_section("", ServeConfig, "###"),
        MODERATION_HEADER, *_section("", ModerationRecipe, "###"),
        POLICY_HEADER, *_section("", PolicyFile, "###"),
    ])


if __name__ == "__main__":
    print(render(), end="")
