"""The built-in corpus: three domains extracted from the Python standard library on this machine.

    builtin:prose   docstrings and comments of the stdlib's modules (one document per file)
    builtin:code    the same modules with docstrings and comments removed (one document per file)
    builtin:tests   the stdlib's own test files, as they are (one document per file)

It needs no download and is deterministic for a given Python version (files in sorted order).
Only the stdlib itself is read: a site-packages folder inside it (some installs have one)
would make the corpus differ from machine to machine.

Extraction takes seconds, so all three domains are extracted in one pass and cached as
<cache_dir>/builtin/<fingerprint>/<domain>.jsonl (one JSON string per line).
"""

from __future__ import annotations

import ast
import hashlib
import io
import json
import os
import re
import sys
import sysconfig
import tempfile
import tokenize
from pathlib import Path
from typing import Iterator

from tunelab.errors import DataError

DOMAINS = ("prose", "code", "tests")
# Bump when the extraction changes, so caches made by older code are not reused.
EXTRACTOR_VERSION = 2
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}
_TEST_DIRS = {"test", "tests", "idle_test"}
_CODING_COOKIE = re.compile(r"^[ \t\f]*#.*?coding[:=]")
_DOCSTRING_OWNERS = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


# ---------------------------------------------------------------- which files


def python_files(root: Path) -> list[Path]:
    """Relative paths of the stdlib's .py files, sorted as posix strings so every machine agrees."""
    root = Path(root)
    real_root = root.resolve()
    files = []
    for dirpath, dirnames, filenames in os.walk(root):  # does not descend into symlinked folders
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]
        for name in filenames:
            path = Path(dirpath) / name
            if not name.endswith(".py") or not path.is_file():
                continue
            if path.is_symlink() and not path.resolve().is_relative_to(real_root):
                continue  # e.g. Debian links sitecustomize.py to /etc: not part of the stdlib
            files.append(path.relative_to(root))
    return sorted(files, key=lambda p: p.as_posix())


def is_test_file(rel: Path) -> bool:
    return bool(_TEST_DIRS & set(rel.parts[:-1])) or rel.name.startswith("test_")


# ---------------------------------------------------------------- prose / code split


def _docstring_owners(tree: ast.AST) -> list[ast.AST]:
    return [node for node in ast.walk(tree)
            if isinstance(node, _DOCSTRING_OWNERS) and ast.get_docstring(node, clean=False) is not None]


def _comment_prose(tokens: list[tokenize.TokenInfo]) -> list[tuple[int, str]]:
    """(line, text) of the comments; a block of comments on consecutive lines is one paragraph."""
    paragraphs: list[tuple[int, str]] = []
    previous_line = -1
    for tok in tokens:
        if tok.type != tokenize.COMMENT:
            continue
        line = tok.start[0]
        text = tok.string[1:]
        text = (text[1:] if text.startswith(" ") else text).rstrip()
        # Shebangs and coding cookies are directives for the interpreter, not prose.
        if line <= 2 and (text.startswith("!") or _CODING_COOKIE.match(tok.line)):
            continue
        if not text.strip():
            continue  # an empty "#" line separates paragraphs, since previous_line is not advanced
        if paragraphs and previous_line == line - 1:
            paragraphs[-1] = (paragraphs[-1][0], paragraphs[-1][1] + "\n" + text)
        else:
            paragraphs.append((line, text))
        previous_line = line
    return paragraphs


def _char_col(line: str, byte_col: int) -> int:
    # ast columns count UTF-8 bytes; str slicing counts characters.
    return len(line.encode("utf-8")[:byte_col].decode("utf-8", errors="ignore"))


def _strip_code(lines: list[str], owners: list[ast.AST], tokens: list[tokenize.TokenInfo]) -> str:
    """The source without docstrings and comments; `pass` where a docstring was a whole body."""
    comment_col = {tok.start[0] - 1: tok.start[1] for tok in tokens if tok.type == tokenize.COMMENT}
    out: list[str | None] = list(lines)  # None: line removed
    touched: set[int] = set(comment_col)
    for i, col in comment_col.items():
        out[i] = lines[i][:col]
    for owner in owners:
        node = owner.body[0]
        first, last = node.lineno - 1, node.end_lineno - 1
        keep = lines[first][:_char_col(lines[first], node.col_offset)]
        tail = out[last][_char_col(lines[last], node.end_col_offset):]
        tail = tail.strip().removeprefix(";").strip()  # `"doc"; x = 1` leaves `x = 1`
        filler = "pass" if len(owner.body) == 1 and not isinstance(owner, ast.Module) else ""
        out[first] = keep + filler + tail
        for i in range(first + 1, last + 1):
            out[i] = None
        touched.update(range(first, last + 1))
    code: list[str] = []
    blank_run = 0
    for i, line in enumerate(out):
        if line is None or (i in touched and not line.strip()):
            continue  # a line that held only a comment or docstring disappears with it
        line = line.rstrip()
        blank_run = blank_run + 1 if not line else 0
        if blank_run <= 2:
            code.append(line)
    return "\n".join(code).strip("\n") + "\n"


