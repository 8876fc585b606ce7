"""`tunelab run`: stage keys, skipping, and stale stages re-running into fresh directories; typed outputs (a
data stage's dataset feeding training and eval), wrong-type inputs and unread fields refused; --dry-run,
--only, --no-resume."""

from __future__ import annotations

import json
from pathlib import Path

from typing import Literal

import pytest
import yaml
from pydantic import BaseModel, ConfigDict

from conftest import run_cli, write_corpus
from tunelab.config import SourceSpec
from tunelab.data.artifact import read_manifest, write_dataset
from tunelab.errors import ConfigError
from tunelab.commands.pipeline import run_pipeline


def write_pipeline(tmp: Path, corpus: Path, base_set: dict | None = None) -> Path:
    recipe = {"name": "tiny", "model": {"preset": "llama-micro"}, "tokenizer": {"vocab_size": 384, "train_bytes": 100_000},
              "data": {"train": str(corpus), "seq_len": 32},
              "train": {"max_steps": 3, "micro_batch_size": 2, "precision": "fp32", "eval_max_tokens": 128,
                        "log_every": 1}}
    (tmp / "tiny.yaml").write_text(yaml.safe_dump(recipe))
    pipeline = {"name": "p", "stages": [
        {"name": "base", "pretrain": "tiny.yaml", "set": base_set or {}},
        {"name": "tuned", "finetune": "tiny.yaml", "set": {"model.path": "${base}", "method.name": "bitfit"}},
        {"name": "score", "eval": "${tuned}", "data": [str(corpus)], "max_tokens": 128},
    ]}
    path = tmp / "pipe.yaml"
    path.write_text(yaml.safe_dump(pipeline))
    return path


def stage_dirs(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir())


@pytest.mark.slow
def test_stage_keys_skip_rerun_and_never_overwrite(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", n_docs=24)
    root = tmp_path / "out"
    outputs = run_pipeline(write_pipeline(tmp_path, corpus), out=root, quiet=True)
    assert stage_dirs(root) == ["base", "score", "tuned"]
    assert outputs["tuned"] == root / "tuned" / "final" and (root / "score" / "eval.json").is_file()
    lineage = json.loads((root / "tuned" / "lineage.json").read_text())
    assert lineage["stage"] == "finetune" and lineage["parents"][0]["path"] == str((root / "base" / "final").resolve())
    first_weights = (root / "base" / "final" / "model.safetensors").read_bytes()
    report = (root / "report.html").read_text()  # every stage, and the lineage edges between them
    assert ">base</a>" in report and ">tuned</a>" in report
    assert f'data-src="{(root / "base").resolve()}" data-dst="{(root / "tuned").resolve()}"' in report
    assert f'data-src="{(root / "tuned").resolve()}" data-dst="eval:score"' in report
    # A report made later, outside the pipeline, still links the eval stage to the model: eval.json names it.
    scored = json.loads((root / "score" / "eval.json").read_text())["model"]
    assert scored["path"] == str((root / "tuned" / "final").resolve()) and len(scored["weights_sha256"]) == 64
    from tunelab.report import write_report

    later = write_report([root], tmp_path / "later.html", warn=lambda message: None).read_text()
    assert f'data-src="{(root / "tuned").resolve()}" data-dst="eval:score"' in later

    # Unchanged: everything is skipped (nothing re-trained: the run directories are untouched).
    stamp = (root / "tuned" / "metrics.jsonl").stat().st_mtime_ns
    run_pipeline(write_pipeline(tmp_path, corpus), out=root, quiet=True)
    assert stage_dirs(root) == ["base", "score", "tuned"]
    assert (root / "tuned" / "metrics.jsonl").stat().st_mtime_ns == stamp

    # Retraining the upstream stage (another seed) re-runs it AND everything downstream into fresh
    # directories; the old outputs stay as they were.
    run_pipeline(write_pipeline(tmp_path, corpus, base_set={"train.seed": 1}), out=root, quiet=True)
    dirs = stage_dirs(root)
    assert len(dirs) == 6 and {d.split(".")[0] for d in dirs} == {"base", "tuned", "score"}
    assert (root / "base" / "final" / "model.safetensors").read_bytes() == first_weights
    new_tuned = next(d for d in dirs if d.startswith("tuned."))
    lineage = json.loads((root / new_tuned / "lineage.json").read_text())
    assert lineage["parents"][0]["path"].startswith(str((root / "base.").resolve())[:-1])

    # Changed data re-runs the stages that read it (a new key), again into fresh directories.
    (corpus / "part-a" / "doc001.txt").write_text("a changed document about the model and its data.\n" * 20)
    run_pipeline(write_pipeline(tmp_path, corpus), out=root, quiet=True)
    assert len(stage_dirs(root)) == 9


@pytest.mark.slow
def test_an_interrupted_stage_resumes_in_place(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", n_docs=24)
    root = tmp_path / "out"
    pipe = write_pipeline(tmp_path, corpus)
    run_pipeline(pipe, out=root, quiet=True)
    # Simulate a crash of the `tuned` stage after its checkpoint: no final/, status still running.
    import shutil

    shutil.rmtree(root / "tuned" / "final")
    record = json.loads((root / "tuned" / "stage.json").read_text())
    (root / "tuned" / "stage.json").write_text(json.dumps({**record, "status": "running"}))
    run_pipeline(pipe, out=root, quiet=True)
    assert stage_dirs(root) == ["base", "score", "tuned"]
    assert (root / "tuned" / "final").is_dir()
    events = [json.loads(line) for line in (root / "tuned" / "metrics.jsonl").read_text().splitlines()]
    assert any(e["event"] == "resume" for e in events)


def test_pipeline_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"stages": [{"name": "a", "eval": "${nope}"}]}))
    with pytest.raises(ConfigError, match=r"\$\{nope\} names no earlier stage"):
        run_pipeline(bad, out=tmp_path / "o", quiet=True)
    bad.write_text(yaml.safe_dump({"stages": [{"name": "a", "pretrain": "x.yaml", "eval": "y"}]}))
    with pytest.raises(ConfigError, match="exactly one of"):
        run_pipeline(bad, out=tmp_path / "o", quiet=True)


