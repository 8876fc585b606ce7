"""`tunelab run`: stage keys, skipping, and stale stages re-running into fresh directories."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import write_corpus
from tunelab.errors import ConfigError
from tunelab.pipeline import run_pipeline


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
