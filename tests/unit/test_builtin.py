"""The built-in corpus extracted from the stdlib: sizes, determinism, the prose/code split, what is read."""

from __future__ import annotations

import ast
import inspect
import json
import textwrap

import pytest

from tunelab.data import builtin
from tunelab.data.builtin import DOMAINS, builtin_documents, documents_under, split_prose_and_code
from tunelab.errors import DataError

HAS_TESTS = any(builtin.is_test_file(rel) for rel in builtin.python_files(builtin.stdlib_root()))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("builtin-cache")


@pytest.fixture(scope="module")
def corpus(cache_dir):
    """One real extraction of the installed stdlib, shared by the tests below: {domain: (docs, hash)}."""
    return {d: builtin_documents(d, cache_dir) for d in DOMAINS if d != "tests" or HAS_TESTS}


# ---------------------------------------------------------------- the real stdlib


def test_domain_sizes_are_plausible(corpus):
    sizes = {d: sum(len(doc.encode()) for doc in docs) for d, (docs, _) in corpus.items()}
    for domain, size in sizes.items():
        assert size > 1_000_000, (domain, size)
        assert len(corpus[domain][0]) > 100
        assert all(doc.strip() for doc in corpus[domain][0])
    if HAS_TESTS:
        assert sizes["tests"] > sizes["code"] > sizes["prose"]


def test_cached_call_is_identical_and_does_not_extract(corpus, cache_dir, monkeypatch):
    def no_extraction(*args, **kwargs):
        raise AssertionError("extracted again although the cache is complete")

    monkeypatch.setattr(builtin, "extract", no_extraction)
    for domain, (docs, digest) in corpus.items():
        assert builtin_documents(domain, cache_dir) == (docs, digest)
    assert not [p for p in cache_dir.rglob("*") if p.name.endswith(".tmp")]


def test_fresh_extraction_gives_the_same_hash(corpus, tmp_path):
    docs, digest = builtin_documents("prose", tmp_path)
    assert digest == corpus["prose"][1]
    assert docs == corpus["prose"][0]
    assert len(list((tmp_path / "builtin").glob("*/*.jsonl"))) == len(DOMAINS)


def test_content_hash_counts_document_boundaries():
    assert builtin.content_hash(["ab", "c"]) != builtin.content_hash(["a", "bc"])
    assert builtin.content_hash(["ab", "c"]) != builtin.content_hash(["abc"])
    assert builtin.content_hash(["x"]) == builtin.content_hash(["x"])


def test_docstrings_go_to_prose_not_code(corpus):
    prose, code = "\n".join(corpus["prose"][0]), "\n".join(corpus["code"][0])
    for function in (textwrap.dedent, json.dumps):
        doc = inspect.getdoc(function)
        assert doc and len(doc) > 100
        assert doc in prose
        first_line = doc.splitlines()[0]
        assert first_line not in code, first_line
    # The code around the docstrings is kept.
    assert "def dedent(text):" in code and "def dumps(obj, *, skipkeys=False" in code


def test_comments_go_to_prose_not_code(corpus):
    source = inspect.getsource(textwrap)
    comment = "Hardcode the recognized whitespace characters to the US-ASCII"
    assert f"# {comment}" in source  # the stdlib's textwrap.py still has this comment
    prose, code = "\n".join(corpus["prose"][0]), "\n".join(corpus["code"][0])
    assert comment in prose and comment not in code
    assert "# Hardcode" not in prose  # the comment marker is stripped