# ---------------------------------------------------------------- typed outputs: a data stage, checks, options


class SelectRecipe(BaseModel):
    """A stand-in for the coming data-selection stage (registered only in these tests): every k-th document."""
    model_config = ConfigDict(extra="forbid")
    kind: Literal["select"] = "select"
    name: str = "select"
    data: list[str]
    keep_every: int = 2

    def model_paths(self) -> list[str]:
        return []

    def data_sources(self) -> list[SourceSpec]:
        return [SourceSpec(source=s) for s in self.data]


def run_select(cfg: SelectRecipe, out: Path, resume: bool = False, quiet: bool = False) -> Path:
    from tunelab.data import iter_documents, source_content_hash
    from tunelab.paths import resolve_cache_dir

    spec, cache = cfg.data_sources()[0], resolve_cache_dir()
    docs = [d for i, d in enumerate(iter_documents(spec, cache, log=lambda *a: None)) if i % cfg.keep_every == 0]
    write_dataset(out, docs, "text", {"stage": "select", "keep_every": cfg.keep_every,
                                      "sources": [{"source": spec.source, "content_hash": source_content_hash(spec, cache)}]})
    return out


@pytest.fixture
def select_kind(monkeypatch):
    from tunelab.config import RECIPE_KINDS
    from tunelab.stages import OUTPUTS, STAGES

    monkeypatch.setitem(STAGES, "select", f"{__name__}:run_select")
    monkeypatch.setitem(OUTPUTS, "select", "dataset")
    monkeypatch.setitem(RECIPE_KINDS, "select", SelectRecipe)


def write_data_pipeline(tmp: Path, corpus: Path, stages: list[dict] | None = None, base_set: dict | None = None) -> Path:
    write_pipeline(tmp, corpus)  # tiny.yaml
    (tmp / "select.yaml").write_text(yaml.safe_dump({"kind": "select", "data": [str(corpus)]}))
    pipeline = {"name": "d", "stages": [
        {"name": "select", "select": "select.yaml"},
        {"name": "base", "pretrain": "tiny.yaml", "set": {"data.train": "${select}", **(base_set or {})}},
        {"name": "tuned", "finetune": "tiny.yaml", "set": {"model.path": "${base}", "method.name": "lora"}},
        {"name": "score", "eval": "${tuned}", "data": ["${select}"], "max_tokens": 128},
    ] + (stages or [])}
    path = tmp / "data-pipe.yaml"
    path.write_text(yaml.safe_dump(pipeline))
    return path


def dry_run(pipe: Path, root: Path, capsys, **options) -> dict[str, list[str]]:
    capsys.readouterr()
    run_pipeline(pipe, out=root, quiet=True, dry_run=True, **options)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:5] == ["stage", "kind", "output", "key", "action"]
    return {line.split()[0]: line.split() for line in lines[1:]}


