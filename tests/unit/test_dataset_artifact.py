"""Dataset artifacts (data/artifact.py): written, read back as a source with the same content hash in every
format, a stable hash, manifests validated with one-line errors; and the stage key/skip API (stage_keys.py)."""

from __future__ import annotations

import json

import pytest

from tunelab.config import SourceSpec
from tunelab.data import read_documents, source_content_hash
from tunelab.data.artifact import read_manifest, verify_dataset, write_dataset
from tunelab.data.chat import Chat, PreferencePair
from tunelab.errors import ConfigError, DataError, RunDirError
from tunelab.stage_keys import plan_stage, stage_key

TEXTS = ["First document.\nWith two lines.", "  ", "Second: ünïcode ✓", "third"]
LINEAGE = {"stage": "select", "sources": [{"source": "corpus", "content_hash": "ab" * 32}], "kept": 3}


def quiet(*args):
    pass


def test_text_dataset_round_trips_with_the_readers_hash(tmp_path):
    manifest = write_dataset(tmp_path / "ds", iter(TEXTS), "text", LINEAGE)
    assert (manifest.rows, manifest.format, manifest.lineage) == (3, "text", LINEAGE)  # the blank one left out
    docs = read_documents(SourceSpec(source=str(tmp_path / "ds")), tmp_path / "cache", log=quiet)
    assert docs.docs == [TEXTS[0], TEXTS[2], TEXTS[3]]
    assert docs.content_hash == manifest.content_hash
    assert source_content_hash(SourceSpec(source=str(tmp_path / "ds")), tmp_path / "cache", log=quiet) \
        == manifest.content_hash
    assert read_manifest(tmp_path / "ds") == manifest and verify_dataset(tmp_path / "ds") == manifest
    # Stable: the same documents give the same hash; another order or one changed character does not.
    assert write_dataset(tmp_path / "again", TEXTS, "text", {}).content_hash == manifest.content_hash
    assert write_dataset(tmp_path / "order", TEXTS[::-1], "text", {}).content_hash != manifest.content_hash
    assert write_dataset(tmp_path / "edit", ["First document.\nWith two lines!"] + TEXTS[1:], "text",
                         {}).content_hash != manifest.content_hash
    assert write_dataset(tmp_path / "plain", TEXTS, "text", {"other": 1}).content_hash == manifest.content_hash


@pytest.mark.parametrize("fmt,docs", [
    ("text", [[("context ", False), ("", True), ("target", True)], "plain"]),
    ("chat", [Chat((("system", "Be brief."), ("user", "Hi?"), ("assistant", "Hello."))),
              Chat((("user", "2+2?"), ("assistant", "4"), ("user", "and 3+3?"), ("assistant", "6")))]),
    ("preference", [PreferencePair((("user", "Capital of France?"),), "Paris.", "Lyon."),
                    PreferencePair((("system", "s"), ("user", "u")), "yes", "no")]),
])
def test_every_format_reads_back_as_the_same_documents(tmp_path, fmt, docs):
    manifest = write_dataset(tmp_path / "ds", docs, fmt, {})
    spec = SourceSpec(source=str(tmp_path / "ds"), format=fmt)
    read = read_documents(spec, tmp_path / "cache", log=quiet)
    expected = [[(t, loss) for t, loss in d if t] if isinstance(d, list) else d for d in docs]
    assert read.docs == expected and read.content_hash == manifest.content_hash
    if fmt != "text":  # the source must say the dataset's format: chat rows are not text
        with pytest.raises(DataError, match=f"a {fmt} dataset; set format: {fmt}"):
            read_documents(SourceSpec(source=str(tmp_path / "ds")), tmp_path / "cache", log=quiet)


def test_bad_manifests_and_outputs_are_one_line_errors(tmp_path):
    write_dataset(tmp_path / "ds", TEXTS, "text", {})
    manifest_file = tmp_path / "ds" / "manifest.json"
    good = json.loads(manifest_file.read_text())
    for change, message in [({"rows": 0}, "rows"), ({"format": "audio"}, "format"), ({"content_hash": "x"}, "content_hash"),
                            ({"tunelab_dataset": 2}, "tunelab_dataset"), ({"extra": 1}, "extra: unknown key")]:
        manifest_file.write_text(json.dumps({**good, **change}))
        with pytest.raises(ConfigError, match=message) as err:
            read_manifest(tmp_path / "ds")
        assert "\n" not in str(err.value) and str(manifest_file) in str(err.value)
    manifest_file.write_text("{not json")
    with pytest.raises(DataError, match="unreadable"):
        read_manifest(tmp_path / "ds")
    manifest_file.write_text(json.dumps(good))
    (tmp_path / "ds" / "data.jsonl").write_text(json.dumps({"text": "edited"}) + "\n")
    with pytest.raises(DataError, match="edited after it was written"):
        verify_dataset(tmp_path / "ds")
    (tmp_path / "ds" / "data.jsonl").unlink()
    with pytest.raises(DataError, match="data file data.jsonl is missing"):
        read_manifest(tmp_path / "ds")
    with pytest.raises(DataError, match="not a dataset"):
        read_manifest(tmp_path)
    with pytest.raises(RunDirError, match="not empty"):
        write_dataset(tmp_path / "ds", TEXTS, "text", {})
    with pytest.raises(DataError, match="no documents left"):
        write_dataset(tmp_path / "empty", ["", " \n"], "text", {})
    assert not (tmp_path / "empty").exists() and not list(tmp_path.glob(".empty*"))


# ---------------------------------------------------------------- stage keys: skip, resume, run, stale


def test_stage_key_is_canonical_and_sensitive():
    assert stage_key({"a": 1, "b": [1, 2]}) == stage_key({"b": [1, 2], "a": 1})
    assert stage_key({"a": 1, "b": [1, 2]}) != stage_key({"a": 1, "b": [2, 1]})
    assert len(stage_key({})) == 64


def test_plan_skips_resumes_and_never_overwrites(tmp_path):
    key, other = stage_key({"v": 1}), stage_key({"v": 2})
    plan = plan_stage(tmp_path, "s", key, "final")
    assert (plan.dir, plan.action, plan.output) == (tmp_path / "s", "run", tmp_path / "s" / "final")
    plan.begin(kind="pretrain")
    assert plan_stage(tmp_path, "s", key, "final").action == "resume"  # interrupted: same key, not done
    plan.finish(kind="pretrain")
    assert plan_stage(tmp_path, "s", key, "final").action == "resume"  # done, but its output is gone
    (tmp_path / "s" / "final").mkdir()
    assert plan_stage(tmp_path, "s", key, "final").action == "skip"
    assert json.loads((tmp_path / "s" / "stage.json").read_text()) == {"key": key, "kind": "pretrain", "status": "done"}
    stale = plan_stage(tmp_path, "s", other, "final")  # another key: a fresh directory beside it
    assert (stale.dir, stale.action) == (tmp_path / f"s.{other[:8]}", "stale")
    stale.begin()
    assert plan_stage(tmp_path, "s", other, "final").action == "resume"
    assert plan_stage(tmp_path, "s", key, "final").action == "skip"  # the first output is still there
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "notes.txt").write_text("not a stage")
    (tmp_path / f"t.{key[:8]}").mkdir()
    (tmp_path / f"t.{key[:8]}" / "x").write_text("")
    with pytest.raises(ConfigError, match="holds another stage: move it away"):
        plan_stage(tmp_path, "t", key, "final")
