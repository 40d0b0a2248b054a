"""docs/recipes.md, generated from the recipe schema so the docs cannot drift from the code.

    python -m llmtune.recipe_docs > docs/recipes.md
"""

from __future__ import annotations

import json
import typing

from pydantic import BaseModel

from llmtune.config import Recipe

HEADER = """\
# Recipe reference

Generated from `llmtune/config.py` by `python -m llmtune.recipe_docs`; a test fails when it is stale.

A recipe is a YAML file with the sections below. Every key can be overridden from the shell as
`section.key=value` (values are YAML: `training.max_steps=20`, `lora.target_modules=[q_proj,v_proj]`,
`data.sources.0.license=MIT`). Unknown keys are errors that name the file, the line and the
closest valid key. The fully resolved recipe is saved as `runs/NAME/recipe.yaml`.
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


def _default(field) -> str:
    if field.is_required():
        return "**required**"
    value = field.default_factory() if field.default_factory is not None else field.default
    if isinstance(value, BaseModel):
        return "(section)"
    return f"`{json.dumps(value)}`"


def _section(title: str, model: type[BaseModel]) -> list[str]:
    lines = [f"## `{title}`" if title else "## Top level", "", "| key | type | default | meaning |", "|---|---|---|---|"]
    nested = []
    for name, field in model.model_fields.items():
        if field.exclude:
            continue
        ann = field.annotation
        inner = [a for a in (ann, *typing.get_args(ann)) if isinstance(a, type) and issubclass(a, BaseModel)]
        if inner:
            nested.append((f"{title}.{name}".strip(".") + ("[]" if typing.get_origin(ann) is list else ""), inner[0]))
            if typing.get_origin(ann) is not list:
                continue
        lines.append(f"| `{name}` | {_type_name(ann)} | {_default(field)} | {(field.description or '').replace('|', '/')} |")
    lines.append("")
    for sub_title, sub in nested:
        lines += _section(sub_title, sub)
    return lines


def render() -> str:
    return HEADER + "\n" + "\n".join(_section("", Recipe))


if __name__ == "__main__":
    print(render(), end="")
