"""What the data messages tell a user: one warning per skipped file, sizes in human units, a small held-out
split named as such, and the format to set when a text source holds chat examples or preference pairs."""

from __future__ import annotations

import json
import random

import pytest

from test_data_helpers import byte_level_tokenizer, make_text, write_docs
from tunelab.config import SourceSpec
from tunelab.data import source_content_hash, tokenize_source
from tunelab.data.readers import Tally, iter_path
from tunelab.data.tokcache import size
from tunelab.errors import DataError


@pytest.fixture(scope="module")
def tokenizer():
    return byte_level_tokenizer()


def _tokenize(tmp_path, tokenizer, spec, eval_fraction, logged):
    return tokenize_source(spec, tokenizer, tokenizer.eos_token_id, tmp_path / "cache", eval_fraction,
                           log=logged.append)


def test_a_skipped_binary_file_is_warned_about_once(tmp_path, tokenizer):
    folder = write_docs(tmp_path / "docs", [make_text(random.Random(i), 30) for i in range(10)])
    (folder / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00" * 20)
    spec = SourceSpec(source=str(folder))
    logged = []
    source_content_hash(spec, tmp_path / "cache", log=logged.append)  # as the tokenizer's cache key does first
    _tokenize(tmp_path, tokenizer, spec, 0.1, logged)
    assert [line for line in logged if "binary" in line] == [f"warning: {folder}: skipped 1 binary file(s): image.png"]


def test_sizes_are_in_human_units(tmp_path, tokenizer):
    assert [size(n) for n in (0, 999, 3_250, 2_500_000, 7_100_000_000)] == ["0 B", "999 B", "3.2 KB", "2.5 MB",
                                                                            "7.1 GB"]
    folder = write_docs(tmp_path / "docs", [make_text(random.Random(i), 8) for i in range(6)])
    logged = []
    source = _tokenize(tmp_path, tokenizer, SourceSpec(source=str(folder)), 0.2, logged)
    line = next(line for line in logged if line.startswith("data "))
    assert f"{size(source.train_bytes + source.eval_bytes)}," in line and " KB," in line and "0.0 MB" not in line


def _chat_file(path, n: int):
    with open(path, "w") as f:
        for i in range(n):
            row = {"prompt": f"Question {i}: what is {i} plus {i}?", "response": f"It is {2 * i}."}
            f.write(json.dumps(row) + "\n")
    return path


def test_a_small_held_out_split_is_warned_about_with_its_size(tmp_path, tokenizer):
    spec = SourceSpec(source=str(_chat_file(tmp_path / "sft.jsonl", 60)), format="chat")
    logged = []
    source = _tokenize(tmp_path, tokenizer, spec, 0.05, logged)
    assert 0 < source.eval_docs < 20
    warnings = [line for line in logged if "held-out" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: data sft: ")
    assert f"only {source.eval_docs} example" in warnings[0] and "eval_fraction 0.05" in warnings[0]
    logged.clear()
    enough = _tokenize(tmp_path, tokenizer, spec, 0.45, logged)  # ~27 of 60 held out
    assert enough.eval_docs >= 20 and not [line for line in logged if "held-out" in line]


@pytest.mark.parametrize("row, expected", [
    ({"prompt": "p", "response": "r"}, "format: chat"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "format: chat"),
    ({"prompt": "p", "chosen": "a", "rejected": "b"}, "format: preference"),
    ({"body": "some text"}, "set text_field"),
])
def test_a_table_read_as_text_names_the_format_to_set(tmp_path, row, expected):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(DataError) as err:
        list(iter_path(str(path), "text", Tally()))
    message = str(err.value)
    assert "no field 'text'" in message and expected in message
    if expected.startswith("format"):
        assert f"--set 'data.train=[{{source: {path}, {expected}}}]'" in message
