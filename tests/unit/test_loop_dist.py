"""The loop's collectives: device tensors in int64 (nccl has no CPU tensors), and no count
all-reduce at all when every micro-batch's target count is known in advance."""

from __future__ import annotations

import pytest
import torch
import yaml

from conftest import write_corpus
from tunelab.recipe import load_recipe
from tunelab.train import dist as distmod


class RecordingDist(distmod.Dist):
    """One process that records what the loop hands to all_reduce_sum."""

    calls: list

    def all_reduce_sum(self, value):
        self.calls.append((value.device, value.dtype, tuple(value.shape)))
        assert value.device == self.device, "collectives must get tensors on the process's device"
        return value


@pytest.mark.parametrize("objective, preset, expect_count_reduce", [("clm", "llama-micro", False),
                                                                    ("mlm", "bert-tiny", True)])
def test_collectives_get_device_tensors(tmp_path, monkeypatch, objective, preset, expect_count_reduce):
    from tunelab.stages import run_stage

    rec = RecordingDist()
    rec.calls = []
    monkeypatch.setattr(distmod, "init", lambda: rec)
    corpus = write_corpus(tmp_path / "corpus", n_docs=24)
    recipe = {"name": "t", "model": {"preset": preset}, "tokenizer": {"vocab_size": 384, "train_bytes": 100_000},
              "data": {"train": str(corpus), "seq_len": 32},
              "objective": {"name": objective}, "train": {"max_steps": 3, "micro_batch_size": 2, "grad_accum": 2,
                        "precision": "fp32", "log_every": 1, "eval_max_tokens": 64}}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    run_stage(load_recipe(path), out=tmp_path / "run", quiet=True)
    counts = [c for c in rec.calls if c[1] == torch.int64]
    assert all(dtype in (torch.int64, torch.float32) for _, dtype, _ in rec.calls)
    # MLM target counts vary per micro-batch: summed on the device in int64, once per step.
    # CLM without loss masks: known in advance, so never all-reduced (no collective, no host sync).
    assert len(counts) == (3 if expect_count_reduce else 0)
