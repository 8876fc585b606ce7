"""The built-in corpus: three domains extracted from the Python standard library on this machine.

    builtin:prose   docstrings and comments of the stdlib's modules (one document per file)
    builtin:code    the same modules with docstrings and comments removed
    builtin:tests   the stdlib's own test files, as they are

It needs no download and is deterministic for a given Python version (files in sorted order).
Only the stdlib itself is read: a site-packages folder inside it (some installs have one)
would make the corpus differ from machine to machine.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import io
import json
import os
import sys
import sysconfig
import tokenize
from pathlib import Path

from tunelab.errors import DataError

DOMAINS = ("prose", "code", "tests")
EXTRACTOR_VERSION = 1
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}
_TEST_DIRS = {"test", "tests", "idle_test"}


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _python_files(root: Path) -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(root):  # os.walk does not follow symlinked dirs
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        files += [Path(dirpath) / f for f in filenames if f.endswith(".py")]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _is_test(rel: Path) -> bool:
    return bool(_TEST_DIRS & set(rel.parts[:-1])) or rel.name.startswith("test_")


def _docstring_nodes(tree: ast.AST) -> list[ast.Expr]:
    nodes = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                    and isinstance(first.value.value, str):
                nodes.append(first)
    return nodes


def split_prose_and_code(source: str) -> tuple[str, str] | None:
    """(docstrings + comments, code without them) of one module; None if it does not parse."""
    try:
        tree = ast.parse(source)
        tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    except (SyntaxError, ValueError, tokenize.TokenError, RecursionError):
        return None
    docstrings = sorted(_docstring_nodes(tree), key=lambda n: n.lineno)
    lines = source.splitlines()
    drop: dict[int, tuple[int, int] | None] = {}  # line number (0-based) -> (start col, end col) or whole line
    prose: list[tuple[int, str]] = []
    for node in docstrings:
        prose.append((node.lineno, inspect.cleandoc(node.value.value)))
        for ln in range(node.lineno - 1, node.end_lineno):
            drop[ln] = None
    comment_end = -2
    for tok in tokens:
        if tok.type == tokenize.COMMENT:
            text = tok.string.lstrip("#").strip()
            if text and not text.startswith("!"):
                # A comment continued on the next line is one paragraph, not several.
                if comment_end == tok.start[0] - 1 and prose:
                    prose[-1] = (prose[-1][0], prose[-1][1] + "\n" + text)
                else:
                    prose.append((tok.start[0], text))
                comment_end = tok.start[0]
            ln = tok.start[0] - 1
            if ln not in drop:
                drop[ln] = (tok.start[1], tok.end[1])
    code_lines = []
    for i, line in enumerate(lines):
        if i in drop:
            span = drop[i]
            if span is None:
                continue
            line = line[:span[0]]
            if not line.strip():
                continue
        code_lines.append(line.rstrip())
    # A body that held only a docstring needs a statement to stay Python.
    fixed: list[str] = []
    for i, line in enumerate(code_lines):
        fixed.append(line)
        if line.rstrip().endswith(":") and line.lstrip().startswith(("def ", "class ", "async def ")):
            nxt = code_lines[i + 1] if i + 1 < len(code_lines) else ""
            indent = len(line) - len(line.lstrip())
            if not nxt.strip() or len(nxt) - len(nxt.lstrip()) <= indent:
                fixed.append(" " * (indent + 4) + "pass")
    prose_text = "\n\n".join(text for _, text in sorted(prose, key=lambda x: x[0]) if text)
    return prose_text, "\n".join(fixed).strip() + "\n"


def extract(root: Path) -> dict[str, list[str]]:
    """All three domains from the .py files under `root`."""
    out: dict[str, list[str]] = {d: [] for d in DOMAINS}
    for path in _python_files(root):
        rel = path.relative_to(root)
        source = path.read_bytes().decode("utf-8", errors="replace")
        if not source.strip():
            continue
        if _is_test(rel):
            out["tests"].append(source)
            continue
        split = split_prose_and_code(source)
        if split is None:
            continue
        prose, code = split
        if prose.strip():
            out["prose"].append(prose)
        if code.strip():
            out["code"].append(code)
    return out


def _fingerprint(root: Path) -> str:
    h = hashlib.sha256(repr((EXTRACTOR_VERSION, tuple(sys.version_info[:2]))).encode())
    for path in _python_files(root):
        h.update(f"{path.relative_to(root).as_posix()}\0{path.stat().st_size}\n".encode())
    return h.hexdigest()[:24]


def content_hash(docs: list[str]) -> str:
    h = hashlib.sha256()
    for doc in docs:
        data = doc.encode("utf-8", errors="surrogatepass")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def _write_jsonl_atomic(path: Path, docs: list[str]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps(doc) + "\n")
    os.replace(tmp, path)


def builtin_documents(domain: str, cache_dir: Path, root: Path | None = None) -> tuple[list[str], str]:
    """Documents of one built-in domain and their content hash, extracted once and cached."""
    if domain not in DOMAINS:
        raise DataError(f"builtin:{domain}: unknown built-in corpus; use one of "
                        + ", ".join(f"builtin:{d}" for d in DOMAINS))
    root = root or stdlib_root()
    where = Path(cache_dir) / "builtin" / _fingerprint(root)
    target = where / f"{domain}.jsonl"
    if not all((where / f"{d}.jsonl").is_file() for d in DOMAINS):
        where.mkdir(parents=True, exist_ok=True)
        for name, docs in extract(root).items():
            _write_jsonl_atomic(where / f"{name}.jsonl", docs)
    with open(target, encoding="utf-8") as f:
        docs = [json.loads(line) for line in f if line.strip()]
    if not docs:
        hint = (" (this Python has no stdlib test suite: install it, e.g. Debian's libpython3.11-testsuite, "
                "or use builtin:prose / builtin:code)" if domain == "tests" else "")
        raise DataError(f"builtin:{domain}: no documents found under {root}{hint}")
    return docs, content_hash(docs)
