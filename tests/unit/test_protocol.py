"""Method protocol v2 (tunelab/methods/base.py) through the real stage (tunelab.stages.run_stage).

Test-only methods below exercise one hook each: a trainable set that changes (select_trainable),
tensor state (a gradient mask), a zeroth-order update (train_step), and adapter-only checkpoints
(weights_to_save); a test-only objective brings an aux model (a teacher). They are registered in
tunelab.methods.METHODS / tunelab.objectives.OBJECTIVES by a fixture as "<this module>:<Class>", the
way a real one joins: the registry imports them.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from pydantic import BaseModel, ConfigDict
from safetensors.torch import load_file

import tunelab.methods
import tunelab.objectives
from conftest import write_corpus
from tunelab import models, tokenizers
from tunelab.recipe import validate_recipe
from tunelab.errors import RunDirError
from tunelab.methods.base import AuxModel, Method, lm_loss
from tunelab.objectives.base import Objective
from tunelab.runs import read_metrics, train_losses
from tunelab.stages import run_stage

# ---------------------------------------------------------------- test-only methods


def checkpoint_files(ckpt) -> list[str]:
    """A checkpoint's own files, without the HF config/tokenizer files that make it a loadable model dir."""
    hf = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
    return sorted(p.name for p in ckpt.iterdir() if p.name not in hf)


def layer_of(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[parts.index("layers") + 1]) if "layers" in parts else None


