"""One way to read a YAML config into pydantic: errors name the file, the line and the key.

Every config file goes through here: recipes (`llmtune.config`), moderation recipes, the gateway's
serve config, and the `moderation:` section the moderation CLI reads from a recipe. What each one
gets: the file and line of a bad key, "did you mean" for a misspelt one, `section.key=value`
overrides parsed as YAML, and `Section` (extra keys forbidden, assignments validated) so that a
value set later (a CLI flag) is checked like one read from the file.

This module imports only pydantic, PyYAML and `llmtune.errors`.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, TypeVar

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from llmtune.errors import LlmtuneError, RecipeError

M = TypeVar("M", bound=BaseModel)


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, and so are bad assignments."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _steps_or_epochs(v: int) -> int:
    if v == 0:
        raise ValueError("0 steps trains nothing: give a positive number of steps, or -1 to train for `epochs`")
    return v


# An optimizer step count: positive, or -1 for "train for `epochs` instead".
MaxSteps = Annotated[int, Field(ge=-1), AfterValidator(_steps_or_epochs)]


class Output(Section):
    dir: str = Field("runs", description="Parent directory of run directories (relative to the working directory).")
    name: str | None = Field(None, description="Run directory name; null uses the recipe's name.")


class RecipeFile(Section):
    """What every recipe file has: a name, a line on what it is for, where it came from (not a key),
    and, in its `output:` section, where its run directory goes."""

    name: str = Field(description="Recipe name; also the default run directory name.")
    description: str | None = Field(None, description="One line on what this recipe is for.")
    # Where the recipe came from; relative paths in it resolve against it. Not a recipe key.
    source_path: Path | None = Field(None, exclude=True)

    @property
    def run_dir(self) -> Path:
        return Path(self.output.dir) / (self.output.name or self.name)

    def resolve_path(self, path: str) -> Path:
        """A recipe path: absolute as is; else beside the recipe file if it exists there, else
        relative to the working directory (recipes under recipes/ name data/... from the repo root)."""
        p = Path(path).expanduser()
        if not p.is_absolute() and self.source_path is not None:
            beside = self.source_path.parent / p
            if beside.exists():
                return beside.resolve()
        return p.resolve()


# ---------------------------------------------------------------------------------------------
# Reading


def read_yaml_mapping(path: Path, what: str, error: type[LlmtuneError], hint: str = "") -> tuple[dict, str]:
    """(document, text) of a YAML file that must hold a mapping; `error` names the file (and the line
    of a YAML syntax error). An empty file is an empty mapping."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} not found: {path}" + (f" ({hint})" if hint else ""))
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise error(f"cannot read {what} {path}: {exc.strerror}") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f"{path}:{mark.line + 1}" if mark else str(path)
        raise error(f"{at}: not valid YAML: {getattr(exc, 'problem', None) or exc}") from None
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise error(f"{path}: a {what} is a YAML mapping of keys, not {type(doc).__name__}")
    return doc, text


