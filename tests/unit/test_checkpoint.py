"""Atomic checkpoints and exact resume (tunelab/train/checkpoint.py) on a tiny real model."""

from __future__ import annotations

import ast
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tunelab.errors import RunDirError
from tunelab.methods import create_method
from tunelab.models import build_model
from tunelab.tokenizers import train_tokenizer
from tunelab.train import checkpoint as ckpt

REPO = Path(__file__).resolve().parents[2]
# What a full-model checkpoint holds (a method with tensor state adds method.safetensors; an adapter
# method writes adapter.safetensors instead of model.safetensors; a zeroth-order one has no optimizer.pt).
FILES = ("model.safetensors", "config.json", "optimizer.pt", "rng.pt", "state.json", "config.yaml")
FULL = create_method("full", {})
_WORDS = "the model data token train loss step layer weight value cache file text domain batch".split()


@pytest.fixture(scope="module")
def tokenizer():
    rng = random.Random(0)
    texts = [" ".join(rng.choice(_WORDS) for _ in range(60)) + "." for _ in range(80)]  # ~30 KB
    return train_tokenizer(texts, vocab_size=300)


def make_model(tokenizer, seed: int):
    torch.manual_seed(seed)
    return build_model("llama-micro", tokenizer)


def make_optimizer(model):
    return torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)


