"""The layers of tunelab, kept by a test (ARCHITECTURE.md draws them):

    commands  tunelab/commands/: the CLI and one module per command body; may import everything below
    stages    tunelab/stages/: one module per stage kind (+ the shared set-up); meet only through run
              directories and library calls, never by importing each other
    library   everything else (methods, objectives, ops, data, eval, train, report, models, ...)
    config    tunelab/config/: the recipe schema; imports nothing of tunelab but errors
    base      tunelab/errors.py (and the package itself): imported by all, imports nothing

An import anywhere in a module counts, inside functions too (a function-local import is still an edge
when it runs); only `if TYPE_CHECKING:` blocks do not, since they never run. A small AST walk rather
than import-linter: no new dependency, and the rules below read as the layering they keep.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "tunelab"
# A stage kind's own helper modules: the prune stage runs its method imp as a lottery.
STAGE_PARTS = {"tunelab.stages.lottery": "tunelab.stages.prune"}
# What every stage may import: the registry (a lottery runs training stages) and the shared set-up.
SHARED_STAGE_MODULES = {"tunelab.stages", "tunelab.stages.setup", "tunelab.stages.training_data"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in ROOT.rglob("*.py")}


def _type_checking_block(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (getattr(test, "id", None) == "TYPE_CHECKING"
                                         or getattr(test, "attr", None) == "TYPE_CHECKING")


def _owner(name: str) -> str | None:
    """The tunelab module an imported name lives in (`tunelab.config.load_yaml` -> `tunelab.config`)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str) -> set[str]:
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if _type_checking_block(node):
            return
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package
                for _ in range(node.level - 1):
                    anchor = anchor.rpartition(".")[0]
                base = f"{anchor}.{base}" if base else anchor
            names = [f"{base}.{a.name}" for a in node.names]
        else:
            names = []
        for name in names:
            owner = _owner(name) if name.startswith("tunelab") else None
            if owner and owner != module:
                found.add(owner)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return found


GRAPH = {m: imports_of(m) for m in MODULES}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


ORDER = ["base", "config", "library", "stages", "commands"]


def layer(module: str) -> str:
    if module in ("tunelab", "tunelab.errors"):
        return "base"
    for prefix, name in (("tunelab.commands", "commands"), ("tunelab.stages", "stages"), ("tunelab.config", "config")):
        if module == prefix or module.startswith(prefix + "."):
            return name
    return "commands" if module == "tunelab.__main__" else "library"


def test_the_walk_sees_imports_inside_functions_and_skips_type_checking_blocks():
    # A function-local import (lottery runs training stages through the registry) is an edge ...
    assert "tunelab.stages" in GRAPH["tunelab.stages.lottery"]
    # ... an `if TYPE_CHECKING:` import is not (setup names training_data's type only for annotations).
    assert "tunelab.stages.training_data" not in GRAPH["tunelab.stages.setup"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    assert cycles(GRAPH) == []


def test_config_imports_nothing_of_tunelab_but_errors():
    wrong = {m: sorted(t for t in ts if layer(t) not in ("config", "base"))
             for m, ts in GRAPH.items() if layer(m) == "config"}
    assert {m: ts for m, ts in wrong.items() if ts} == {}


@pytest.mark.parametrize("lower", ORDER[:-1])
def test_no_layer_imports_a_layer_above_it(lower):
    above = set(ORDER[ORDER.index(lower) + 1:])
    upward = {m: sorted(t for t in ts if layer(t) in above) for m, ts in GRAPH.items() if layer(m) == lower}
    assert {m: ts for m, ts in upward.items() if ts} == {}


def test_stages_meet_through_run_directories_not_imports():
    crossing = {}
    for module, targets in GRAPH.items():
        if layer(module) != "stages" or module in SHARED_STAGE_MODULES:
            continue
        own = {module, STAGE_PARTS.get(module)} | {part for part, kind in STAGE_PARTS.items() if kind == module}
        other = sorted(t for t in targets if layer(t) == "stages" and t not in own | SHARED_STAGE_MODULES)
        if other:
            crossing[module] = other
    assert crossing == {}
