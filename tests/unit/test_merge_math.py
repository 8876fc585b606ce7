"""Merge math on small tensors: hand-worked examples, peft.utils.merge_utils equality, the streaming
whole-model merge (blocks, dtypes, tied embeddings), and the merge recipe's one-line errors."""

from __future__ import annotations

import math

import pytest
import torch
from peft.utils import merge_utils as mu

from tunelab.config import MergeRecipe, validate
from tunelab.errors import ConfigError
from tunelab.ops import merge as ops
from tunelab.ops.merge import merge_tensor


def t(*values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


# ---------------------------------------------------------------- hand-worked examples


def test_linear_and_uniform_soup():
    a, b = t(1, 2, 3), t(3, 2, -1)
    assert torch.equal(merge_tensor("linear", [a, b]), t(2, 2, 1))  # no weights: the uniform mean
    assert torch.allclose(merge_tensor("linear", [a, b], [3, 1]), t(1.5, 2, 2))  # normalized: 3/4 a + 1/4 b
    assert torch.allclose(merge_tensor("linear", [a, b], [3, 1], options={"normalize": False}), t(6, 8, 8))


def test_task_arithmetic_hand_worked():
    base = t(1, 1, 1)
    # deltas (1, 0, -1) and (0, 2, 0); 1 * d1 + 0.5 * d2 = (1, 1, -1); scale 2 -> (2, 2, -2)
    out = merge_tensor("task_arithmetic", [t(2, 1, 0), t(1, 3, 1)], [1, 0.5], base, {"scale": 2.0})
    assert torch.allclose(out, t(3, 3, -1))
    # normalize: the weights become 2/3 and 1/3
    out = merge_tensor("task_arithmetic", [t(2, 1, 0), t(1, 3, 1)], [1, 0.5], base, {"normalize": True})
    assert torch.allclose(out, base + t(2 / 3, 2 / 3, -2 / 3))


TIES_DELTAS = [t(3, -1, 2, -4, 0.5), t(-2, -2, 1, 5, 0.1), t(1.5, 3, -3, -1, 0.2)]


def test_ties_hand_worked():
    # density 0.6 of 5 entries: each task vector keeps its 3 largest |delta|:
    #   (3, 0, 2, -4, 0), (-2, -2, 0, 5, 0), (1.5, 3, -3, 0, 0)
    # summed: (2.5, 1, -1, 1, 0) -> elected signs (+, +, -, +, +); the agreeing entries are averaged:
    #   (3 + 1.5) / 2, 3, -3, 5, and 0 where nothing was kept.
    base = t(1, 1, 1, 1, 1)
    models = [base + d for d in TIES_DELTAS]
    out = merge_tensor("ties", models, None, base, {"density": 0.6})
    assert torch.allclose(out, base + t(2.25, 3, -3, 5, 0))
    # Weights scale the deltas inside the mean (the sign is elected on the unweighted ones), as in peft.
    out = merge_tensor("ties", models, [1, 2, 1], base, {"density": 0.6, "scale": 0.5})
    assert torch.allclose(out, base + 0.5 * t(2.25, 3, -3, 10, 0))
    # Sign by count instead of size: entries 1, 2 and 3 have one + and one - each, and a tie goes to +,
    # so entry 2 now keeps the 2 of the first model instead of the -3 of the third.
    out = merge_tensor("ties", models, None, base, {"density": 0.6, "majority_sign": "frequency"})
    assert torch.allclose(out, base + t(2.25, 3, 2, 5, 0))


def test_breadcrumbs_drops_outliers_and_tiny_deltas():
    delta = t(0.1, -0.2, 0.3, -0.4, 0.5, -0.6, 0.7, -0.8, 0.9, -5.0)
    base = torch.zeros(10)
    # gamma 0.1 drops the 1 largest |delta| (-5.0); density 0.6 keeps the next 6; the 3 smallest go too.
    out = merge_tensor("breadcrumbs", [base + delta], None, base, {"density": 0.6, "gamma": 0.1})
    assert torch.allclose(out, t(0, 0, 0, -0.4, 0.5, -0.6, 0.7, -0.8, 0.9, 0))
    assert ops.magnitude_bounds(delta, 0.6, 0.1) == pytest.approx((0.4, 5.0))
    # Two models: masked task vectors, weighted and added (here 2 * (mask d) + 1 * (mask -d) = mask d).
    out = merge_tensor("breadcrumbs", [base + delta, base - delta], [2, 1], base, {"density": 0.6, "gamma": 0.1})
    assert torch.allclose(out, t(0, 0, 0, -0.4, 0.5, -0.6, 0.7, -0.8, 0.9, 0))
    # gamma 0: the top 60% by magnitude, as TIES' trim.
    out = merge_tensor("breadcrumbs", [base + delta], None, base, {"density": 0.6, "gamma": 0.0})
    assert torch.count_nonzero(out) == 6 and out[-1] == -5.0


def test_breadcrumbs_ties_elects_signs_on_the_masked_deltas():
    base = torch.zeros(4)
    d1, d2 = t(1, -2, 3, 100), t(-1.5, 2, 1, 100)  # the 100s are outliers (gamma drops one per model)
    out = merge_tensor("breadcrumbs_ties", [d1, d2], None, base, {"density": 0.75, "gamma": 0.25})
    # masked: (1, -2, 3, 0) and (-1.5, 2, 1, 0); sums (-0.5, 0, 4, 0) -> signs (-, +, +, +)
    assert torch.allclose(out, t(-1.5, 2, 2, 0))


def test_dare_keeps_or_rescales_each_delta_and_preserves_the_expected_value():
    base = t(1, -1, 0.5, 2, 0, 3, -2, 1)
    delta = t(0.4, -0.2, 1.0, 0.3, -0.7, 0.05, 0.6, -0.9)
    model = base + delta
    density = 0.3
    outs = torch.stack([merge_tensor("dare_linear", [model], None, base, {"density": density, "seed": s}, name="w")
                        for s in range(2000)])
    kept = outs - base
    # every entry is dropped (0) or kept and rescaled by 1/density
    assert torch.all(torch.isclose(kept, torch.zeros(())) | torch.isclose(kept, delta / density, rtol=1e-5))
    # expected value preserved: the mean over seeds is the delta (std of the mean: |d| sqrt((1-p)/p) / sqrt(2000))
    tolerance = 5 * delta.abs() * math.sqrt((1 - density) / density) / math.sqrt(2000)
    assert torch.all((kept.mean(0) - delta).abs() <= tolerance)
    assert abs(float((kept != 0).float().mean()) - density) < 0.02


def test_dare_is_seeded_per_seed_and_tensor_name():
    base, model = torch.zeros(1000), torch.randn(1000)
    opts = {"density": 0.5, "seed": 7}
    one = merge_tensor("dare_linear", [model], None, base, opts, name="layer.0.weight")
    assert torch.equal(one, merge_tensor("dare_linear", [model], None, base, opts, name="layer.0.weight"))
    assert not torch.equal(one, merge_tensor("dare_linear", [model], None, base, opts, name="layer.1.weight"))
    assert not torch.equal(one, merge_tensor("dare_linear", [model], None, base, {**opts, "seed": 8},
                                             name="layer.0.weight"))
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    merge_tensor("dare_ties", [model, -model], None, base, opts, name="x")
    assert torch.equal(torch.rand(1), before)  # the global RNG is left alone


def test_slerp_norm_and_angle():
    a, b = t(1, 0), t(0, 1)
    assert torch.allclose(merge_tensor("slerp", [a, b], options={"t": 0.5}), t(math.sqrt(0.5), math.sqrt(0.5)))
    torch.manual_seed(0)
    a, b = torch.randn(500), torch.randn(500)
    b = b / b.norm() * a.norm()  # equal norms: slerp stays on the sphere
    theta = torch.acos(torch.dot(a, b) / (a.norm() * b.norm()))
    for step in (0.0, 0.25, 0.5, 0.9, 1.0):
        out = merge_tensor("slerp", [a, b], options={"t": step, "epsilon": 1e-4})
        assert float(out.norm()) == pytest.approx(float(a.norm()), rel=1e-5)
        angle = torch.acos(torch.clamp(torch.dot(out, a) / (out.norm() * a.norm()), -1, 1))
        assert float(angle) == pytest.approx(step * float(theta), abs=1e-3)
    assert torch.allclose(merge_tensor("slerp", [a, b], options={"t": 0.0}), a, atol=1e-6)
    assert torch.allclose(merge_tensor("slerp", [a, b], options={"t": 1.0}), b, atol=1e-5)
    # Nearly colinear (and the zero vector): plain linear interpolation.
    assert torch.allclose(merge_tensor("slerp", [a, 2 * a], options={"t": 0.25}), 1.25 * a)
    assert ops.slerp_coefficients(1.0, 0.0, 2.0, 0.3, 1e-4) == (0.7, 0.3)


def test_greedy_soup_decision():
    # individual losses: model 1 is best, then 3, 2, 0; each joins only if the soup's loss falls strictly.
    table = {(1,): 0.5, (1, 3): 0.45, (1, 3, 2): 0.47, (1, 3, 0): 0.44}
    asked = []

    def score(members):
        asked.append(tuple(members))
        return table[tuple(members)]

    members, decisions = ops.greedy_soup([0.9, 0.5, 0.7, 0.6], score, log=lambda *a: None)
    assert members == [1, 3, 0]
    assert asked == [(1, 3), (1, 3, 2), (1, 3, 0)]  # in order of individual loss
    assert [(d["model"], d["kept"]) for d in decisions] == [(1, True), (3, True), (2, False), (0, True)]
    # An equal score is no improvement.
    members, _ = ops.greedy_soup([0.5, 0.6], lambda m: 0.5, log=lambda *a: None)
    assert members == [0]


# ---------------------------------------------------------------- the same as peft.utils.merge_utils


@pytest.fixture
def task_tensors():
    torch.manual_seed(0)
    base = torch.randn(48, 40)
    return base, [base + 0.1 * torch.randn(48, 40) for _ in range(3)], [0.5, 1.0, 0.7]


@pytest.mark.parametrize("density", [0.1, 0.35, 1.0])
def test_ties_equals_peft(task_tensors, density):
    base, models, weights = task_tensors
    deltas = [m - base for m in models]
    for sign in ("total", "frequency"):
        ours = merge_tensor("ties", models, weights, base, {"density": density, "majority_sign": sign})
        with pytest.warns(UserWarning) if density == 1 else _nothing():
            theirs = base + mu.ties(deltas, torch.tensor(weights), density, majority_sign_method=sign)
        assert torch.allclose(ours, theirs, atol=1e-6), (density, sign)


def test_task_arithmetic_and_dare_equal_peft(task_tensors):
    base, models, weights = task_tensors
    deltas, w = [m - base for m in models], torch.tensor(weights)
    ours = merge_tensor("task_arithmetic", models, weights, base, {"scale": 0.8})
    assert torch.allclose(ours, base + 0.8 * mu.task_arithmetic(deltas, w), atol=1e-6)
    for method, fn in (("dare_linear", mu.dare_linear), ("dare_ties", mu.dare_ties)):
        ours = merge_tensor(method, models, weights, base, {"density": 0.4, "seed": 5}, name="w")
        torch.manual_seed(ops.dare_seed(5, "w", 0))  # the masks of one block: the same draws peft makes
        assert torch.allclose(ours, base + fn(deltas, w, 0.4), atol=1e-6), method


def test_magnitude_trim_equals_peft_pruning(task_tensors):
    base, models, _ = task_tensors
    delta = models[0] - base
    for density in (0.01, 0.3, 0.77):
        kept = ops._mask(delta, ops.magnitude_bounds(delta, density))
        assert torch.equal(kept, mu.prune(delta, density, "magnitude"))


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# ---------------------------------------------------------------- whole models, streamed


def _save_model(path, seed: int, tie: bool = True, dtype=torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=tie)
    LlamaForCausalLM(config).to(dtype).save_pretrained(path)
    return path


def _load(path):
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {name: ops.WeightFiles(_save_model(root / name, seed), name) for name, seed in
            (("base", 0), ("a", 1), ("b", 2), ("c", 3))}


def test_merging_a_model_with_itself_returns_it(saved, tmp_path):
    a = saved["a"]
    expected = _load(a.dir)
    cases = [("linear", [a, a], None, {"normalize": True}), ("slerp", [a, a], None, {"t": 0.3, "epsilon": 1e-4}),
             ("ties", [a, a], a, {"density": 0.5, "scale": 1.0}), ("task_arithmetic", [a], saved["base"], {"scale": 1.0}),
             ("dare_ties", [a, a], a, {"density": 0.5, "seed": 0, "scale": 1.0}),
             ("breadcrumbs", [a, a], a, {"density": 0.9, "gamma": 0.01, "scale": 1.0})]
    for method, inputs, base, options in cases:
        out = tmp_path / f"{method}.safetensors"
        ops.merge_files(inputs, out, method, options, base=base)
        from safetensors.torch import load_file

        merged = load_file(str(out))
        assert merged.keys() == expected.keys()  # the tied head stays stored once (no lm_head.weight)
        for key, tensor in expected.items():
            assert torch.allclose(merged[key], tensor, atol=1e-6), (method, key)


@pytest.mark.parametrize("method,options", [
    ("linear", {"normalize": True}), ("task_arithmetic", {"scale": 0.7}), ("ties", {"density": 0.3}),
    ("breadcrumbs", {"density": 0.8, "gamma": 0.05}), ("breadcrumbs_ties", {"density": 0.8, "gamma": 0.05}),
    ("slerp", {"t": 0.4, "epsilon": 1e-4}), ("dare_linear", {"density": 0.5, "seed": 3})])
def test_streaming_in_blocks_equals_whole_tensor_math(saved, tmp_path, monkeypatch, method, options):
    inputs = [saved["a"], saved["b"]] + ([saved["c"]] if method != "slerp" else [])
    base = saved["base"] if method in ops.DELTA_METHODS else None
    weights = None if method == "slerp" else [0.6, 0.3, 0.1]
    if method != "dare_linear":  # DARE's masks are drawn per block: compare it at the default block size
        monkeypatch.setattr(ops, "BLOCK_ELEMENTS", 100)  # every matrix in many blocks of rows
    ops.merge_files(inputs, tmp_path / "m.safetensors", method, options, weights=weights, base=base)
    from safetensors.torch import load_file

    merged = load_file(str(tmp_path / "m.safetensors"))
    tensors = [_load(i.dir) for i in inputs]
    base_tensors = _load(base.dir) if base else None
    for key in merged:
        expected = merge_tensor(method, [x[key] for x in tensors], weights,
                                base_tensors[key] if base else None, options, name=key)
        assert torch.allclose(merged[key], expected, atol=1e-6), key


def test_dtypes_and_odd_shapes_round_trip_through_the_stream_writer(tmp_path):
    from safetensors.torch import load_file, save_file

    tensors = {"f32": torch.randn(3, 5), "bf16": torch.randn(7).to(torch.bfloat16), "f16": torch.randn(2, 3, 4).half(),
               "i64": torch.arange(6).reshape(2, 3), "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4),
               "flag": torch.tensor([True, False, True])}
    for name in ("x", "y"):
        save_file({k: (v + 1 if name == "y" and v.is_floating_point() else v) for k, v in tensors.items()},
                  str(tmp_path / f"{name}.safetensors"), metadata={"format": "pt"})
        (tmp_path / name).mkdir()
        (tmp_path / f"{name}.safetensors").rename(tmp_path / name / "model.safetensors")
    x, y = ops.WeightFiles(tmp_path / "x", "x"), ops.WeightFiles(tmp_path / "y", "y")
    ops.merge_files([x, y], tmp_path / "out.safetensors", "linear", {"normalize": True})
    out = load_file(str(tmp_path / "out.safetensors"))
    assert out.keys() == tensors.keys()
    for key, tensor in tensors.items():
        assert out[key].dtype == tensor.dtype and out[key].shape == tensor.shape, key
        expected = tensor.float() + 0.5 if tensor.is_floating_point() else tensor
        assert torch.allclose(out[key].float(), expected.float(), atol=1e-2), key


def test_bf16_inputs_are_merged_in_fp32_and_saved_as_bf16(tmp_path):
    a = ops.WeightFiles(_save_model(tmp_path / "a", 1, dtype=torch.bfloat16), "a")
    b = ops.WeightFiles(_save_model(tmp_path / "b", 2, dtype=torch.bfloat16), "b")
    ops.merge_files([a, b], tmp_path / "m.safetensors", "linear", {"normalize": True})
    ta, tb = _load(a.dir), _load(b.dir)
    from safetensors.torch import load_file

    merged = load_file(str(tmp_path / "m.safetensors"))
    for key in merged:
        assert merged[key].dtype == torch.bfloat16
        assert torch.equal(merged[key], ((ta[key].float() + tb[key].float()) / 2).to(torch.bfloat16)), key


def test_different_models_are_refused_naming_the_tensor(saved, tmp_path):
    untied = ops.WeightFiles(_save_model(tmp_path / "untied", 1, tie=False), "untied")
    with pytest.raises(ops.ModelError, match="untied has tensor lm_head.weight that a lacks.*tie_word_embeddings"):
        ops.merge_files([saved["a"], untied], tmp_path / "x.safetensors", "linear", {})
    from safetensors.torch import save_file

    tensors = _load(saved["b"].dir)
    tensors["model.norm.weight"] = torch.ones(33)
    (tmp_path / "odd").mkdir()
    save_file(tensors, str(tmp_path / "odd" / "model.safetensors"), metadata={"format": "pt"})
    odd = ops.WeightFiles(tmp_path / "odd", "odd")
    with pytest.raises(ops.ModelError, match=r"tensor model.norm.weight is \[33\] in odd but \[32\] in a"):
        ops.merge_files([saved["a"], odd], tmp_path / "x.safetensors", "linear", {})


# ---------------------------------------------------------------- the recipe's checks


def _recipe(**data):
    return validate({"models": ["a", "b"], **data}, "r.yaml", MergeRecipe)


@pytest.mark.parametrize("data,needle", [
    ({"method": "slerp", "models": ["a", "b", "c"]}, "slerp interpolates between exactly two models (got 3)"),
    ({"method": "ties", "base": "x", "options": {"density": 0}}, "options.density: Input should be greater than 0"),
    ({"method": "ties", "base": "x", "options": {"density": 1.5}}, "options.density: Input should be less than or equal to 1"),
    ({"method": "ties"}, "base: method ties merges task vectors"),
    ({"method": "linear", "base": "x"}, "base: method linear does not use a base"),
    ({"method": "tie", "base": "x"}, "unknown merge method 'tie' (did you mean 'ties'?)"),
    ({"models": [{"path": "a", "weight": 1}, "b"]}, "give a weight for every model or for none (1 of 2"),
    ({"method": "linear", "options": {"density": 0.5}}, "options.density: not used by method linear"),
    ({"method": "breadcrumbs", "base": "x", "options": {"density": 0.95, "gamma": 0.1}}, "density + gamma must be at most 1"),
    ({"method": "slerp", "models": [{"path": "a", "weight": 1}, {"path": "b", "weight": 1}]}, "slerp takes no weights"),
    ({"method": "ties", "base": "x", "sweep": {"weights": [[1, 2, 3]]}}, "sweep.weights.0: 3 weights for 2 models"),
    ({"method": "linear", "sweep": {"density": [0.5]}}, "sweep.density: method linear has no density"),
    ({"method": "greedy_soup", "eval": {"data": []}}, "greedy_soup decides by held-out loss"),
    ({"models": ["a"]}, "method linear needs at least 2 models (got 1)"),
    ({"options": {"densty": 0.5}}, "options.densty: unknown key (did you mean 'density'?)"),
])
def test_recipe_errors_are_one_line(data, needle):
    with pytest.raises(ConfigError) as err:
        _recipe(**data)
    assert needle in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_recipe_defaults_are_resolved_per_method():
    cfg = _recipe(method="ties", base="x")
    assert (cfg.options.density, cfg.options.scale, cfg.options.majority_sign, cfg.options.gamma) == (0.5, 1.0, "total", None)
    cfg = _recipe(method="breadcrumbs", base="x")
    assert (cfg.options.density, cfg.options.gamma, cfg.options.normalize) == (0.9, 0.01, False)
    cfg = _recipe()
    assert (cfg.method, cfg.options.normalize, cfg.eval.data, cfg.eval.select) == ("linear", True, None, "worst")
    assert validate(cfg.model_dump(mode="json"), "again", MergeRecipe) == cfg  # the resolved recipe validates again