def train_steps(model, optimizer, n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    for _ in range(n):
        ids = torch.randint(vocab, (2, 16), generator=g)
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


@pytest.fixture
def trained(tokenizer):
    model = make_model(tokenizer, 0)
    opt = make_optimizer(model)
    train_steps(model, opt, 2)
    return model, opt


def save(root: Path, step: int, model, opt, keep: int = 10, hooks=FULL, rng=None, base_sha256=None, **state):
    """`hooks`: the method object; `state` entries go into state.json (e.g. method=... is its JSON state)."""
    return ckpt.save_checkpoint(root, step, model=model, optimizer=opt, method=hooks,
                                state={"step": step, "tokens": step * 32, **state},
                                config_yaml=f"name: test\nstep: {step}\n", rng=rng or [ckpt.rng_state()], keep=keep,
                                base_sha256=base_sha256)


def load(path: Path, model, opt=None, hooks=FULL, **kwargs):
    restored = ckpt.load_checkpoint(path, model, hooks, **kwargs)
    ckpt.load_optimizer(path, opt)
    return restored


def seed_all(seed: int):
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


# ---------------------------------------------------------------- exact round trip


def test_save_load_round_trip_is_bit_identical(tmp_path, tokenizer, trained):
    model, opt = trained
    seed_all(123)
    # Advance every RNG a bit so the saved state is not a freshly seeded one.
    torch.rand(7), random.random(), np.random.rand(3)
    path = save(tmp_path, 2, model, opt, data={"cursor": [1, 2, 3]}, method={"active": [0]})
    assert path == tmp_path / "step-2"
    assert sorted(p.name for p in path.iterdir()) == sorted([*FILES, "manifest.json"])
    expect_torch, expect_py, expect_np = torch.rand(5), random.random(), np.random.rand(4)

    # Scramble all RNGs, then restore into a fresh model and optimizer.
    seed_all(999)
    fresh = make_model(tokenizer, 1)
    fresh_opt = make_optimizer(fresh)
    assert not torch.equal(fresh.model.layers[0].mlp.up_proj.weight, model.model.layers[0].mlp.up_proj.weight)
    restored = load(path, fresh, fresh_opt)

    assert restored.step == 2
    assert restored.state["tokens"] == 64
    assert restored.state["data"] == {"cursor": [1, 2, 3]} and restored.state["method"] == {"active": [0]}
    assert "rng" not in restored.state

    # Weights: every tensor bit-identical (including the tied embedding / LM head).
    a, b = model.state_dict(), fresh.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert fresh.lm_head.weight.data_ptr() == fresh.model.embed_tokens.weight.data_ptr()  # still tied

    # Optimizer: step counts and both moments, per parameter.
    sa, sb = opt.state_dict(), fresh_opt.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys() and len(sa["state"]) > 0
    for k in sa["state"]:
        for name in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(sa["state"][k][name], sb["state"][k][name]), (k, name)

    # RNG: the very next draws equal those right after saving.
    assert torch.equal(torch.rand(5), expect_torch)
    assert random.random() == expect_py
    assert np.array_equal(np.random.rand(4), expect_np)


def test_resumed_training_continues_identically(tmp_path, tokenizer, trained):
    model, opt = trained
    path = save(tmp_path, 2, model, opt)
    train_steps(model, opt, 2, seed=7)

    fresh = make_model(tokenizer, 5)
    fresh_opt = make_optimizer(fresh)
    load(path, fresh, fresh_opt)
    train_steps(fresh, fresh_opt, 2, seed=7)
    for (k, x), (_, y) in zip(model.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(x, y), k


def test_load_into_the_wrong_model_is_a_run_dir_error(tmp_path, tokenizer, trained):
    model, opt = trained
    path = save(tmp_path, 2, model, opt)
    torch.manual_seed(0)
    other = build_model("llama-micro", tokenizer, overrides={"hidden_size": 64, "intermediate_size": 64})
    with pytest.raises(RunDirError) as err:
        ckpt.load_checkpoint(path, other, FULL)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_manifest_records_size_and_sha256(tmp_path, trained):
    import hashlib

    model, opt = trained
    path = save(tmp_path, 2, model, opt)
    manifest = json.loads((path / "manifest.json").read_text())
    assert set(manifest) == set(FILES)
    for name, entry in manifest.items():
        blob = (path / name).read_bytes()
        assert entry == {"size": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}
    assert ckpt.verify(path) is None


# ---------------------------------------------------------------- listing, pruning, temp dirs


def test_keep_last_k(tmp_path, trained):
    model, opt = trained
    for step in (10, 20, 30, 40):
        save(tmp_path, step, model, opt, keep=2)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [40, 30]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-30", "step-40"]


def test_keep_orders_by_step_number_not_name(tmp_path, trained):
    model, opt = trained
    for step in (9, 10, 100):  # "step-9" > "step-100" as strings
        save(tmp_path, step, model, opt, keep=2)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [100, 10]


def test_leftover_tmp_dir_is_not_a_checkpoint_and_is_cleaned(tmp_path, trained):
    model, opt = trained
    save(tmp_path, 1, model, opt)
    # A writer killed mid-save (another process) left this behind, possibly complete-looking.
    stale = tmp_path / ".tmp-step-5-999999"
    shutil.copytree(tmp_path / "step-1", stale)
    other = tmp_path / "not-a-checkpoint"
    other.mkdir()
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [1]
    assert ckpt.latest_intact(tmp_path, log=lambda m: None) == tmp_path / "step-1"
    save(tmp_path, 2, model, opt)
    assert not stale.exists()
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [2, 1]


def test_list_checkpoints_of_missing_dir(tmp_path):
    assert ckpt.list_checkpoints(tmp_path / "nope") == []
    assert ckpt.latest_intact(tmp_path / "nope", log=lambda m: None) is None


def test_resaving_a_step_replaces_it(tmp_path, tokenizer, trained):
    model, opt = trained
    save(tmp_path, 2, model, opt, tokens_marker=1)
    train_steps(model, opt, 1, seed=3)
    save(tmp_path, 2, model, opt, tokens_marker=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-2"]  # no .old-/.tmp- leftovers
    assert ckpt.verify(tmp_path / "step-2") is None
    fresh = make_model(tokenizer, 9)
    restored = load(tmp_path / "step-2", fresh)
    assert restored.state["tokens_marker"] == 2
    assert torch.equal(fresh.model.norm.weight, model.model.norm.weight)


# ---------------------------------------------------------------- corruption


def _truncate_model(path: Path):
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _flip_byte_in_optimizer(path: Path):
    f = path / "optimizer.pt"
    blob = bytearray(f.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    f.write_bytes(bytes(blob))


def _delete_manifest(path: Path):
    (path / "manifest.json").unlink()


def _delete_rng(path: Path):
    (path / "rng.pt").unlink()


def _garble_manifest(path: Path):
    (path / "manifest.json").write_text("{not json")


CORRUPTIONS = {
    "truncated-model": (_truncate_model, ["model.safetensors", "size"]),
    "flipped-optimizer-byte": (_flip_byte_in_optimizer, ["optimizer.pt", "checksum"]),
    "no-manifest": (_delete_manifest, ["manifest.json"]),
    "missing-rng": (_delete_rng, ["rng.pt", "missing"]),
    "garbled-manifest": (_garble_manifest, ["manifest.json", "corrupt"]),
}


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_latest_intact_skips_a_corrupt_newest_checkpoint(tmp_path, trained, kind):
    corrupt, words = CORRUPTIONS[kind]
    model, opt = trained
    save(tmp_path, 1, model, opt)
    save(tmp_path, 2, model, opt)
    corrupt(tmp_path / "step-2")
    problem = ckpt.verify(tmp_path / "step-2")
    assert problem is not None
    messages: list[str] = []
    assert ckpt.latest_intact(tmp_path, log=messages.append) == tmp_path / "step-1"
    assert len(messages) == 1
    assert "step-2" in messages[0] and problem in messages[0]
    for word in words:
        assert word in messages[0], (word, messages[0])


def test_latest_intact_when_all_are_corrupt(tmp_path, trained):
    model, opt = trained
    save(tmp_path, 1, model, opt)
    save(tmp_path, 2, model, opt)
    _delete_manifest(tmp_path / "step-1")
    _truncate_model(tmp_path / "step-2")
    messages: list[str] = []
    assert ckpt.latest_intact(tmp_path, log=messages.append) is None
    assert len(messages) == 2


# ---------------------------------------------------------------- atomicity


def _failing_torch_save(monkeypatch):
    real_save = torch.save

    def save_or_crash(obj, f, *args, **kwargs):
        if str(f).endswith("optimizer.pt"):
            raise OSError("simulated crash while writing optimizer.pt")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_or_crash)


def test_crash_during_save_leaves_no_step_dir_and_old_ones_intact(tmp_path, trained, monkeypatch):
    model, opt = trained
    save(tmp_path, 1, model, opt, keep=2)
    before = {p.name: p.read_bytes() for p in (tmp_path / "step-1").iterdir()}
    _failing_torch_save(monkeypatch)
    with pytest.raises(OSError, match="simulated crash"):
        save(tmp_path, 2, model, opt, keep=2)
    monkeypatch.undo()
    assert not (tmp_path / "step-2").exists()
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [1]
    assert ckpt.verify(tmp_path / "step-1") is None
    assert {p.name: p.read_bytes() for p in (tmp_path / "step-1").iterdir()} == before
    assert ckpt.latest_intact(tmp_path, log=lambda m: None) == tmp_path / "step-1"
    # The next successful save works and the set stays consistent.
    save(tmp_path, 2, model, opt, keep=2)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [2, 1]
    assert ckpt.verify(tmp_path / "step-2") is None


def test_crash_while_resaving_a_step_keeps_the_old_copy(tmp_path, trained, monkeypatch):
    model, opt = trained
    save(tmp_path, 2, model, opt)
    _failing_torch_save(monkeypatch)
    with pytest.raises(OSError):
        save(tmp_path, 2, model, opt)
    monkeypatch.undo()
    assert ckpt.verify(tmp_path / "step-2") is None


def test_failed_save_leaves_no_temp_dir_behind(tmp_path, trained, monkeypatch):
    model, opt = trained
    save(tmp_path, 1, model, opt)
    _failing_torch_save(monkeypatch)
    with pytest.raises(OSError):
        save(tmp_path, 2, model, opt)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-1"]
    save(tmp_path, 3, model, opt)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-1", "step-3"]


# ---------------------------------------------------------------- no pickles


def _torch_load_calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            fn = node.func
            if isinstance(fn, ast.Attribute) and fn.attr == "load" and isinstance(fn.value, ast.Name) \
                    and fn.value.id == "torch":
                yield node


def test_torch_load_is_only_called_with_weights_only_true():
    calls = []
    for path in sorted((REPO / "tunelab").rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        for node in _torch_load_calls(ast.parse(text)):
            kw = {k.arg: k.value for k in node.keywords}
            ok = "weights_only" in kw and isinstance(kw["weights_only"], ast.Constant) \
                and kw["weights_only"].value is True
            calls.append((f"{path.relative_to(REPO)}:{node.lineno}", ok))
        # No aliasing around the check (e.g. `from torch import load`).
        assert "from torch import load" not in text, path
    assert any(c[0].startswith(os.path.join("tunelab", "train", "checkpoint.py")) for c in calls)
    bad = [where for where, ok in calls if not ok]
    assert not bad, f"torch.load without weights_only=True at {bad}"


# ---------------------------------------------------------------- protocol v2: what a method adds to a checkpoint


class StatefulMethod(type(FULL)):
    """A method with JSON state and tensor state (a gradient mask, say), recording what it is given."""

    def __init__(self, mask=None, counter=0):
        super().__init__({})
        self.mask, self.counter = mask, counter
        self.loaded_tensors = None

    def state_dict(self):
        return {"counter": self.counter}

    def load_state_dict(self, state):
        self.counter = state["counter"]

    def tensor_state(self):
        return {"mask": self.mask} if self.mask is not None else {}

    def load_tensor_state(self, tensors):
        self.loaded_tensors = tensors
        self.mask = tensors["mask"]


class AdapterMethod(type(FULL)):
    """Saves only its own tensors (the two norms of layer 0), like an adapter."""
    NAMES = ("model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight")

    def weights_to_save(self, model):
        sd = model.state_dict()
        return {k: sd[k] for k in self.NAMES}

    def load_weights(self, model, tensors):
        assert set(tensors) == set(self.NAMES)
        sd = dict(model.named_parameters())
        with torch.no_grad():
            for k, v in tensors.items():
                sd[k].copy_(v)


def test_method_state_and_tensor_state_round_trip_bit_exactly(tmp_path, tokenizer, trained):
    model, opt = trained
    mask = torch.rand(7, 5, generator=torch.Generator().manual_seed(3)) < 0.5
    scores = torch.randn(11, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    method = StatefulMethod(mask=mask, counter=41)
    method.tensor_state = lambda: {"mask": mask, "scores": scores}
    path = save(tmp_path, 3, model, opt, hooks=method, method=method.state_dict())
    assert sorted(p.name for p in path.iterdir()) == sorted([*FILES, "method.safetensors", "manifest.json"])
    assert "method.safetensors" in json.loads((path / "manifest.json").read_text())
    assert ckpt.verify(path) is None

    fresh = StatefulMethod()
    restored = load(path, make_model(tokenizer, 1), hooks=fresh)
    assert fresh.counter == 41 and restored.state["method"] == {"counter": 41}
    assert set(fresh.loaded_tensors) == {"mask", "scores"}
    for name, expected in (("mask", mask), ("scores", scores)):
        got = fresh.loaded_tensors[name]
        assert got.dtype == expected.dtype and torch.equal(got, expected), name


def test_method_without_tensor_state_writes_no_method_file(tmp_path, trained):
    model, opt = trained
    path = save(tmp_path, 1, model, opt, hooks=StatefulMethod(mask=None), method={"counter": 5})
    assert not (path / "method.safetensors").exists()
    fresh = StatefulMethod()
    ckpt.load_checkpoint(path, model, fresh)
    assert fresh.loaded_tensors is None and fresh.counter == 5  # not called when there is nothing to load


def test_adapter_checkpoint_holds_only_the_adapter_and_the_base_hash(tmp_path, tokenizer, trained):
    from safetensors.torch import load_file

    model, opt = trained
    method = AdapterMethod({})
    path = save(tmp_path, 2, model, opt, hooks=method, base_sha256="ab" * 32)
    names = sorted(p.name for p in path.iterdir())
    assert "model.safetensors" not in names and "adapter.safetensors" in names
    assert ckpt.verify(path) is None
    assert set(load_file(str(path / "adapter.safetensors"))) == set(AdapterMethod.NAMES)
    assert json.loads((path / "state.json").read_text())["base_weights_sha256"] == "ab" * 32

    # Resuming on the same base loads the adapter tensors, bit-exactly, and leaves the rest alone.
    fresh = make_model(tokenizer, 7)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    load(path, fresh, hooks=AdapterMethod({}), base_sha256="ab" * 32)
    after, trained_sd = fresh.state_dict(), model.state_dict()
    for k in after:
        expected = trained_sd[k] if k in AdapterMethod.NAMES else before[k]
        assert torch.equal(after[k], expected), k

    # Another base is refused, before anything is loaded.
    other = make_model(tokenizer, 8)
    untouched = {k: v.clone() for k, v in other.state_dict().items()}
    for wrong in ("cd" * 32, None):
        with pytest.raises(RunDirError) as err:
            ckpt.load_checkpoint(path, other, AdapterMethod({}), base_sha256=wrong)
        msg = str(err.value)
        assert "\n" not in msg and str(path) in msg and "base" in msg
    assert all(torch.equal(v, untouched[k]) for k, v in other.state_dict().items())


def test_checkpoint_without_optimizer(tmp_path, tokenizer, trained):
    model, _ = trained
    path = save(tmp_path, 4, model, None)
    assert not (path / "optimizer.pt").exists()
    assert "optimizer.pt" not in json.loads((path / "manifest.json").read_text())
    assert ckpt.verify(path) is None and ckpt.latest_intact(tmp_path, log=lambda m: None) == path
    fresh = make_model(tokenizer, 2)
    load(path, fresh, None)  # load_optimizer(path, None) is a no-op
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))
    # A run that does have an optimizer cannot resume from it: one line, not a traceback.
    with pytest.raises(RunDirError) as err:
        ckpt.load_optimizer(path, make_optimizer(fresh))
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_optimizer_state_that_does_not_fit_is_a_run_dir_error(tmp_path, tokenizer, trained):
    model, opt = trained
    path = save(tmp_path, 2, model, opt)
    fresh = make_model(tokenizer, 1)
    fewer = torch.optim.AdamW(list(fresh.parameters())[:2], lr=1e-2)
    with pytest.raises(RunDirError) as err:
        ckpt.load_optimizer(path, fewer)
    assert "\n" not in str(err.value) and "optimizer" in str(err.value)


def test_aux_model_hash_is_checked_on_load(tmp_path, tokenizer, trained):
    model, opt = trained
    aux = {"teacher": {"reference": "runs/big/final", "sha256": "11" * 32}}
    path = save(tmp_path, 2, model, opt, aux=aux)
    for hashes in ({"teacher": "22" * 32}, {}, None):
        with pytest.raises(RunDirError) as err:
            ckpt.load_checkpoint(path, make_model(tokenizer, 1), FULL, aux_hashes=hashes)
        msg = str(err.value)
        assert "\n" not in msg and "teacher" in msg and "runs/big/final" in msg
    restored = ckpt.load_checkpoint(path, make_model(tokenizer, 1), FULL, aux_hashes={"teacher": "11" * 32})
    assert restored.state["aux"] == aux


def test_every_rank_gets_its_own_rng_state_back(tmp_path, trained):
    model, opt = trained
    states, expected = [], []
    for rank_seed in (10, 20):  # what two processes would hand in, gathered in rank order
        seed_all(rank_seed)
        torch.rand(3), random.random(), np.random.rand(2)
        states.append(ckpt.rng_state())
        expected.append((torch.rand(4), random.random(), np.random.rand(3)))
    path = save(tmp_path, 2, model, opt, rng=states)
    assert len(torch.load(path / "rng.pt", weights_only=True)) == 2
    for rank in (1, 0):
        seed_all(999)
        messages = []
        ckpt.load_checkpoint(path, model, FULL, rank=rank, world=2, log=messages.append)
        assert messages == []
        t, p, n = expected[rank]
        assert torch.equal(torch.rand(4), t) and random.random() == p and np.array_equal(np.random.rand(3), n)
    # A resume on another number of processes warns that random draws do not continue exactly.
    messages = []
    ckpt.load_checkpoint(path, model, FULL, rank=0, world=1, log=messages.append)
    assert len(messages) == 1 and "2 process" in messages[0] and "dropout" in messages[0]


def test_a_checkpoint_without_weights_is_not_intact(tmp_path, trained):
    model, opt = trained
    path = save(tmp_path, 2, model, opt)
    (path / "model.safetensors").unlink()
    manifest = json.loads((path / "manifest.json").read_text())
    del manifest["model.safetensors"]
    (path / "manifest.json").write_text(json.dumps(manifest))
    assert "weights" in ckpt.verify(path)


# ---------------------------------------------------------------- init_optimizer: moments carried by name


class TwoLayers(torch.nn.Module):
    def __init__(self, width: int = 4):
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Linear(3, width)
        self.b = torch.nn.Linear(width, 2)

    def step(self, optimizer) -> None:
        self(torch.randn(5, 3)).pow(2).sum().backward()
        optimizer.step()
        optimizer.zero_grad()

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def optimizer_over(model, names, **train):
    from tunelab.config.training import TrainConfig
    from tunelab.train.optim import build_optimizer

    named = [(n, p) for n, p in model.named_parameters() if n in names]
    return build_optimizer(named, TrainConfig(**{"lr": 1e-2, "weight_decay": 0.1, **train}))


def saved_optimizer(tmp_path, state: dict) -> Path:
    torch.save(state, tmp_path / "optimizer.pt")
    return tmp_path


def test_init_optimizer_carries_moments_by_name_into_another_trainable_set(tmp_path):
    model = TwoLayers()
    partial = optimizer_over(model, {"a.weight", "b.bias"})  # e.g. LISA's trainable set at its last step
    for _ in range(3):
        model.step(partial)
    path = saved_optimizer(tmp_path, partial.state_dict())
    params = dict(model.named_parameters())
    expected = {n: {k: v.clone() for k, v in partial.state[params[n]].items()} for n in ("a.weight", "b.bias")}

    everything = optimizer_over(model, set(params), lr=5e-3, weight_decay=0.0)  # this run's own settings
    assert ckpt.carry_optimizer_moments(path, everything) == {"carried": 2, "fresh": 2}
    for name, p in params.items():
        if name in expected:
            for key, value in expected[name].items():
                assert torch.equal(everything.state[p][key], value), (name, key)
        else:
            assert not everything.state.get(p), name
    assert [g["lr"] for g in everything.param_groups] == [5e-3, 5e-3]
    assert [g["weight_decay"] for g in everything.param_groups] == [0.0, 0.0]
    model.step(everything)  # carried (step 3) and fresh (step 0) moments update together
    assert float(everything.state[params["a.weight"]]["step"]) == 4
    assert float(everything.state[params["a.bias"]]["step"]) == 1


def test_init_optimizer_refuses_what_cannot_be_carried(tmp_path):
    model = TwoLayers()
    adam = optimizer_over(model, {"a.weight"})
    model.step(adam)
    path = saved_optimizer(tmp_path, adam.state_dict())
    cases = {  # this run's optimizer -> words of the one-line error
        "another optimizer": (optimizer_over(model, {"a.weight"}, optimizer="sgd"), "another optimizer"),
        "nothing in common": (optimizer_over(model, {"b.weight", "b.bias"}), "none of this run's trainable"),
        "same name, other shape": (optimizer_over(TwoLayers(width=6), {"a.weight"}), "shape"),
    }
    for case, (optimizer, words) in cases.items():
        with pytest.raises(RunDirError) as err:
            ckpt.carry_optimizer_moments(path, optimizer)
        message = str(err.value)
        assert "\n" not in message and words in message and "init_optimizer: false" in message, (case, message)


def test_init_optimizer_from_a_checkpoint_without_names_loads_by_position(tmp_path):
    model = TwoLayers()
    adam = optimizer_over(model, {n for n, _ in model.named_parameters()})
    model.step(adam)
    old = adam.state_dict()
    for group in old["param_groups"]:  # as checkpoints were written before the names were kept
        del group["param_names"]
    path = saved_optimizer(tmp_path, old)
    again = optimizer_over(TwoLayers(), {n for n, _ in model.named_parameters()})
    assert ckpt.carry_optimizer_moments(path, again) == {"carried": 4, "fresh": 0}