@pytest.mark.slow
def test_a_data_stage_feeds_training_and_eval_through_a_dataset(tmp_path, select_kind, capsys):
    corpus = write_corpus(tmp_path / "corpus", n_docs=24)
    root, pipe = tmp_path / "out", write_data_pipeline(tmp_path, corpus)
    plan = dry_run(pipe, root, capsys)  # nothing there yet: every stage would run; nothing is written
    assert {name: row[1:3] + [row[4]] for name, row in plan.items()} == {
        "select": ["select", "dataset", "run"], "base": ["pretrain", "model", "run"],
        "tuned": ["finetune", "adapter", "run"], "score": ["eval", "evaluation", "run"]}
    assert not root.exists()

    outputs = run_pipeline(pipe, out=root)
    printed = capsys.readouterr().out
    manifest = read_manifest(outputs["select"])
    assert outputs["select"] == root / "select" / "dataset" and manifest.rows == 12
    assert manifest.lineage["keep_every"] == 2
    lineage = json.loads((root / "base" / "lineage.json").read_text())  # the run records the dataset's hash
    assert [(d["source"], d["content_hash"]) for d in lineage["data"]] == [(str(outputs["select"]), manifest.content_hash)]
    assert (outputs["tuned"] / "adapter_config.json").is_file()
    records = {name: json.loads((root / name / "stage.json").read_text()) for name in plan}
    assert [records[n]["output"] for n in plan] == ["dataset", "model", "adapter", "evaluation"]
    assert records["base"]["upstream"] == {"select": records["select"]["key"]}
    scores = json.loads(outputs["score"].read_text())  # the eval stage prints its table
    assert list(scores) == ["dataset", "model"] and f"{scores['dataset']['loss']:.4f}" in printed  # + the model scored
    assert "stage score: eval of" in printed

    assert {row[4] for row in dry_run(pipe, root, capsys).values()} == {"skip"}
    # The dataset changes (another selection): everything downstream is stale; the old outputs stay.
    (tmp_path / "select.yaml").write_text(yaml.safe_dump({"kind": "select", "data": [str(corpus)], "keep_every": 3}))
    plan = dry_run(pipe, root, capsys)
    assert {row[4] for row in plan.values()} == {"re-run"} and plan["tuned"][-1] == str(root / f"tuned.{plan['tuned'][3]}")
    # --only: a stage whose input is not there is refused; one whose inputs are there runs alone.
    with pytest.raises(ConfigError, match=r"--only tuned: it reads stage base's output, which is not there"):
        run_pipeline(pipe, out=root, quiet=True, only="tuned")
    (tmp_path / "select.yaml").write_text(yaml.safe_dump({"kind": "select", "data": [str(corpus)]}))
    pipe = write_data_pipeline(tmp_path, corpus, stages=[
        {"name": "score-base", "eval": "${base}", "data": ["${select}"], "max_tokens": 64}])
    stamp = outputs["score"].stat().st_mtime_ns
    run_pipeline(pipe, out=root, quiet=True, only="score-base")
    assert sorted(p.name for p in root.iterdir()) == ["base", "report.html", "score", "score-base", "select", "tuned"]
    assert outputs["score"].stat().st_mtime_ns == stamp and (root / "score-base" / "eval.json").is_file()


def test_inputs_of_the_wrong_type_and_unread_fields_are_one_line_errors(tmp_path, select_kind):
    corpus = write_corpus(tmp_path / "corpus", n_docs=6)
    root = tmp_path / "out"
    cases = [
        ({"name": "bad", "pretrain": "tiny.yaml", "set": {"model.path": "${select}"}},
         r"stage bad: set\.model\.path takes a model or adapter, but \$\{select\} is a dataset"),
        ({"name": "bad", "pretrain": "tiny.yaml", "set": {"data.train": "${base}"}},
         r"stage bad: set\.data\.train takes a dataset, but \$\{base\} is a model"),
        ({"name": "bad", "eval": "${select}"}, r"stage bad: target takes a model or adapter, but \$\{select\} is a dataset"),
        ({"name": "bad", "eval": "${base}", "data": ["${score}"]},
         r"stage bad: data takes a dataset, but \$\{score\} is an evaluation"),
        ({"name": "bad", "pretrain": "tiny.yaml", "seq_len": 64}, r"a pretrain stage does not read `seq_len`"),
        ({"name": "bad", "merge": "m.yaml", "data": ["x"]}, r"a merge stage does not read `data`"),
        ({"name": "bad", "eval": "${base}", "set": {"a": 1}}, r"an eval stage does not read `set`"),
    ]
    for stage, message in cases:
        pipe = write_data_pipeline(tmp_path, corpus, stages=[stage])
        with pytest.raises(ConfigError, match=message) as err:
            run_pipeline(pipe, out=root, quiet=True)
        assert "\n" not in str(err.value)
    assert not root.exists()  # every stage is checked before the first one runs

    # Through the CLI: exit 2, one line, nothing written; --dry-run too.
    pipe.write_text(yaml.safe_dump({"stages": [{"name": "a", "pretrain": "tiny.yaml", "split": "whole"}]}))
    result = run_cli("run", str(pipe), "--out", str(root), "--dry-run")
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "does not read `split`" in result.stderr
    assert not root.exists()


@pytest.mark.slow
def test_no_resume_refuses_an_interrupted_stage(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", n_docs=24)
    root, pipe = tmp_path / "out", write_pipeline(tmp_path, corpus)
    record = root / "base" / "stage.json"
    run_pipeline(pipe, out=root, quiet=True, only="base")
    record.write_text(json.dumps({**json.loads(record.read_text()), "status": "running"}))
    with pytest.raises(ConfigError, match=r"stage base: .* holds an interrupted run of it; pass --resume"):
        run_pipeline(pipe, out=root, quiet=True, resume=False)
    assert sorted(p.name for p in root.iterdir()) == ["base"]
