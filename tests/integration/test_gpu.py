"""GPU paths: bf16 + compile on CUDA, and DDP under nccl. Skipped (with the reason) without CUDA."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import yaml

from conftest import REPO, write_corpus
from tunelab.runs import train_losses

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI has none)")


def recipe(tmp_path, **train) -> str:
    corpus = write_corpus(tmp_path / "corpus", n_docs=30)
    r = {"name": "gpu", "model": {"preset": "llama-micro"}, "tokenizer": {"vocab_size": 384, "train_bytes": 100_000},
         "data": {"train": str(corpus), "seq_len": 64},
         "train": {"max_steps": 6, "micro_batch_size": 4, "log_every": 1, "eval_max_tokens": 256, "checkpoint_every": 3,
                   **train}}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(r))
    return str(path)


@cuda
def test_cuda_bf16_compile_follow_fp32(tmp_path):
    from tunelab.recipe import load_recipe
    from tunelab.stages import run_stage

    path = recipe(tmp_path)
    fp32 = train_losses(run_stage(load_recipe(path, ["train.precision=fp32"]), out=tmp_path / "fp32", quiet=True)
                        / "metrics.jsonl")
    fast = train_losses(run_stage(load_recipe(path, ["train.precision=bf16", "train.compile=true"]),
                                  out=tmp_path / "bf16", quiet=True) / "metrics.jsonl")
    for step in fp32:
        assert fast[step] == pytest.approx(fp32[step], rel=3e-2), step


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs for DDP under nccl")
def test_ddp_nccl_matches_one_process(tmp_path):
    from tunelab.recipe import load_recipe
    from tunelab.stages import run_stage

    path = recipe(tmp_path, precision="fp32")
    one = train_losses(run_stage(load_recipe(path), out=tmp_path / "one", quiet=True) / "metrics.jsonl")
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "tunelab",
                          "pretrain", path, "--out", str(tmp_path / "two"), "--quiet", "--set", "train.micro_batch_size=2"],
                         cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ})
    assert two.returncode == 0, two.stderr[-3000:]
    got = train_losses(tmp_path / "two" / "metrics.jsonl")
    for step in one:
        assert got[step] == pytest.approx(one[step], rel=1e-4), step
