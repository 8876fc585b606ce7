"""Checkpoints: exact round trip, keep-last-K, corrupt or partial ones skipped, atomic under a crash."""

import json
import random

import numpy as np
import pytest
import torch

from tunelab import models
from tunelab.train import checkpoint as ckpt


@pytest.fixture(scope="module")
def tokenizer():
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    rng = random.Random(0)
    return models.train_tokenizer([" ".join(rng.choice(words) for _ in range(200)) for _ in range(20)], 300)


def make(tokenizer, seed=0):
    torch.manual_seed(seed)
    model = models.build_model("llama-micro", tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, optimizer


def take_steps(model, optimizer, n=2):
    for _ in range(n):
        ids = torch.randint(0, 250, (2, 8))
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def save(root, step, model, optimizer, keep=3):
    return ckpt.save_checkpoint(root, step, model, optimizer, {"step": step, "tokens": step * 16,
                                                               "data": {"drawn": [step]}}, "name: x\n", keep=keep)


def test_round_trip_is_exact(tmp_path, tokenizer):
    model, optimizer = make(tokenizer)
    take_steps(model, optimizer)
    random.seed(5), np.random.seed(6), torch.manual_seed(7)
    path = save(tmp_path, 2, model, optimizer)
    expected_draws = (random.random(), np.random.rand(), torch.rand(1))

    fresh, fresh_opt = make(tokenizer, seed=1)
    take_steps(fresh, fresh_opt, 1)  # different weights and state, to be overwritten
    restored = ckpt.load_checkpoint(path, fresh, fresh_opt)
    assert restored.step == 2 and restored.state["data"] == {"drawn": [2]}
    for (n, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b), n
    for a, b in zip(optimizer.state_dict()["state"].values(), fresh_opt.state_dict()["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected_draws  # RNG restored too


def test_keep_last_k_and_leftover_temp_dirs(tmp_path, tokenizer):
    model, optimizer = make(tokenizer)
    (tmp_path / ".tmp-step-9-1").mkdir(parents=True)  # a writer killed mid-save
    for step in (1, 2, 3, 4):
        save(tmp_path, step, model, optimizer, keep=2)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [4, 3]
    assert not (tmp_path / ".tmp-step-9-1").exists()


@pytest.mark.parametrize("damage", ["truncate_model", "flip_optimizer_byte", "no_manifest", "missing_rng"])
def test_corrupt_checkpoint_is_skipped_with_reason(tmp_path, tokenizer, damage):
    model, optimizer = make(tokenizer)
    save(tmp_path, 1, model, optimizer)
    newest = save(tmp_path, 2, model, optimizer)
    if damage == "truncate_model":
        data = (newest / "model.safetensors").read_bytes()
        (newest / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "flip_optimizer_byte":
        data = bytearray((newest / "optimizer.pt").read_bytes())
        data[len(data) // 2] ^= 0xFF
        (newest / "optimizer.pt").write_bytes(bytes(data))
    elif damage == "no_manifest":
        (newest / "manifest.json").unlink()
    else:
        (newest / "rng.pt").unlink()
    messages = []
    assert ckpt.latest_intact(tmp_path, log=messages.append) == tmp_path / "step-1"
    assert len(messages) == 1 and "step-2" in messages[0]


def test_crash_during_save_leaves_previous_checkpoints(tmp_path, tokenizer, monkeypatch):
    model, optimizer = make(tokenizer)
    save(tmp_path, 1, model, optimizer)
    real_save = torch.save

    def crash(obj, path, *a, **kw):
        if str(path).endswith("optimizer.pt"):
            raise OSError("disk full")
        return real_save(obj, path, *a, **kw)

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        save(tmp_path, 2, model, optimizer)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [1]
    assert ckpt.verify(tmp_path / "step-1") is None


def test_resaving_a_step_replaces_it(tmp_path, tokenizer):
    model, optimizer = make(tokenizer)
    save(tmp_path, 3, model, optimizer)
    take_steps(model, optimizer, 1)
    path = save(tmp_path, 3, model, optimizer)
    assert ckpt.verify(path) is None
    manifest = json.loads((path / "manifest.json").read_text())
    assert set(manifest) == set(ckpt.FILES)


def test_torch_load_is_always_weights_only():
    import pathlib
    import re

    import tunelab

    for path in pathlib.Path(tunelab.__file__).parent.rglob("*.py"):
        for call in re.findall(r"torch\.load\([^)]*\)", path.read_text()):
            assert "weights_only=True" in call, (path, call)