def split_prose_and_code(source: str) -> tuple[str, str] | None:
    """(docstrings + comments, code without them) of one module; None if it does not parse."""
    # ast and tokenize count \n, \r\n and \r as line ends, and nothing else (not \f, unlike splitlines).
    source = source.replace("\r\n", "\n").replace("\r", "\n")
    try:
        tree = ast.parse(source)
        tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    except (SyntaxError, ValueError, tokenize.TokenError, RecursionError, MemoryError):
        return None
    owners = _docstring_owners(tree)
    prose = [(owner.body[0].lineno, ast.get_docstring(owner)) for owner in owners]
    prose += _comment_prose(tokens)
    prose_text = "\n\n".join(text for _, text in sorted(prose, key=lambda p: p[0]) if text.strip())
    code_text = _strip_code(source.split("\n"), owners, tokens)
    return prose_text, code_text


# ---------------------------------------------------------------- extraction and cache


def extract(root: Path, files: list[Path] | None = None) -> dict[str, list[str]]:
    """All three domains from the .py files under `root` (relative `files`, default: all of them)."""
    root = Path(root)
    out: dict[str, list[str]] = {d: [] for d in DOMAINS}
    for rel in python_files(root) if files is None else files:
        source = (root / rel).read_bytes().decode("utf-8", errors="replace")
        if not source.strip():
            continue  # the many empty __init__.py files are not documents
        if is_test_file(rel):
            out["tests"].append(source)
            continue
        split = split_prose_and_code(source)
        if split is None:
            continue  # deliberately broken files (badsyntax_*, lib2to3 test data) have no prose/code split
        prose, code = split
        if prose.strip():
            out["prose"].append(prose)
        if code.strip():
            out["code"].append(code)
    return out


def fingerprint(root: Path, files: list[Path]) -> str:
    h = hashlib.sha256(repr((EXTRACTOR_VERSION, tuple(sys.version_info[:2]))).encode())
    for rel in files:
        h.update(f"{rel.as_posix()}\0{(Path(root) / rel).stat().st_size}\n".encode())
    return h.hexdigest()[:24]


def content_hash(docs: list[str]) -> str:
    """sha256 over the documents in order, each length-prefixed so document boundaries count."""
    h = hashlib.sha256()
    for doc in docs:
        data = doc.encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def _write_jsonl_atomic(path: Path, docs: list[str]) -> None:
    # Two DDP ranks may extract at once: each writes its own temp file and the rename is atomic.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for doc in docs:
                f.write(json.dumps(doc) + "\n")
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a shared cache must be readable by all its users
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def documents_under(root: Path, domain: str, cache_dir: Path) -> tuple[list[str], str]:
    """builtin_documents for the stdlib at `root` (tests point it at a fake tree)."""
    if domain not in DOMAINS:
        raise DataError(f"builtin:{domain}: unknown built-in corpus; use one of "
                        + ", ".join(f"builtin:{d}" for d in DOMAINS) + " (or builtin:instruct: chat examples)")
    root = Path(root)
    files = python_files(root)
    where = Path(cache_dir) / "builtin" / fingerprint(root, files)
    if not all((where / f"{d}.jsonl").is_file() for d in DOMAINS):
        where.mkdir(parents=True, exist_ok=True)
        for name, docs in extract(root, files).items():
            _write_jsonl_atomic(where / f"{name}.jsonl", docs)
    with open(where / f"{domain}.jsonl", encoding="utf-8") as f:
        docs = [json.loads(line) for line in f if line.strip()]
    if not docs:
        if domain == "tests":
            raise DataError(f"builtin:tests: the Python standard library at {root} has no test files; install "
                            "its test suite (e.g. Debian/Ubuntu: apt install libpython3.11-testsuite) "
                            "or use builtin:prose / builtin:code")
        raise DataError(f"builtin:{domain}: no documents found in the Python standard library at {root}")
    return docs, content_hash(docs)


def builtin_documents(domain: str, cache_dir: Path) -> tuple[list[str], str]:
    """Documents of one domain and a sha256 hex content hash of them, extracted once and cached."""
    return documents_under(stdlib_root(), domain, cache_dir)


# Packages of the stdlib that hold an IDE and demo programs: stdlib files, but not library API anyone
# asks about (the built-in instruction data and multiple-choice task leave them out).
SKIP_PACKAGES = {"idlelib", "turtledemo"}


def module_name(rel: Path) -> str | None:
    """`urllib/parse.py` -> `urllib.parse`, `json/__init__.py` -> `json`; None for private or skipped ones."""
    parts = list(rel.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    if not parts or parts[0] in SKIP_PACKAGES or any(p.startswith("_") for p in parts):
        return None
    return ".".join(parts)


def public_definitions(root: Path, files: list[Path]) -> Iterator[tuple[str, ast.FunctionDef, ast.ClassDef | None]]:
    """(module, function node, its class or None) of every public module-level function and every public
    method of a public module-level class, in file order: what the built-in instruction data
    (data/instruct.py) and multiple-choice task (eval/builtin_tasks.py) ask about. Test files, private
    modules and files that do not parse are skipped."""
    for rel in files:
        module = module_name(rel)
        if module is None or is_test_file(rel):
            continue
        try:
            tree = ast.parse((root / rel).read_bytes())
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            continue  # deliberately broken files (lib2to3 test data) define nothing to ask about
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
                yield module, node, None
            elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                for item in node.body:
                    if isinstance(item, ast.FunctionDef) and not item.name.startswith("_"):
                        yield module, item, node
