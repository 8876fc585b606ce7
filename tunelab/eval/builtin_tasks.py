"""Multiple-choice tasks generated offline from the Python standard library (the built-in corpus's source).

    builtin:stdlib-module   "which standard-library module defines this function?" 4 choices

Each example names a public module-level function with the first line of its docstring; the choices
are module names, the distractors drawn from modules that define no function of that name (so
`dumps` never has both json and pickle among its choices). Generated deterministically (sorted
files, a seeded RNG) for a given Python version, like the corpus, and cached as JSONL under
<cache_dir>/builtin-tasks/<fingerprint>/, so the file can be read, or handed to lm-evaluation-harness.
"""

from __future__ import annotations

import ast
import json
import os
import random
from pathlib import Path

from tunelab.data.builtin import fingerprint, public_definitions, python_files, stdlib_root
from tunelab.errors import DataError
from tunelab.paths import resolve_cache_dir

# Bump when the generation changes, so caches made by older code are not reused.
TASK_VERSION = 1
EXAMPLES = 200
CHOICES = 4
SEED = 0


def public_functions(root: Path, files: list[Path]) -> list[tuple[str, str, str, str]]:
    """(module, function, argument list, docstring summary) of every public module-level function with a
    docstring, in file order."""
    found = []
    for module, node, cls in public_definitions(root, files):
        doc = ast.get_docstring(node) if cls is None else None
        summary = doc.strip().split("\n\n")[0].replace("\n", " ").strip() if doc else ""
        if summary:
            found.append((module, node.name, ast.unparse(node.args), " ".join(summary.split())[:200]))
    return found


def stdlib_module_examples(functions: list[tuple[str, str, str, str]], n: int = EXAMPLES, choices: int = CHOICES,
                           seed: int = SEED) -> list[dict]:
    rng = random.Random(seed)
    modules = sorted({m for m, *_ in functions})
    defined_in: dict[str, set[str]] = {}
    for module, name, *_ in functions:
        defined_in.setdefault(name, set()).add(module)
    picked = rng.sample(functions, min(n, len(functions)))
    examples = []
    for module, name, args, summary in picked:
        others = [m for m in modules if m not in defined_in[name]]
        options = [module] + rng.sample(others, choices - 1)
        rng.shuffle(options)
        examples.append({"context": f"def {name}({args}):\n    \"\"\"{summary}\"\"\"\n\n"
                                    f"The function {name} above is defined in the Python module",
                         "choices": [f" {m}" for m in options], "answer": options.index(module)})
    return examples


TASKS = {"stdlib-module": stdlib_module_examples}


def builtin_task_file(name: str, cache_dir: Path | None = None, root: Path | None = None) -> Path:
    """The JSONL file of built-in task `name`, generated on first use (a few seconds) and cached."""
    if name not in TASKS:
        raise DataError(f"--task: builtin:{name} is not a built-in task; use one of "
                        + ", ".join(f"builtin:{t}" for t in TASKS) + " or a JSONL file")
    if cache_dir is None:
        cache_dir = resolve_cache_dir()
    root = Path(root) if root is not None else stdlib_root()
    files = python_files(root)
    where = Path(cache_dir) / "builtin-tasks" / f"{fingerprint(root, files)}-v{TASK_VERSION}"
    path = where / f"{name}.jsonl"
    if not path.is_file():
        examples = TASKS[name](public_functions(root, files))
        if len(examples) < 2:
            raise DataError(f"builtin:{name}: the Python standard library at {root} has too few documented "
                            "functions to build the task; use a JSONL task file")
        where.mkdir(parents=True, exist_ok=True)
        # Two processes may generate it at once: each writes its own temp file, the rename is atomic.
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text("".join(json.dumps(e) + "\n" for e in examples), encoding="utf-8")
        os.replace(tmp, path)
    return path