class HalfLayers(Method):
    """LISA-like: the trainable half of the layers alternates every 2 steps (layer 0, then 1, ...)."""
    name = "test-half-layers"
    calls: list = []

    @staticmethod
    def active(step: int) -> int:
        return (step // 2) % 2

    def prepare(self, model, ctx):
        self.current = None
        return model

    def select_trainable(self, model, step):
        want = self.active(step)
        HalfLayers.calls.append((step, want))
        if want == self.current:
            return False
        self.current = want
        for name, p in model.named_parameters():
            p.requires_grad_(layer_of(name) == want)
        return True


class Distill(Objective):
    """An objective with an aux model: loss = LM loss + KL(teacher || student); the teacher is a frozen,
    perturbed copy of the start."""
    name = "test-distill"
    noise_seed = 0  # changing it (outside the recipe) changes the teacher: a resume must refuse it
    last = None

    def prepare(self, model, ctx):
        teacher = copy.deepcopy(model)
        gen = torch.Generator().manual_seed(self.noise_seed)
        with torch.no_grad():
            for p in teacher.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
        self.teacher = AuxModel(module=teacher, reference=f"copy of the start, noise {self.noise_seed}",
                                sha256=models.weights_sha256(teacher))
        self.seen = []  # (teacher in train mode?, any teacher param requiring grad?) per loss call
        Distill.last = self

    def aux_models(self):
        return {"teacher": self.teacher}

    def loss(self, model, batch):
        out = model(**batch, use_cache=False)
        teacher = self.teacher.module
        self.seen.append((teacher.training, any(p.requires_grad for p in teacher.parameters())))
        with torch.no_grad():
            target = teacher(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits
        kl = torch.nn.functional.kl_div(out.logits.log_softmax(-1).flatten(0, 1), target.log_softmax(-1).flatten(0, 1),
                                        log_target=True, reduction="batchmean")
        return out.loss + kl


class MaskedGrads(Method):
    """Sparse fine-tuning: a fixed random mask on the layers' matrices zeroes their gradients.

    Each instance draws another mask (a counter, not the run seed), so a resumed run only trains
    the same entries if the mask really comes back from method.safetensors.
    """
    name = "test-masked-grads"
    instances = 0
    last = None

    def prepare(self, model, ctx):
        MaskedGrads.instances += 1
        gen = torch.Generator().manual_seed(1000 + MaskedGrads.instances)
        self.masks = {n: torch.rand(p.shape, generator=gen) < 0.5 for n, p in model.named_parameters()
                      if p.ndim == 2 and layer_of(n) is not None}
        self.initial = {n: p.detach().clone() for n, p in model.named_parameters()}
        self.loaded = None
        MaskedGrads.last = self
        return model

    def after_backward(self, model, step):
        params = dict(model.named_parameters())
        for n, mask in self.masks.items():
            params[n].grad.masked_fill_(~mask, 0.0)

    def tensor_state(self):
        return dict(self.masks)

    def load_tensor_state(self, tensors):
        self.loaded = {k: v.clone() for k, v in tensors.items()}
        self.masks = tensors


class MeZO(Method):
    """Zeroth-order (Malladi et al., 2023): two seeded forward passes per step, an in-place update."""
    name = "test-mezo"
    uses_backward = False
    eps = 1e-3

    def prepare(self, model, ctx):
        self.seed = ctx.seed
        return model

    def _perturb(self, params, seed, scale):
        gen = torch.Generator().manual_seed(seed)
        for p in params:
            p.add_(torch.randn(p.shape, generator=gen), alpha=scale)

    @torch.no_grad()
    def train_step(self, model, batches, step, lr):
        from tunelab.train.objectives import sequence_seed

        params = [p for _, p in self.trainable_params(model)]
        seed = sequence_seed(self.seed, step) % 2**62

        def mean_loss():
            return sum(lm_loss(model, b) for b in batches) / len(batches)

        self._perturb(params, seed, self.eps)
        plus = mean_loss()
        self._perturb(params, seed, -2 * self.eps)
        minus = mean_loss()
        self._perturb(params, seed, self.eps)
        grad = float((plus - minus) / (2 * self.eps))
        self._perturb(params, seed, -lr * grad)
        return (plus + minus) / 2


class NormAdapter(Method):
    """Adapter-like: trains the norm gains only and checkpoints only them (weights_to_save)."""
    name = "test-norm-adapter"

    def prepare(self, model, ctx):
        for n, p in model.named_parameters():
            p.requires_grad_(n.endswith("norm.weight"))
        return model

    def weights_to_save(self, model):
        return {n: p.detach() for n, p in model.named_parameters() if n.endswith("norm.weight")}

    def load_weights(self, model, tensors):
        params = dict(model.named_parameters())
        if set(tensors) != {n for n in params if n.endswith("norm.weight")}:
            raise RuntimeError("adapter tensors do not match")
        with torch.no_grad():
            for n, t in tensors.items():
                params[n].copy_(t)


class WithOptions(Method):
    name = "test-options"

    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid")
        strength: float = 1.0


TEST_METHODS = {cls.name: cls for cls in (HalfLayers, MaskedGrads, MeZO, NormAdapter, WithOptions)}
TEST_OBJECTIVES = {cls.name: cls for cls in (Distill,)}


@pytest.fixture(autouse=True)
def registered():
    """Each test-only method or objective joins its registry by one "module:Class" line, as a real one does."""
    for table, classes in ((tunelab.methods.METHODS, TEST_METHODS), (tunelab.objectives.OBJECTIVES, TEST_OBJECTIVES)):
        table.update({name: f"{__name__}:{cls.__name__}" for name, cls in classes.items()})
    yield
    for table, classes in ((tunelab.methods.METHODS, TEST_METHODS), (tunelab.objectives.OBJECTIVES, TEST_OBJECTIVES)):
        for name in classes:
            table.pop(name, None)


# ---------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("protocol") / "corpus", n_docs=30, seed=1)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, corpus) -> Path:
    """A saved model + tokenizer (model.path), for methods whose checkpoints depend on the base."""
    return save_base(tmp_path_factory.mktemp("base") / "model", corpus, seed=0)


def save_base(path: Path, corpus: Path, seed: int) -> Path:
    texts = [p.read_text() for p in sorted(corpus.rglob("*.txt"))]
    tok = tokenizers.train_tokenizer(texts, vocab_size=384)
    torch.manual_seed(seed)
    models.build_model("llama-micro", tok).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def recipe(corpus: Path, method: str, model_path: Path | None = None, objective: str = "clm", **train) -> object:
    data = {
        "name": "protocol",
        "model": {"path": str(model_path)} if model_path else {"preset": "llama-micro"},
        "tokenizer": {"vocab_size": 384, "train_bytes": 200_000},
        "data": {"train": str(corpus), "seq_len": 32},
        "train": {"max_steps": 8, "micro_batch_size": 4, "lr": 3e-3, "log_every": 1, "eval_every": 0,
                  "eval_max_tokens": 256, "checkpoint_every": 4, "keep_checkpoints": 20, "precision": "fp32",
                  "schedule": {"name": "cosine", "warmup_steps": 1}, **train},
        "method": {"name": method},
        "objective": {"name": objective},
    }
    return validate_recipe(data, "test recipe")


def resume_copy(run: Path, dest: Path, at_step: int) -> Path:
    """A copy of `run` as if it had been killed right after checkpoint step-`at_step`."""
    shutil.copytree(run, dest)
    shutil.rmtree(dest / "final")
    for ckpt in (dest / "checkpoints").iterdir():
        if int(ckpt.name.split("-")[1]) > at_step:
            shutil.rmtree(ckpt)
    return dest


def weights(ckpt: Path) -> dict[str, torch.Tensor]:
    name = "model.safetensors" if (ckpt / "model.safetensors").exists() else "adapter.safetensors"
    return load_file(str(ckpt / name))


def assert_exact_resume(run: Path, resumed: Path, at_step: int, max_steps: int = 8) -> None:
    expected, got = train_losses(run / "metrics.jsonl"), train_losses(resumed / "metrics.jsonl")
    assert sorted(got) == list(range(1, max_steps + 1))
    for step in range(at_step + 1, max_steps + 1):
        assert got[step] == expected[step], (step, got[step], expected[step])  # bit-identical in fp32 on CPU
    events = [e for e in read_metrics(resumed / "metrics.jsonl") if e["event"] == "resume"]
    assert events and events[-1]["step"] == at_step
    final_a, final_b = weights(run / "checkpoints" / f"step-{max_steps}"), \
        weights(resumed / "checkpoints" / f"step-{max_steps}")
    assert final_a.keys() == final_b.keys()
    for k in final_a:
        assert torch.equal(final_a[k], final_b[k]), k


# ---------------------------------------------------------------- (a) select_trainable: the trainable set changes


def test_changing_trainable_set_rebuilds_the_optimizer_and_resumes_exactly(tmp_path, corpus):
    HalfLayers.calls = []
    run = run_stage(recipe(corpus, "test-half-layers", checkpoint_every=1), out=tmp_path / "run", quiet=True)
    assert {s for s, _ in HalfLayers.calls} >= set(range(8))

    # Step k (0-based) runs between checkpoints step-k and step-(k+1): exactly the active layer's
    # tensors change, every one of them; all others (embeddings, the other layer, the final norm) are
    # bit-identical. A loop that kept the first optimizer would never move layer 1.
    for k in range(1, 8):
        before, after = weights(run / "checkpoints" / f"step-{k}"), weights(run / "checkpoints" / f"step-{k + 1}")
        active = HalfLayers.active(k)
        for name in before:
            changed = not torch.equal(before[name], after[name])
            assert changed == (layer_of(name) == active), (k, name, changed)
    # The saved optimizer holds moments for one layer only (the other's were dropped at the switch).
    opt = torch.load(run / "checkpoints" / "step-8" / "optimizer.pt", weights_only=True)
    n_layer_params = sum(1 for n in weights(run / "checkpoints" / "step-8") if layer_of(n) == 1)
    assert len(opt["state"]) == n_layer_params == 9

    # Exact resume from step 4, a switch boundary (steps 2-3 trained layer 1, steps 4-5 train layer 0).
    for at in (4, 3):
        resumed = resume_copy(run, tmp_path / f"resumed-{at}", at)
        run_stage(recipe(corpus, "test-half-layers", checkpoint_every=1), out=resumed, resume=True, quiet=True)
        assert_exact_resume(run, resumed, at)


# ---------------------------------------------------------------- (b) an aux model (teacher)


def test_aux_teacher_stays_out_of_optimizer_and_checkpoints_and_is_checked_on_resume(tmp_path, corpus):
    Distill.noise_seed = 0
    distill = dict(objective="test-distill", max_steps=6, checkpoint_every=3)
    run = run_stage(recipe(corpus, "full", **distill), out=tmp_path / "run", quiet=True)
    method = Distill.last
    teacher = method.teacher.module
    assert method.seen and all(mode == (False, False) for mode in method.seen)  # eval mode, frozen
    assert models.weights_sha256(teacher) == method.teacher.sha256  # never trained
    student_names = set(teacher.state_dict())  # the same architecture as the student
    n_student_params = len(list(teacher.parameters()))  # tied embedding / LM head counted once

    ckpt = run / "checkpoints" / "step-6"
    assert checkpoint_files(ckpt) == ["config.yaml", "manifest.json", "model.safetensors", "optimizer.pt", "rng.pt",
                                      "state.json"]
    saved = weights(ckpt)
    assert set(saved) <= student_names and not any("teacher" in k for k in saved)
    opt = torch.load(ckpt / "optimizer.pt", weights_only=True)
    n_params = sum(len(g["params"]) for g in opt["param_groups"])
    assert n_params == n_student_params == len(opt["state"])  # the student's, not 2x
    state = json.loads((ckpt / "state.json").read_text())
    assert state["aux"] == {"teacher": {"reference": "copy of the start, noise 0", "sha256": method.teacher.sha256}}
    losses = train_losses(run / "metrics.jsonl")
    assert losses[6] < losses[1]

    # The same teacher resumes exactly; a changed one is refused with a one-line RunDirError.
    resumed = resume_copy(run, tmp_path / "resumed", 3)
    run_stage(recipe(corpus, "full", **distill), out=resumed, resume=True, quiet=True)
    assert_exact_resume(run, resumed, 3, max_steps=6)
    changed = resume_copy(run, tmp_path / "changed", 3)
    Distill.noise_seed = 1
    try:
        with pytest.raises(RunDirError) as err:
            run_stage(recipe(corpus, "full", **distill), out=changed, resume=True, quiet=True)
    finally:
        Distill.noise_seed = 0
    msg = str(err.value)
    assert "\n" not in msg and "teacher" in msg and "step-3" in msg
    assert sorted(p.name for p in (changed / "checkpoints").iterdir()) == ["step-3"]  # nothing written
    assert not (changed / "final").exists()


# ---------------------------------------------------------------- (c) tensor state (a gradient mask)


def test_tensor_state_is_checkpointed_and_restored_bit_exactly(tmp_path, corpus):
    cfg = lambda: recipe(corpus, "test-masked-grads", weight_decay=0.0)  # noqa: E731 (decay would move masked weights)
    run = run_stage(cfg(), out=tmp_path / "run", quiet=True)
    original = MaskedGrads.last
    masks = original.masks
    assert len(masks) == 2 * 7  # q, k, v, o, gate, up, down per layer

    for ckpt in ("step-4", "step-8"):
        saved = load_file(str(run / "checkpoints" / ckpt / "method.safetensors"))
        assert saved.keys() == masks.keys()
        assert all(torch.equal(saved[k], masks[k]) and saved[k].dtype == torch.bool for k in masks)
        assert "method.safetensors" in json.loads((run / "checkpoints" / ckpt / "manifest.json").read_text())

    # Masked entries never change (bit-identical); unmasked ones of the same tensors do.
    final = weights(run / "checkpoints" / "step-8")
    for name, mask in masks.items():
        start, end = original.initial[name], final[name]
        assert torch.equal(end[~mask], start[~mask]), name
        assert (end[mask] != start[mask]).float().mean() > 0.9, name

    # Resume: the new instance drew another mask in prepare; the checkpoint's replaces it, bit-exactly.
    resumed = resume_copy(run, tmp_path / "resumed", 4)
    run_stage(cfg(), out=resumed, resume=True, quiet=True)
    again = MaskedGrads.last
    assert again is not original and again.loaded is not None
    for k in masks:
        assert torch.equal(again.loaded[k], masks[k]) and torch.equal(again.masks[k], masks[k]), k
    assert_exact_resume(run, resumed, 4)
    saved = load_file(str(resumed / "checkpoints" / "step-8" / "method.safetensors"))
    assert all(torch.equal(saved[k], masks[k]) for k in masks)


# ---------------------------------------------------------------- (d) zeroth order: no backward, no optimizer


def test_zeroth_order_method_checkpoints_without_optimizer_and_resumes_exactly(tmp_path, corpus):
    run = run_stage(recipe(corpus, "test-mezo", lr=1e-3), out=tmp_path / "run", quiet=True)
    for ckpt in ("step-4", "step-8"):
        names = checkpoint_files(run / "checkpoints" / ckpt)
        assert names == ["config.yaml", "manifest.json", "model.safetensors", "rng.pt", "state.json"], names
    losses = train_losses(run / "metrics.jsonl")
    assert sorted(losses) == list(range(1, 9)) and all(v == v and v > 0 for v in losses.values())
    events = [e for e in read_metrics(run / "metrics.jsonl") if e["event"] == "train"]
    assert all("grad_norm" not in e for e in events)  # no backward, no gradient norm
    a, b = weights(run / "checkpoints" / "step-4"), weights(run / "checkpoints" / "step-8")
    assert all(not torch.equal(a[k], b[k]) for k in a)  # the update touched every tensor

    resumed = resume_copy(run, tmp_path / "resumed", 4)
    run_stage(recipe(corpus, "test-mezo", lr=1e-3), out=resumed, resume=True, quiet=True)
    assert_exact_resume(run, resumed, 4)


# ---------------------------------------------------------------- (e) adapter-only checkpoints


def test_adapter_checkpoints_hold_only_the_adapter_and_refuse_another_base(tmp_path, corpus, base_dir):
    base = tmp_path / "base"
    shutil.copytree(base_dir, base)
    base_hash = models.weights_sha256(models.load_model(str(base)))
    cfg = lambda: recipe(corpus, "test-norm-adapter", model_path=base, max_steps=6, checkpoint_every=3)  # noqa: E731
    run = run_stage(cfg(), out=tmp_path / "run", quiet=True)

    for ckpt in ("step-3", "step-6"):
        path = run / "checkpoints" / ckpt
        names = sorted(p.name for p in path.iterdir())
        assert names == ["adapter.safetensors", "config.yaml", "manifest.json", "optimizer.pt", "rng.pt", "state.json"]
        adapter = load_file(str(path / "adapter.safetensors"))
        assert sorted(adapter) == sorted(n for n in adapter if n.endswith("norm.weight")) and len(adapter) == 5
        assert json.loads((path / "state.json").read_text())["base_weights_sha256"] == base_hash
    assert json.loads((run / "lineage.json").read_text())["parents"][0]["weights_sha256_in_memory"] == base_hash

    resumed = resume_copy(run, tmp_path / "resumed", 3)
    run_stage(cfg(), out=resumed, resume=True, quiet=True)
    assert_exact_resume(run, resumed, 3, max_steps=6)

    # Another base at the same model.path (retrained in place, say): the adapter does not fit it.
    changed = resume_copy(run, tmp_path / "changed", 3)
    save_base(base, corpus, seed=1)
    assert models.weights_sha256(models.load_model(str(base))) != base_hash
    with pytest.raises(RunDirError) as err:
        run_stage(cfg(), out=changed, resume=True, quiet=True)
    msg = str(err.value)
    assert "\n" not in msg and "base" in msg and "step-3" in msg
    assert sorted(p.name for p in (changed / "checkpoints").iterdir()) == ["step-3"]


# ---------------------------------------------------------------- registry


def test_a_registered_test_method_validates_its_options_at_load(corpus):
    from tunelab.errors import ConfigError

    cfg = recipe(corpus, "test-options")
    assert cfg.method.name == "test-options"
    data = {"method": {"name": "test-options", "options": {"strenght": 2}}, "model": {"preset": "llama-micro"}}
    with pytest.raises(ConfigError) as err:
        validate_recipe(data, "r.yaml")
    assert "did you mean 'strength'" in str(err.value)
