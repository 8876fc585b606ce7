"""lineage.json: the one schema (schema_version 2), its writer, and the reader on records written by main
before the version field (tests/fixtures/lineage_main: a pretraining run, a continued run, a LoRA run, a
merge with an adapter input, a prune, an export --merge of the adapter and a checkpoint average)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunelab import lineage
from tunelab.runs import ancestor_data, ancestor_source_specs, lineage_dir, lineage_records, trained_sources

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "lineage_main"
STAGES = {"base": "pretrain", "cont": "pretrain", "lora": "finetune", "soup": "merge", "pruned": "prune",
          "exported": "export", "averaged": "average"}


@pytest.fixture()
def main_runs(tmp_path) -> Path:
    """The fixture's records with this test's directory in place of the root main wrote them under."""
    root = tmp_path / "runs"
    for file in FIXTURE.glob("*/lineage.json"):
        (root / file.parent.name).mkdir(parents=True)
        text = file.read_text().replace("{ROOT}", str(root)).replace("{WORK}", str(tmp_path / "work"))
        (root / file.parent.name / "lineage.json").write_text(text)
    return root


def test_records_written_by_main_read_in_the_current_schema(main_runs):
    for name, stage in STAGES.items():
        raw = json.loads((main_runs / name / "lineage.json").read_text())
        assert "schema_version" not in raw  # really main's version-1 records
        record = lineage.read(main_runs / name)
        assert record["schema_version"] == lineage.SCHEMA_VERSION and record["stage"] == stage, name
        assert record["parents"] and all(p["role"] for p in record["parents"])
        assert all("sha256" not in p and lineage.digest(p) for p in record["parents"]), name
    exported = lineage.read(main_runs / "exported")
    assert (exported["name"], exported["merged"]) == ("exported", True) and "kind" not in exported
    base, adapter = exported["parents"]
    # main's export stored the base's in-memory hash as weights_sha256: it is the one the LoRA run recorded
    lora_init = lineage.read(main_runs / "lora")["parents"][0]
    assert base["weights_sha256_in_memory"] == lora_init["weights_sha256_in_memory"] and "weights_sha256" not in base
    assert adapter["role"] == "adapter" and len(adapter["file_sha256"]) == 64
    soup = lineage.read(main_runs / "soup")  # main's merge stored the adapter's base by its in-memory hash too
    assert soup["parents"][2]["adapter_base"] == {"path": lora_init["path"],
                                                  "weights_sha256_in_memory": lora_init["weights_sha256_in_memory"]}
    averaged = lineage.read(main_runs / "averaged")
    assert [p["step"] for p in averaged["parents"]] == [2, 4] and averaged["run"] == str(main_runs / "base")
    assert lineage.read(main_runs / "missing") is None


def test_walks_over_main_records(main_runs):
    corpus = json.loads((main_runs / "base" / "lineage.json").read_text())["data"][0]
    # the merge reaches all three inputs' runs; the corpus was held out at 0.05 (base) and 0.02 (cont, lora)
    walked = [where.name for where, _ in lineage_records(main_runs / "soup")]
    assert walked[0] == "soup" and set(walked) == {"soup", "base", "cont", "lora"}
    assert trained_sources(main_runs / "soup") == {corpus["content_hash"]: 0.02}
    assert trained_sources(main_runs / "base" / "final") == {corpus["content_hash"]: 0.05}
    for name in ("exported", "pruned", "averaged"):  # through the adapter's run, the pruned base, a checkpoint
        assert [d["content_hash"] for d in ancestor_data(main_runs / name)] == [corpus["content_hash"]], name
    assert ancestor_source_specs([main_runs / "exported"]) == [{"source": corpus["source"]}]
    assert lineage_dir(main_runs / "base" / "checkpoints" / "step-2") == main_runs / "base"


def test_report_reads_main_records(main_runs):
    from tunelab.report.collect import load
    from tunelab.report.lineage import build_graph

    entries = load([main_runs / n for n in STAGES], warn=lambda *a: None)
    assert {e.path.name: e.stage for e in entries} == STAGES
    graph = build_graph(entries)
    export_edges = [e for e in graph.edges if e.dst.endswith("exported")]
    assert sorted(e.label[0] for e in export_edges) == ["adapter", "base"] and all(len(e.label) == 2 for e in export_edges)


def test_current_records_round_trip(tmp_path):
    record = lineage.make("merge", "soup", [{"role": "merge-input", "path": "a", "weights_sha256": "f" * 64}],
                          method={"name": "linear"}, tokenizer=None)
    assert "tokenizer" not in record
    lineage.write(tmp_path, record)
    assert lineage.read(tmp_path) == record and json.loads((tmp_path / "lineage.json").read_text()) == record
    assert not list(tmp_path.glob(".lineage.json.tmp-*"))


def test_every_writer_uses_the_schema():
    """Nothing in tunelab writes a lineage.json but tunelab/lineage.py."""
    root = Path(__file__).resolve().parents[2] / "tunelab"
    writers = [p.relative_to(root) for p in root.rglob("*.py")
               if '"lineage.json").write' in p.read_text() or 'write_json("lineage.json"' in p.read_text()]
    assert writers == []