def test_code_documents_are_python(corpus):
    code_docs = corpus["code"][0]
    for doc in code_docs[:: max(1, len(code_docs) // 40)]:  # a sample: parsing all of them takes seconds
        tree = ast.parse(doc)
        assert not [n for n in ast.walk(tree) if isinstance(n, builtin._DOCSTRING_OWNERS)
                    and not isinstance(n, ast.Module) and ast.get_docstring(n) is not None]
        assert "\n\n\n\n" not in doc


# ---------------------------------------------------------------- the split on small sources


def test_split_removes_docstrings_and_comments():
    source = (
        '#!/usr/bin/env python3\n'
        '# -*- coding: utf-8 -*-\n'
        '"""Module doc."""\n'
        'import os  # why os\n'
        '\n\n\n\n\n'
        'def only_doc():\n'
        '    """Only a docstring."""\n'
        '\n'
        'def one_liner(): "Inline doc."\n'
        '\n'
        'class K:\n'
        '    """Class doc.\n'
        '\n'
        '    More lines.\n'
        '    """\n'
        '    # first line of a block\n'
        '    # second line of a block\n'
        '    x = "# not a comment"   \n'
    )
    prose, code = split_prose_and_code(source)
    assert prose == ("Module doc.\n\nwhy os\n\nOnly a docstring.\n\nInline doc.\n\nClass doc.\n\nMore lines.\n\n"
                     "first line of a block\nsecond line of a block")
    assert code == ('import os\n'
                    '\n\n'
                    'def only_doc():\n'
                    '    pass\n'
                    '\n'
                    'def one_liner(): pass\n'
                    '\n'
                    'class K:\n'
                    '    x = "# not a comment"\n')
    ast.parse(code)


def test_split_skips_files_that_do_not_parse():
    assert split_prose_and_code("def broken(:\n    pass\n") is None


# ---------------------------------------------------------------- which files are read


def _fake_stdlib(root):
    """A small tree shaped like a stdlib, with the folders and files that must not be read."""
    files = {
        "mod.py": '"""Normal module doc."""\n# normal comment\nVALUE = 1\n',
        "pkg/__init__.py": "",
        "pkg/sub.py": "def f():\n    'Sub doc.'\n    return 2\n",
        "badsyntax_future.py": '"""Broken doc."""\ndef (:\n',
        "test/__init__.py": "",
        "test/test_x.py": "def test_x():\n    assert True  # test comment\n",
        "test/badsyntax_y.py": "def (:\n",
        "pkg/tests/helper.py": "HELPER = 1\n",
        "idlelib/idle_test/htest.py": "HTEST = 1\n",
        "test_top.py": "TOP = 1\n",
        "site-packages/foo.py": '"""SITE-PACKAGES doc."""\nFOO = 1\n',
        "site-packages/test/test_foo.py": "SITE_TEST = 1\n",
        "dist-packages/bar.py": "BAR = 1\n",
        "__pycache__/cached.py": "CACHED = 1\n",
        "notes.txt": "NOT PYTHON\n",
        "mod.pyc.py.txt": "NOT PYTHON EITHER\n",
    }
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def test_only_the_stdlib_is_read(tmp_path):
    root = _fake_stdlib(tmp_path / "lib")
    outside = tmp_path / "elsewhere" / "outside.py"
    outside.parent.mkdir()
    outside.write_text('"""OUTSIDE doc."""\nOUTSIDE = 1\n')
    try:
        (root / "linked.py").symlink_to(outside)
        (root / "linked_dir").symlink_to(outside.parent, target_is_directory=True)
    except OSError:
        pass  # no symlinks on this filesystem: the rest still holds

    assert [p.as_posix() for p in builtin.python_files(root)] == [
        "badsyntax_future.py", "idlelib/idle_test/htest.py", "mod.py", "pkg/__init__.py", "pkg/sub.py",
        "pkg/tests/helper.py", "test/__init__.py", "test/badsyntax_y.py", "test/test_x.py", "test_top.py"]

    cache = tmp_path / "cache"
    prose, _ = documents_under(root, "prose", cache)
    code, _ = documents_under(root, "code", cache)
    tests, _ = documents_under(root, "tests", cache)
    assert prose == ["Normal module doc.\n\nnormal comment", "Sub doc."]
    assert code == ["VALUE = 1\n", "def f():\n    return 2\n"]
    assert tests == ["HTEST = 1\n", "HELPER = 1\n", "def (:\n",
                     "def test_x():\n    assert True  # test comment\n", "TOP = 1\n"]
    everything = "".join(prose + code + tests)
    for marker in ("SITE", "FOO", "BAR", "CACHED", "NOT PYTHON", "OUTSIDE", "Broken"):
        assert marker not in everything


def test_a_changed_file_is_extracted_again(tmp_path):
    root = _fake_stdlib(tmp_path / "lib")
    cache = tmp_path / "cache"
    before, digest_before = documents_under(root, "code", cache)
    (root / "mod.py").write_text('"""Normal module doc."""\nVALUE = 12345\n')
    after, digest_after = documents_under(root, "code", cache)
    assert before[0] == "VALUE = 1\n" and after[0] == "VALUE = 12345\n"
    assert digest_before != digest_after
    assert len(list((cache / "builtin").iterdir())) == 2


def test_no_test_files_is_a_data_error_with_a_fix(tmp_path):
    root = tmp_path / "lib"
    root.mkdir()
    (root / "mod.py").write_text('"""Doc."""\nX = 1\n')
    assert documents_under(root, "prose", tmp_path / "cache")[0] == ["Doc."]
    with pytest.raises(DataError, match="no test files") as err:
        documents_under(root, "tests", tmp_path / "cache")
    assert "builtin:prose" in str(err.value) and "\n" not in str(err.value)


def test_unknown_domain_is_a_data_error(tmp_path):
    with pytest.raises(DataError) as err:
        builtin_documents("poetry", tmp_path)
    message = str(err.value)
    assert "\n" not in message
    assert all(f"builtin:{d}" in message for d in DOMAINS)
    assert not (tmp_path / "builtin").exists()  # rejected before any extraction


def test_one_scan_of_public_definitions_feeds_the_instruction_data_and_the_task(tmp_path):
    from tunelab.data.instruct import documented_callables
    from tunelab.eval.builtin_tasks import public_functions

    files = {"mod.py": textwrap.dedent('''
                 def public(a, b=1):
                     """Adds things together nicely."""
                 def _private():
                     """Not asked about at all."""
                 class Thing:
                     def method(self, x):
                         """Does something with x, clearly."""
                     @property
                     def prop(self):
                         """A property is read, not called."""
                     def _hidden(self):
                         """Private methods are skipped."""
                 class _Private:
                     def m(self):
                         """Private classes are skipped."""
                 '''),
             "broken.py": "def (:\n", "_private_mod.py": 'def f():\n    """A private module."""\n',
             "test/test_mod.py": 'def test_x():\n    """A test file."""\n'}
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    rels = builtin.python_files(tmp_path)
    found = [(m, node.name, cls.name if cls else None) for m, node, cls in builtin.public_definitions(tmp_path, rels)]
    assert found == [("mod", "public", None), ("mod", "method", "Thing"), ("mod", "prop", "Thing")]
    assert documented_callables(tmp_path, rels) == [
        ("mod.public", "function", "a, b=1", "Adds things together nicely."),
        ("mod.Thing.method", "method", "x", "Does something with x, clearly.")]
    assert public_functions(tmp_path, rels) == [("mod", "public", "a, b=1", "Adds things together nicely.")]