def key_lines(text: str) -> dict[tuple[str, ...], int]:
    """Map each key path in a YAML document to its 1-based line number."""
    lines: dict[tuple[str, ...], int] = {}
    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return lines

    def walk(node: Any, path: tuple[str, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                key = (*path, str(key_node.value))
                lines[key] = key_node.start_mark.line + 1
                walk(value_node, key)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                lines[(*path, str(i))] = item.start_mark.line + 1
                walk(item, (*path, str(i)))

    walk(root, ())
    return lines


# ---------------------------------------------------------------------------------------------
# Errors that point at the line


def section_model(root: type[BaseModel], path: tuple[str | int, ...]) -> type[BaseModel] | None:
    """The pydantic model under `root` that owns the key at `path` (for suggestions). A
    `dict[str, Model]` field takes one path part for the entry's name, then `Model`'s keys."""
    model: Any = root
    parts = list(path[:-1])
    while parts:
        part = parts.pop(0)
        if isinstance(part, int) or (isinstance(part, str) and part.isdigit()):
            continue
        field = model.model_fields.get(part) if hasattr(model, "model_fields") else None
        if field is None:
            return None
        ann = field.annotation
        inner = getattr(ann, "__args__", None) or ()
        if getattr(ann, "__origin__", None) is dict and len(inner) == 2:
            if not parts:
                return None  # the key is an entry name, not a model field
            parts.pop(0)
            candidates = [inner[1]]
        else:
            candidates = [ann, *inner]
        nxt = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if nxt is None:
            return None
        model = nxt
    return model


def valid_keys(model: type[BaseModel]) -> list[str]:
    return [name for name, f in model.model_fields.items() if not f.exclude]


def locations(path: str, text: str) -> dict[tuple[str, ...], str]:
    """`file:line` of every key path in a YAML text."""
    return {key: f"{path}:{line}" for key, line in key_lines(text).items()}


def format_errors(err: ValidationError, root: type[BaseModel], where: str, at_key: dict[tuple[str, ...], str],
                  prefix: tuple[str, ...] = ()) -> str:
    """One line per problem: `file:line: what is wrong with which key` (and "did you mean" for a
    misspelt key). `at_key` maps key paths to `file:line` (see `locations`); `prefix` is where the
    validated mapping sits in the file (a recipe's `moderation:`)."""
    out = []
    for e in err.errors():
        loc = tuple(e["loc"])
        full = (*prefix, *loc)
        dotted = ".".join(str(p) for p in full) or "(top level)"
        at = where
        for cut in range(len(full), 0, -1):
            found = at_key.get(tuple(str(p) for p in full[:cut]))
            if found:
                at = found
                break
        if e["type"] == "extra_forbidden":
            model = section_model(root, loc)
            valid = valid_keys(model) if model else []
            close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
            hint = f"did you mean `{close[0]}`?" if close else f"valid keys here: {', '.join(valid)}"
            out.append(f"{at}: unknown key `{dotted}`; {hint}")
        elif e["type"] == "missing":
            model = section_model(root, loc)
            desc = model.model_fields[str(loc[-1])].description if model and str(loc[-1]) in model.model_fields else ""
            out.append(f"{at}: missing required key `{dotted}`" + (f" ({desc})" if desc else ""))
        else:
            got = e.get("input")
            got_s = f" (got {got!r})" if got is not None and not isinstance(got, dict) else ""
            out.append(f"{at}: `{dotted}`: {e['msg']}{got_s}")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# Overrides


def parse_override(text: str, error: type[LlmtuneError] = RecipeError) -> tuple[list[str], Any]:
    """`training.max_steps=20` -> (["training", "max_steps"], 20). Values are parsed as YAML."""
    if "=" not in text:
        raise error(f"override `{text}` is not of the form section.key=value (e.g. training.max_steps=20)")
    key, _, raw = text.partition("=")
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise error(f"override `{text}`: the key `{key}` is empty or has an empty part")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise error(f"override `{text}`: the value is not valid YAML ({exc})") from None
    return key.split("."), value


def apply_overrides(doc: dict[str, Any], overrides: list[str], error: type[LlmtuneError] = RecipeError) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text, error)
        node: Any = doc
        for i, part in enumerate(path[:-1]):
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise error(f"override `{text}`: `{'.'.join(path[: i + 1])}` is not an index of the list")
                node = node[int(part)]
                continue
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
            if not isinstance(node, (dict, list)):
                raise error(f"override `{text}`: `{'.'.join(path[: i + 1])}` is a value, not a section")
        last = path[-1]
        if isinstance(node, list):
            if not last.isdigit() or int(last) >= len(node):
                raise error(f"override `{text}`: `{last}` is not an index of the list")
            node[int(last)] = value
        else:
            node[last] = value
    return doc


# ---------------------------------------------------------------------------------------------
# The loader


def validate(model: type[M], doc: dict, where: str, error: type[LlmtuneError], text: str = "",
             prefix: tuple[str, ...] = (), at_key: dict[tuple[str, ...], str] | None = None) -> M:
    """`model` from `doc`; a validation error becomes `error` naming `where` and the line (given the
    text, or `at_key` from `locations`)."""
    try:
        return model.model_validate(doc)
    except ValidationError as err:
        at_key = at_key if at_key is not None else locations(where, text) if text else {}
        raise error(format_errors(err, model, where, at_key, prefix)) from None


# A file may start from another: `extends: base/qlora-gpu.yaml` (relative to the file) takes every key
# of that file, then this file's keys on top (mappings merge key by key; lists and values replace).
EXTENDS = "extends"


def merge_documents(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        out[key] = merge_documents(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def read_extended(path: Path, what: str, error: type[LlmtuneError], hint: str = "",
                  seen: tuple[Path, ...] = ()) -> tuple[dict, dict[tuple[str, ...], str]]:
    """A YAML mapping with its `extends:` chain merged in, and `file:line` of each key (the file
    that set it)."""
    path = Path(path)
    doc, text = read_yaml_mapping(path, what, error, hint)
    at_key = locations(str(path), text)
    parent = doc.pop(EXTENDS, None)
    if parent is None:
        return doc, at_key
    where = at_key.get((EXTENDS,), str(path))
    if not isinstance(parent, str):
        raise error(f"{where}: `{EXTENDS}` is the path of the file this one starts from (a string)")
    parent_path = (path.parent / parent).resolve()
    if parent_path in seen or parent_path == path.resolve():
        raise error(f"{where}: `{EXTENDS}: {parent}` comes back to a file already in the chain")
    base, base_at = read_extended(parent_path, f"{what} (extended by {path})", error, seen=(*seen, path.resolve()))
    return merge_documents(base, doc), {**base_at, **at_key}


def load_yaml_model(model: type[M], path: str | Path, what: str, error: type[LlmtuneError],
                    overrides: list[str] | None = None, hint: str = "") -> M:
    """Read a YAML file (with its `extends:` chain), apply `section.key=value` overrides, validate it
    as `model`; every problem raises `error` with the file, line and key."""
    path = Path(path)
    doc, at_key = read_extended(path, what, error, hint)
    doc = apply_overrides(doc, overrides or [], error)
    loaded = validate(model, doc, str(path), error, at_key=at_key)
    if "source_path" in type(loaded).model_fields:  # a RecipeFile: its relative paths resolve beside it
        loaded.source_path = path.resolve()
    return loaded


def assign(obj: BaseModel, key: str, value: Any, where: str, error: type[LlmtuneError]) -> None:
    """`obj.key = value` checked by the model (validate_assignment), as `error` naming `where` (a CLI flag)."""
    try:
        setattr(obj, key, value)
    except ValidationError as err:
        raise error("; ".join(f"{where}: {e['msg']} (got {value!r})" for e in err.errors())) from None
