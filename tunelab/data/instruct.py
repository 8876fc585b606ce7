"""Built-in instruction data, generated offline from the Python standard library on this machine.

    builtin:instruct     chat examples: "What does `json.dumps` do?" -> the first paragraph of its docstring;
                         some with a system prompt, some two-turn (then "How is it called?" -> its signature)
    builtin:preference   preference pairs for preference tuning: the same questions, `chosen` the right
                         docstring summary, `rejected` the summary of another function (format:
                         preference, for the preference methods: dpo, simpo, orpo)

One example per documented public function or method (public module-level functions and the public
methods of public module-level classes, test files and private modules skipped), in file order, with
its form and wording picked by a hash of its qualified name, so examples do not move when the stdlib
gains a function. Deterministic for a Python version, like the corpus, and written once as JSONL in
the chat format (data/chat.py) under <cache_dir>/builtin-instruct/<fingerprint>-v<version>/, so the
files can be read or handed to other tools.

builtin:instruct is read as that file (format: chat), builtin:preference as its (format: preference). The
held-out split is the usual rule (data/split.py) applied to whole examples: one example per function, so
a held-out function is never trained on in any form. A pair is hashed as its prompt + chosen chat
(chat.PreferencePair.text), so a single-turn question without a system prompt (6 in 10) is held out of
both files alike.
"""

from __future__ import annotations

import ast
import copy
import hashlib
import json
import os
import random
from pathlib import Path

from tunelab.data.builtin import fingerprint, public_definitions, python_files, stdlib_root
from tunelab.errors import DataError

# Bump when the generation changes, so files made by older code are not reused.
INSTRUCT_VERSION = 1
NAMES = ("instruct", "preference")
SUMMARY_CHARS = 240  # longer first paragraphs are cut at a sentence (or word) end
SYSTEM = "You are a concise assistant that answers questions about the Python standard library."
QUESTIONS = ("What does `{q}` do?", "Explain `{q}` in one sentence.", "What is `{q}` for?",
             "Describe the {kind} `{q}`.")


def summary(doc: str | None) -> str:
    """The docstring's first paragraph on one line, at most SUMMARY_CHARS characters ("" if none)."""
    if not doc:
        return ""
    text = " ".join(doc.strip().split("\n\n")[0].split())
    if len(text) <= SUMMARY_CHARS:
        return text
    cut = text.rfind(". ", 0, SUMMARY_CHARS)
    return text[:cut + 1] if cut > 40 else text[:text.rfind(" ", 0, SUMMARY_CHARS)] + " ..."


def _signature(node: ast.FunctionDef, method: bool) -> str:
    args = copy.copy(node.args)
    static = any(isinstance(d, ast.Name) and d.id == "staticmethod" for d in node.decorator_list)
    if method and not static:  # self / cls is not passed by the caller
        if args.posonlyargs:
            args.posonlyargs = args.posonlyargs[1:]
        else:
            args.args = args.args[1:]
        n = len(args.posonlyargs) + len(args.args)
        args.defaults = args.defaults[len(args.defaults) - min(len(args.defaults), n):]
    return ast.unparse(args)


def _is_property(node: ast.FunctionDef) -> bool:
    return any(isinstance(d, ast.Name) and d.id in ("property", "cached_property")
               or isinstance(d, ast.Attribute) and d.attr in ("setter", "getter", "deleter", "cached_property")
               for d in node.decorator_list)


def documented_callables(root: Path, files: list[Path]) -> list[tuple[str, str, str, str]]:
    """(qualified name, kind (function | method), argument list, docstring summary) of every documented
    public function and public method of a public class, in file order; a name seen twice keeps its first."""
    found, seen = [], set()
    for module, node, cls in public_definitions(root, files):
        if cls is not None and _is_property(node):  # a property is read, not called
            continue
        name = f"{module}.{cls.name}.{node.name}" if cls is not None else f"{module}.{node.name}"
        text = summary(ast.get_docstring(node))
        # Skip the empty, the tiny, and docstrings that only restate a signature ("f(x) -> y").
        if name in seen or len(text) < 12 or text.startswith(f"{node.name}("):
            continue
        seen.add(name)
        found.append((name, "function" if cls is None else "method", _signature(node, cls is not None), text))
    return found


def _hash(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big")


def instruct_examples(callables: list[tuple[str, str, str, str]]) -> list[dict]:
    """One chat example per callable: 6/10 a question, 2/10 with a system prompt, 2/10 two turns."""
    examples = []
    for name, kind, args, text in callables:
        h = _hash(name)
        question = QUESTIONS[h % len(QUESTIONS)].format(q=name, kind=kind)
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": text}]
        form = (h >> 8) % 10
        if form in (6, 7):
            messages.insert(0, {"role": "system", "content": SYSTEM})
        elif form in (8, 9):
            messages += [{"role": "user", "content": "How is it called?"},
                         {"role": "assistant", "content": f"`{name}({args})`"}]
        examples.append({"messages": messages})
    return examples


def preference_pairs(callables: list[tuple[str, str, str, str]]) -> list[dict]:
    """One pair per callable: the question, its own summary (chosen) and another callable's (rejected)."""
    pairs = []
    for name, kind, _, text in callables:
        rng = random.Random(_hash(name))
        for _ in range(20):  # another summary; a few stdlib docstrings repeat word for word
            other = callables[rng.randrange(len(callables))][3]
            if other != text:
                break
        else:
            continue
        question = QUESTIONS[_hash(name) % len(QUESTIONS)].format(q=name, kind=kind)
        pairs.append({"messages": [{"role": "user", "content": question}], "chosen": text, "rejected": other})
    return pairs


def builtin_instruct_file(name: str, cache_dir: Path, root: Path | None = None) -> Path:
    """The JSONL file of builtin:<name> (instruct or preference), generated on first use and cached."""
    if name not in NAMES:
        raise DataError(f"builtin:{name}: unknown; the generated instruction sources are builtin:instruct and "
                        "builtin:preference")
    root = Path(root) if root is not None else stdlib_root()
    files = python_files(root)
    where = Path(cache_dir) / "builtin-instruct" / f"{fingerprint(root, files)}-v{INSTRUCT_VERSION}"
    path = where / f"{name}.jsonl"
    if not all((where / f"{n}.jsonl").is_file() for n in NAMES):
        callables = documented_callables(root, files)
        if len(callables) < 10:
            raise DataError(f"builtin:{name}: the Python standard library at {root} has too few documented "
                            "functions to generate instruction data; use a JSONL file of chat examples")
        where.mkdir(parents=True, exist_ok=True)
        for n, rows in (("instruct", instruct_examples(callables)), ("preference", preference_pairs(callables))):
            # Two processes (DDP ranks) may generate at once: each writes its own temp file, the rename is atomic.
            tmp = where / f".{n}.jsonl.{os.getpid()}.tmp"
            tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
            os.replace(tmp, where / f"{n}.jsonl")
    return path
