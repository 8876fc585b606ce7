"""Reading recipes: YAML, `--set` overrides, one-line validation errors, the kind -> recipe class table."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from tunelab.errors import ConfigError

from tunelab.config.base import Section, did_you_mean
from tunelab.config.ops import AverageRecipe, MergeRecipe, PruneRecipe
from tunelab.config.training import FinetuneRecipe, PretrainRecipe, _as_source_list

class YamlLoader(yaml.SafeLoader):
    """SafeLoader that reads `1e-5` as a float, as YAML 1.2 and every user do (YAML 1.1 needs `1.0e-5`).

    Typed fields would coerce the string anyway, but untyped ones (model.overrides,
    method.options) would pass "1e-5" on to transformers as a string.
    """


YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def load_yaml(text: str):
    return yaml.load(text, Loader=YamlLoader)




def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (["a", "b"], value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. --set train.max_steps=100")
    key, raw = text.split("=", 1)
    if not key.strip():
        raise ConfigError(f"--set {text!r}: empty key")
    try:
        value = load_yaml(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for text in overrides:
        path, value = parse_override(text)
        node: Any = data
        for i, part in enumerate(path[:-1]):
            if isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
                continue
            if not isinstance(node, dict):
                raise ConfigError(f"--set {text!r}: {'.'.join(path[:i])} is not a section")
            node = node.setdefault(part, {})
            if node is None:
                node = {}
        last = path[-1]
        if isinstance(node, list) and last.isdigit() and int(last) < len(node):
            node[int(last)] = value
        elif isinstance(node, dict):
            node[last] = value
        else:
            raise ConfigError(f"--set {text!r}: {'.'.join(path[:-1])} is not a section")
    return data


def _model_at(loc: tuple, root: type[BaseModel]) -> type[BaseModel] | None:
    """The pydantic model class that owns the field at `loc` (for did-you-mean hints)."""
    cls: Any = root
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = getattr(cls, "model_fields", {}).get(part)
        if field is None:
            return None
        ann = field.annotation
        args = getattr(ann, "__args__", ()) or ()
        candidates = [ann, *args]
        nxt = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if nxt is None:
            return None
        cls = nxt
    return cls


def format_validation_error(err: ValidationError, source: str, root: type[BaseModel]) -> str:
    first = err.errors()[0]
    loc = tuple(first["loc"])
    path = ".".join(str(p) for p in loc) or "(top level)"
    if first["type"] == "extra_forbidden":
        owner = _model_at(loc, root)
        hint = did_you_mean(loc[-1], owner.model_fields) if owner else ""
        msg = f"unknown key{hint}"
    else:
        msg = first["msg"].removeprefix("Value error, ")
        if "input" in first and first["type"] not in ("missing",) and not isinstance(first["input"], dict):
            msg += f" (got {first['input']!r})"
    more = len(err.errors()) - 1
    tail = f" [+{more} more]" if more else ""
    return f"{source}: {path}: {msg}{tail}" if loc else f"{source}: {msg}{tail}"


def validate(data: dict, source: str, cls: type[BaseModel]):
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source, cls)) from None


def read_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: recipe not found (give a path to a YAML file or a shipped recipe name)")
    try:
        data = load_yaml(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{p}:{where}: not valid YAML ({getattr(err, 'problem', err)})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: a recipe must be a YAML mapping of sections (model, data, train, ...)")
    return data



RECIPES_DIR = Path(__file__).parent.parent / "recipes"


def resolve_recipe_path(name_or_path: str | Path, folder: str = "") -> Path:
    """A path to a YAML file, or the name of a shipped recipe: `quickstart`, or with folder="merges"
    a merge recipe (recipes/merges/NAME.yaml). A name found only among the training recipes still
    resolves, so its `kind` gives the clearer error."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    where = RECIPES_DIR / folder
    for candidate in (where / f"{name_or_path}.yaml", RECIPES_DIR / f"{name_or_path}.yaml"):
        if candidate.is_file():
            return candidate
    names = sorted(x.stem for x in where.glob("*.yaml"))
    what = f"shipped {folder.rstrip('s')} recipes" if folder else "shipped"
    raise ConfigError(f"{name_or_path}: no such recipe file{did_you_mean(p.stem, names)}; {what}: {', '.join(names)}")


def is_recipe(arg: str, folder: str = "") -> bool:
    """A YAML file or the name of a shipped recipe (recipes/FOLDER/ or recipes/); a model directory never is."""
    path = Path(arg)
    if path.is_dir():
        return False
    return path.suffix in (".yaml", ".yml") or (not path.exists() and any(
        (where / f"{arg}.yaml").is_file() for where in (RECIPES_DIR / folder, RECIPES_DIR)))


def expand_shorthands(data: dict) -> dict:
    """`data.train: builtin:prose` -> a one-item list, so `--set data.train.0.weight=2` can index it."""
    section = data.get("data")
    if isinstance(section, dict):
        for key in ("train", "eval"):
            if key in section:
                section[key] = _as_source_list(section[key])
    return data


def validate_kind(data: dict, source: str, kind: str | None = None):
    """Validate a recipe mapping by the schema of its `kind` (default: the `kind` argument, else pretrain).

    `kind` is the stage the user asked for (`tunelab finetune` -> finetune): a recipe without a
    kind takes it; one that names another kind is refused rather than silently reinterpreted.
    The schema only: tunelab.recipe.validate_recipe then checks what needs the methods, objectives and models.
    """
    data = dict(data)
    named = data.get("kind")
    if named is not None and kind is not None and named != kind:
        raise ConfigError(f"{source}: kind: this is a {named!r} recipe; run it with `tunelab {named}` "
                          f"(or change kind to {kind!r})")
    data["kind"] = named or kind or "pretrain"
    if data["kind"] not in RECIPE_KINDS:
        raise ConfigError(f"{source}: kind: unknown kind {data['kind']!r}{did_you_mean(data['kind'], RECIPE_KINDS)}; "
                          f"known: {', '.join(RECIPE_KINDS)}")
    return validate(data, source, RECIPE_KINDS[data["kind"]])


def dump_config(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


# ---------------------------------------------------------------- merge recipes (kind: merge)
# A merge works on saved models, without the training loop (stages/merge.py, ops/merge.py). Its sections
# differ from a training recipe's, so it is validated with `validate(data, source, MergeRecipe)`, not
# validate_recipe (which also checks a training method's options).


# The recipe is a union discriminated by `kind`: validate_recipe picks the class from this table, so
# each kind validates its own sections. A new kind adds its class here and a line in stages.STAGES.
RECIPE_KINDS: dict[str, type[Section]] = {"pretrain": PretrainRecipe, "finetune": FinetuneRecipe,
                                          "merge": MergeRecipe, "prune": PruneRecipe, "average": AverageRecipe}
