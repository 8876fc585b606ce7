"""Reading documents from every kind of source, and the one-line errors for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import tunelab.data.readers as readers
from test_data_helpers import age
from tunelab.config import SourceSpec
from tunelab.data import content_hash, iter_documents, read_documents, source_content_hash, tokenizer_training_texts
from tunelab.errors import DataError


def read(source: str, tmp_path, log=None, **fields):
    return read_documents(SourceSpec(source=source, **fields), tmp_path / "cache", log=log or (lambda *a: None))


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ---------------------------------------------------------------- files and folders


def test_text_file_is_one_document(tmp_path):
    path = tmp_path / "notes.md"
    path.write_text("# Title\n\nSome text.\n", encoding="utf-8")
    docs = read(str(path), tmp_path)
    assert docs.docs == ["# Title\n\nSome text.\n"]
    assert docs.decode_errors == 0
    assert docs.content_hash == content_hash(docs.docs)


def test_folder_reads_nested_files_in_sorted_order_and_skips_hidden(tmp_path):
    root = tmp_path / "corpus"
    (root / "b" / "deep").mkdir(parents=True)
    (root / "a").mkdir()
    (root / ".git").mkdir()
    (root / "b" / "deep" / "z.txt").write_text("deep z")
    (root / "b" / "y.txt").write_text("b y")
    (root / "a" / "x.md").write_text("a x")
    (root / "top.txt").write_text("top")
    (root / ".hidden.txt").write_text("hidden file")
    (root / ".git" / "config").write_text("hidden folder")
    (root / "a" / "empty.txt").write_text("  \n")  # blank documents are dropped, not an error
    write_jsonl(root / "b" / "rows.jsonl", [{"text": "row 1"}, {"text": "row 2"}])
    (root / "b" / "settings.json").write_text('{"indent": 4}')  # in a folder, .json is text (configs)
    assert read(str(root), tmp_path).docs == ["a x", "deep z", "row 1", "row 2", '{"indent": 4}', "b y", "top"]


def test_jsonl_one_document_per_line(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "first", "id": 1}, {"text": "sec\u2028ond"}, {"text": None}])
    with open(path, "a") as f:
        f.write("\n")  # blank lines are fine
    assert read(str(path), tmp_path).docs == ["first", "sec\u2028ond"]


def test_json_lines_with_custom_field(tmp_path):
    path = write_jsonl(tmp_path / "d.json", [{"body": "one"}, {"body": "two"}])
    assert read(str(path), tmp_path, text_field="body").docs == ["one", "two"]


def test_jsonl_missing_field_names_file_line_field_and_keys(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "ok"}, {"content": "x", "id": 2}])
    with pytest.raises(DataError) as err:
        read(str(path), tmp_path)
    message = str(err.value)
    assert f"{path}:2" in message and "'text'" in message and "content, id" in message
    assert "\n" not in message


def test_jsonl_line_that_is_not_json(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(DataError, match=r"d\.jsonl:2: not a JSON object"):
        read(str(path), tmp_path)


def test_jsonl_lone_surrogates_are_replaced_and_counted(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "bad \\ud800 char"}\n')
    docs = read(str(path), tmp_path)
    assert docs.docs == ["bad \ufffd char"] and docs.decode_errors == 1


def test_parquet_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["alpha", "beta", None], "n": [1, 2, 3]}), path)
    assert read(str(path), tmp_path).docs == ["alpha", "beta"]
    with pytest.raises(DataError, match=r"no column 'body' \(has: text, n\)"):
        read(str(path), tmp_path, text_field="body")


def test_parquet_inside_a_folder(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "data").mkdir()
    pq.write_table(pa.table({"text": ["from parquet"]}), tmp_path / "data" / "a.parquet")
    (tmp_path / "data" / "b.txt").write_text("from text")
    assert read(str(tmp_path / "data"), tmp_path).docs == ["from parquet", "from text"]


# ---------------------------------------------------------------- HF datasets


def test_hf_save_to_disk_dataset_and_dataset_dict(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"text": ["one", "two"]}).save_to_disk(str(tmp_path / "ds"))
    assert read("hf:" + str(tmp_path / "ds"), tmp_path).docs == ["one", "two"]

    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"body": ["tr"]}),
                               "validation": datasets.Dataset.from_dict({"body": ["va"]})})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert read("hf:" + str(tmp_path / "dd"), tmp_path, text_field="body", split="validation").docs == ["va"]
    with pytest.raises(DataError, match=r"no split 'test' \(has: train, validation\)"):
        read("hf:" + str(tmp_path / "dd"), tmp_path, text_field="body", split="test")
    with pytest.raises(DataError, match=r"no column 'text' \(has: body\)"):
        read("hf:" + str(tmp_path / "dd"), tmp_path)


def test_hf_folder_of_data_files(tmp_path):
    (tmp_path / "files").mkdir()
    write_jsonl(tmp_path / "files" / "train.jsonl", [{"text": "a"}, {"text": "b"}])
    docs = read("hf:" + str(tmp_path / "files"), tmp_path)
    assert docs.docs == ["a", "b"]
    assert (tmp_path / "cache" / "hf-datasets").is_dir()  # datasets' own cache stays inside ours


def test_hf_missing_folder(tmp_path):
    with pytest.raises(DataError, match="is not a folder"):
        read("hf:" + str(tmp_path / "nope"), tmp_path)


# ---------------------------------------------------------------- built-in corpus


def test_builtin_calls_builtin_documents(tmp_path, monkeypatch):
    import sys
    import types

    calls = []

    def fake(domain, cache_dir):
        calls.append((domain, cache_dir))
        return ["doc one", "doc two"], "hash-from-builtin"

    monkeypatch.setitem(sys.modules, "tunelab.data.builtin", types.SimpleNamespace(builtin_documents=fake))
    docs = read("builtin:prose", tmp_path)
    assert docs.docs == ["doc one", "doc two"] and docs.content_hash == "hash-from-builtin"
    assert calls == [("prose", tmp_path / "cache")]


def test_builtin_unknown_domain_is_a_data_error(tmp_path):
    pytest.importorskip("tunelab.data.builtin")
    with pytest.raises(DataError):
        read("builtin:nonsense", tmp_path)


# ---------------------------------------------------------------- bad input


def test_missing_path(tmp_path):
    with pytest.raises(DataError, match="no such file or folder"):
        read(str(tmp_path / "missing.txt"), tmp_path)


@pytest.mark.parametrize("content", [b"", b" \n\t\n"])
def test_empty_file(tmp_path, content):
    path = tmp_path / "empty.txt"
    path.write_bytes(content)
    with pytest.raises(DataError, match="no text") as err:
        read(str(path), tmp_path)
    assert str(path) in str(err.value)


def test_empty_jsonl(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": ""}, {"text": "   "}])
    with pytest.raises(DataError, match="no text"):
        read(str(path), tmp_path)


def test_binary_file_alone_is_an_error(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(b"PK\x03\x04\x00\x00binary")
    with pytest.raises(DataError, match="looks binary"):
        read(str(path), tmp_path)


def test_binary_file_in_folder_is_skipped_with_a_warning(tmp_path):
    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed" / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    (tmp_path / "mixed" / "text.txt").write_text("real text")
    logged = []
    docs = read(str(tmp_path / "mixed"), tmp_path, log=logged.append)
    assert docs.docs == ["real text"]
    assert len(logged) == 1 and "image.png" in logged[0] and "binary" in logged[0]


def test_folder_of_only_binary_or_empty_files_is_an_error(tmp_path):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.bin").write_bytes(b"\x00\x01")
    (tmp_path / "junk" / "b.txt").write_text("")
    with pytest.raises(DataError, match="no text"):
        read(str(tmp_path / "junk"), tmp_path)


def test_non_utf8_bytes_are_replaced_counted_and_warned_once(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("café déjà\n".encode("latin-1") + b"ok \xff\xfe end \xe2\x82!")  # \xe2\x82: a cut-off €
    logged = []
    docs = read(str(path), tmp_path, log=logged.append)
    # decode_errors counts bytes; errors="replace" puts one U+FFFD per bad sequence (the cut-off € is one).
    assert docs.decode_errors == 7
    assert docs.docs == ["caf\ufffd d\ufffdj\ufffd\nok \ufffd\ufffd end \ufffd!"]
    assert len(logged) == 1 and "7 undecodable byte" in logged[0] and str(path) in logged[0]


def test_content_hash_is_length_prefixed_and_tracks_changes(tmp_path):
    assert content_hash(["ab", "c"]) != content_hash(["a", "bc"])
    path = tmp_path / "t.txt"
    path.write_text("version one")
    first = read(str(path), tmp_path).content_hash
    assert read(str(path), tmp_path).content_hash == first
    path.write_text("version two")
    assert read(str(path), tmp_path).content_hash != first


# ---------------------------------------------------------------- tokenizer training texts


def test_tokenizer_training_texts_round_robin_and_budget(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": f"a{i}"} for i in range(5)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": f"b{i}"} for i in range(2)])
    specs = [SourceSpec(source=str(a)), SourceSpec(source=str(b))]
    assert list(tokenizer_training_texts(specs, tmp_path, 10_000)) == ["a0", "b0", "a1", "b1", "a2", "a3", "a4"]
    assert list(tokenizer_training_texts(specs, tmp_path, 7)) == ["a0", "b0", "a1", "b"]
    assert list(tokenizer_training_texts(specs, tmp_path, 7)) == ["a0", "b0", "a1", "b"]  # deterministic


def test_tokenizer_training_texts_slice_a_big_file_so_others_are_represented(tmp_path):
    big = tmp_path / "big.txt"
    big.write_text("x" * 300_000)
    small = write_jsonl(tmp_path / "small.jsonl", [{"text": "small doc"}])
    texts = list(tokenizer_training_texts([SourceSpec(source=str(big)), SourceSpec(source=str(small))],
                                          tmp_path, 100_000))
    assert "small doc" in texts
    assert sum(len(t.encode()) for t in texts) == 100_000


def test_tokenizer_training_texts_read_only_what_the_budget_takes(tmp_path, monkeypatch):
    (tmp_path / "many").mkdir()
    for i in range(50):
        (tmp_path / "many" / f"f{i:02d}.txt").write_text(f"file {i} " * 100)
    opened = record_opens(monkeypatch)
    texts = list(tokenizer_training_texts([SourceSpec(source=str(tmp_path / "many"))], tmp_path, 2_000))
    assert sum(len(t) for t in texts) == 2_000
    assert len(opened) <= 3  # 800 bytes a file: the rest of the folder is never opened


# ---------------------------------------------------------------- streaming


def record_opens(monkeypatch) -> list[str]:
    opened = []
    real_open = readers._open
    monkeypatch.setattr(readers, "_open", lambda path: opened.append(Path(path).name) or real_open(path))
    return opened


def test_documents_are_read_as_they_are_consumed(tmp_path, monkeypatch):
    (tmp_path / "folder").mkdir()
    for name in ("a.txt", "b.txt", "c.txt"):
        (tmp_path / "folder" / name).write_text(f"text of {name}")
    opened = record_opens(monkeypatch)
    docs = iter_documents(SourceSpec(source=str(tmp_path / "folder")), tmp_path / "cache")
    assert next(docs) == "text of a.txt" and opened == ["a.txt"]  # one file at a time
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "first"}\n{"text": "second"}\nbroken\n')
    rows = iter_documents(SourceSpec(source=str(path)), tmp_path / "cache")
    assert next(rows) == "first" and next(rows) == "second"  # line by line: the bad line is not read yet
    with pytest.raises(DataError, match=r"d\.jsonl:3: not a JSON object"):
        next(rows)


# ---------------------------------------------------------------- segmented documents (loss masks)


def test_jsonl_segments_become_a_segmented_document(tmp_path):
    rows = [{"text": "plain"},
            {"text": [{"text": "Prompt: ", "loss": False}, {"text": "answer"}, {"text": "", "loss": False}]},
            {"text": [{"text": "bad \ud800 surrogate", "loss": True}]},
            {"text": [{"text": "", "loss": False}]},  # no text at all: dropped like an empty document
            {"text": []}]
    docs = read(str(write_jsonl(tmp_path / "d.jsonl", rows)), tmp_path)
    assert docs.docs == ["plain", [("Prompt: ", False), ("answer", True)], [("bad \ufffd surrogate", True)]]
    assert docs.decode_errors == 1
    assert docs.content_hash == content_hash(docs.docs)


@pytest.mark.parametrize("value", [["just a string"], [{"loss": False}], [{"text": "x", "loss": "no"}], [{"text": 3}]])
def test_a_bad_segment_is_a_one_line_error(tmp_path, value):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "ok"}, {"text": value}])
    with pytest.raises(DataError) as err:
        read(str(path), tmp_path)
    message = str(err.value)
    assert f"{path}:2" in message and "item 0 of field 'text'" in message and '"loss"' in message
    assert "\n" not in message


def test_parquet_and_hf_segments(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    segments = [[{"text": "Q: ", "loss": False}, {"text": "A", "loss": True}], [{"text": "all trained", "loss": None}]]
    expected = [[("Q: ", False), ("A", True)], [("all trained", True)]]
    pq.write_table(pa.table({"text": segments}), tmp_path / "d.parquet")
    assert read(str(tmp_path / "d.parquet"), tmp_path).docs == expected
    datasets.Dataset.from_dict({"text": segments}).save_to_disk(str(tmp_path / "ds"))
    assert read("hf:" + str(tmp_path / "ds"), tmp_path).docs == expected


def test_content_hash_counts_segments_and_their_loss():
    from tunelab.data import builtin

    docs = ["ab", "c", "d\u00e9"]
    assert content_hash(docs) == builtin.content_hash(docs)  # plain documents: the built-in corpus's hash
    assert content_hash([[("ab", True)]]) != content_hash(["ab"])
    assert content_hash([[("ab", True)]]) != content_hash([[("ab", False)]])
    assert content_hash([[("a", True), ("b", True)]]) != content_hash([[("ab", True)]])


# ---------------------------------------------------------------- the stat index


def test_source_content_hash_is_the_documents_hash_and_comes_from_the_index(tmp_path, monkeypatch):
    (tmp_path / "docs").mkdir()
    write_jsonl(tmp_path / "docs" / "a.jsonl", [{"text": "one", "body": "uno"}, {"text": "two", "body": "dos"}])
    (tmp_path / "docs" / "b.txt").write_text("three")
    age(tmp_path / "docs")
    spec = SourceSpec(source=str(tmp_path / "docs"))
    expected = read_documents(spec, tmp_path / "cache").content_hash
    assert source_content_hash(spec, tmp_path / "cache") == expected
    opened = record_opens(monkeypatch)
    assert source_content_hash(spec, tmp_path / "cache") == expected and opened == []
    other_field = SourceSpec(source=str(tmp_path / "docs"), text_field="body")
    assert source_content_hash(other_field, tmp_path / "cache") == content_hash(["uno", "dos", "three"])
    assert opened == ["a.jsonl", "b.txt"]
    index = list((tmp_path / "cache" / "sources").glob("*.json"))
    assert len(index) == 2 and all(json.loads(p.read_text())["files"] == 2 for p in index)


def test_hf_sources_use_the_index_too(tmp_path, monkeypatch):
    import datasets

    datasets.Dataset.from_dict({"text": ["one", "two"]}).save_to_disk(str(tmp_path / "ds"))
    age(tmp_path / "ds")
    spec = SourceSpec(source="hf:" + str(tmp_path / "ds"))
    first = source_content_hash(spec, tmp_path / "cache")
    assert first == content_hash(["one", "two"])

    def no_loading(*args):
        raise AssertionError("an unchanged hf: folder must not be loaded")

    monkeypatch.setattr(readers, "_load_hf", no_loading)
    assert source_content_hash(spec, tmp_path / "cache") == first


def test_a_damaged_index_is_ignored(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("some text")
    age(path)
    spec = SourceSpec(source=str(path))
    first = source_content_hash(spec, tmp_path / "cache")
    for entry in (tmp_path / "cache" / "sources").glob("*.json"):
        entry.write_text("{not json")
    assert source_content_hash(spec, tmp_path / "cache") == first
