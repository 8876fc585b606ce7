"""Pruning math on small tensors: masks by hand (layer, global and row scope, exact counts, iterative
pruning keeps what was pruned), Wanda's |W|·‖x‖ by hand on a tiny model (padding excluded), masks on
disk, the sparsity report, the random ticket, the lottery's schedule, and the prune recipe's checks."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from tunelab.config import PruneRecipe, validate
from tunelab.errors import ConfigError, ModelError
from tunelab.ops import prune
from tunelab.stages.lottery import round_sparsity


def t(*rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def pruned(mask: torch.Tensor) -> int:
    return int((~mask).sum())


# ---------------------------------------------------------------- masks by hand


def test_layer_and_global_scope_differ_on_matrices_of_different_sizes():
    scores = {"small": t([1, 2], [3, 4]), "big": t([10, 20], [30, 40])}
    layer = prune.masks_from_scores(scores, 0.5, "layer")
    assert torch.equal(layer["small"], torch.tensor([[False, False], [True, True]]))
    assert torch.equal(layer["big"], torch.tensor([[False, False], [True, True]]))
    # One threshold over both: the 4 lowest of the 8 scores are the whole of `small`.
    glob = prune.masks_from_scores(scores, 0.5, "global")
    assert not glob["small"].any() and glob["big"].all()
    assert all(m.dtype == torch.bool and m.shape == scores[k].shape for k, m in {**layer, **glob}.items())


def test_global_scope_interleaves_matrices():
    scores = {"a": t(1, 5, 9), "b": t(2, 6, 7, 8), "c": t(3, 4)}
    glob = prune.masks_from_scores(scores, 0.45, "global")  # round(0.45 * 9) = 4: the scores 1, 2, 3, 4
    assert glob["a"].tolist() == [False, True, True]
    assert glob["b"].tolist() == [False, True, True, True]
    assert glob["c"].tolist() == [False, False]


def test_row_scope_prunes_each_output_row_alike():
    scores = {"w": t([1, 2, 3, 4], [40, 30, 20, 10])}
    assert prune.masks_from_scores(scores, 0.5, "layer")["w"].tolist() == [[False, False, False, False],
                                                                          [True, True, True, True]]
    assert prune.masks_from_scores(scores, 0.5, "row")["w"].tolist() == [[False, False, True, True],
                                                                        [True, True, False, False]]


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.25, 0.3, 0.5, 0.7, 0.9, 0.99])
@pytest.mark.parametrize("shape", [(7,), (4, 5), (3, 11), (64, 32)])
def test_exact_counts_in_every_scope(sparsity, shape):
    g = torch.Generator().manual_seed(len(shape) * 100 + shape[0])
    scores = {"a": torch.rand(shape, generator=g), "b": torch.rand((2, 13), generator=g)}
    n = {k: v.numel() for k, v in scores.items()}
    layer = prune.masks_from_scores(scores, sparsity, "layer")
    assert {k: pruned(m) for k, m in layer.items()} == {k: round(sparsity * n[k]) for k in scores}
    glob = prune.masks_from_scores(scores, sparsity, "global")
    assert sum(pruned(m) for m in glob.values()) == round(sparsity * sum(n.values()))
    row = prune.masks_from_scores(scores, sparsity, "row")
    for k, m in row.items():
        per_row = m.reshape(m.shape[0], -1)
        assert [pruned(r) for r in per_row] == [round(sparsity * per_row.shape[1])] * per_row.shape[0]
    # The pruned ones are the lowest: every kept score is at least every pruned score (per group).
    for k, m in layer.items():
        if m.any() and (~m).any():
            assert scores[k][m].min() >= scores[k][~m].max()


def test_counts_use_round_and_ties_go_to_the_earlier_index():
    assert pruned(prune.masks_from_scores({"w": torch.ones(7)}, 0.3, "layer")["w"]) == 2  # 2.1 -> 2
    assert pruned(prune.masks_from_scores({"w": torch.ones(7)}, 0.4, "layer")["w"]) == 3  # 2.8 -> 3
    # All scores equal: the earliest entries go first.
    assert prune.masks_from_scores({"w": torch.ones(5)}, 0.4, "layer")["w"].tolist() == [False, False, True, True, True]
    assert prune.masks_from_scores({"w": torch.ones(5)}, 0.0, "layer")["w"].all()


def test_previously_pruned_weights_stay_pruned_and_count_towards_the_sparsity():
    scores = {"w": t(5, 1, 4, 2, 3, 6)}
    previous = {"w": torch.tensor([False, True, True, True, True, True])}  # entry 0 (score 5) pruned before
    # 3 of 6 pruned in all: entry 0 (already), then the two lowest of the rest (1 and 2).
    mask = prune.masks_from_scores(scores, 0.5, "layer", previous)["w"]
    assert mask.tolist() == [False, False, True, False, True, True]
    # previous already prunes more than asked: nothing is revived, nothing more is pruned.
    previous = {"w": torch.tensor([False, True, False, True, False, True])}
    assert torch.equal(prune.masks_from_scores(scores, 0.2, "layer", previous)["w"], previous["w"])
    # Global: the previously pruned entry of `a` (score 9) stays pruned and is one of the 3 pruned.
    scores = {"a": t(9, 1, 8), "b": t(2, 7, 6)}
    previous = {"a": torch.tensor([False, True, True]), "b": torch.ones(3, dtype=torch.bool)}
    glob = prune.masks_from_scores(scores, 0.5, "global", previous)  # round(0.5 * 6) = 3: 9 (before), 1, 2
    assert glob["a"].tolist() == [False, False, True] and glob["b"].tolist() == [False, True, True]
    # Row: per row, the previously pruned count towards that row's share.
    scores = {"w": t([9, 1, 2, 3], [1, 2, 3, 4])}
    previous = {"w": torch.tensor([[False, True, True, True], [True, True, True, True]])}
    row = prune.masks_from_scores(scores, 0.5, "row", previous)["w"]
    assert row.tolist() == [[False, False, True, True], [False, False, True, True]]


def test_iterative_pruning_grows_the_pruned_set():
    g = torch.Generator().manual_seed(0)
    masks = None
    for sparsity in (0.2, 0.36, 0.488, 0.59):
        scores = {"w": torch.randn(10, 10, generator=g)}  # new scores every round (retrained weights)
        new = prune.masks_from_scores(scores, sparsity, "layer", masks)
        assert pruned(new["w"]) == round(sparsity * 100)
        if masks is not None:
            assert not (new["w"] & ~masks["w"]).any()  # pruned once, pruned for good
        masks = new


@pytest.mark.parametrize("sparsity", [1.0, -0.1, 1.5, float("nan")])
def test_sparsity_outside_0_1_is_a_config_error(sparsity):
    with pytest.raises(ConfigError, match=r"sparsity: .* is outside \[0, 1\)"):
        prune.masks_from_scores({"w": torch.ones(4)}, sparsity)


def test_unknown_scope_is_a_config_error():
    with pytest.raises(ConfigError, match="scope: 'rows' is not one of global, layer, row"):
        prune.masks_from_scores({"w": torch.ones(4)}, 0.5, "rows")


# ---------------------------------------------------------------- Wanda by hand


# TinyLM is no family of the architecture table: its matrices are chosen by name (every linear weight).
ANY_LINEAR = [r"weight$"]


class TinyLM(nn.Module):
    """Embedding -> blocks.0.proj (the one prunable Linear) -> head: Wanda reads proj's inputs, the embeddings."""

    def __init__(self, table: torch.Tensor, out_features: int = 2):
        super().__init__()
        self.embed = nn.Embedding.from_pretrained(table, freeze=False)
        self.blocks = nn.ModuleList([nn.Module()])
        self.blocks[0].proj = nn.Linear(table.shape[1], out_features, bias=False)
        self.head = nn.Linear(out_features, table.shape[0], bias=False)

    def get_output_embeddings(self):
        return self.head

    def forward(self, input_ids, attention_mask=None, use_cache=None, **kwargs):
        return self.head(self.blocks[0].proj(self.embed(input_ids)))


def test_wanda_is_weight_size_times_input_norm_without_padding():
    table = t([1, 0, 2], [0, 3, -1], [2, 2, 2], [100, 100, 100])  # token 3 is padding (masked out)
    model = TinyLM(table)
    with torch.no_grad():
        model.blocks[0].proj.weight.copy_(t([1, -2, 0.5], [-4, 0.25, 3]))
    params = prune.prunable_params(model, ANY_LINEAR)
    assert list(params) == ["blocks.0.proj.weight"]  # the head (output embedding) is not pruned

    batches = [{"input_ids": torch.tensor([[0, 1, 3, 3], [2, 0, 1, 3]]),
                "attention_mask": torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]]), "labels": torch.zeros(2, 4).long()},
               {"input_ids": torch.tensor([[2, 2]]), "attention_mask": torch.tensor([[1, 1]])}]
    # Non-padding tokens: 0, 1, 2, 0, 1, 2, 2 -> per input feature j the sum of squares:
    #   j=0: 1+0+4+1+0+4+4 = 14;  j=1: 0+9+4+0+9+4+4 = 30;  j=2: 4+1+4+4+1+4+4 = 22
    norms = prune.input_norms(model, params, batches)["blocks.0.proj.weight"]
    assert torch.allclose(norms, torch.tensor([14, 30, 22]).float().sqrt())
    scores = prune.wanda_scores(model, params, batches)["blocks.0.proj.weight"]
    expected = t([1 * math.sqrt(14), 2 * math.sqrt(30), 0.5 * math.sqrt(22)],
                 [4 * math.sqrt(14), 0.25 * math.sqrt(30), 3 * math.sqrt(22)])
    assert torch.allclose(scores, expected)
    # Per row at 1/3: row 0 loses 0.5·√22 ≈ 2.35, row 1 loses 0.25·√30 ≈ 1.37 (not the same column).
    mask = prune.masks_from_scores({"w": scores}, 1 / 3, "row")["w"]
    assert mask.tolist() == [[True, True, False], [True, False, True]]
    assert model.training  # the model's mode is restored after calibration


def test_wanda_changes_the_choice_when_inputs_are_small():
    table = t([0.01, 1, 1])  # a single token: feature 0 is tiny
    model = TinyLM(table, out_features=1)
    with torch.no_grad():
        model.blocks[0].proj.weight.copy_(t([3, 1, 2]))
    params = prune.prunable_params(model, ANY_LINEAR)
    batches = [{"input_ids": torch.zeros(1, 4, dtype=torch.long), "attention_mask": torch.ones(1, 4, dtype=torch.long)}]
    magnitude = prune.masks_from_scores(prune.magnitude_scores(params), 1 / 3, "row")["blocks.0.proj.weight"]
    wanda = prune.masks_from_scores(prune.wanda_scores(model, params, batches), 1 / 3, "row")["blocks.0.proj.weight"]
    assert magnitude.tolist() == [[True, False, True]]  # |W| = 3, 1, 2
    assert wanda.tolist() == [[False, True, True]]  # 3·0.02 = 0.06, 1·2, 2·2


def test_wanda_without_calibration_batches_is_a_config_error():
    model = TinyLM(t([1, 2]))
    with pytest.raises(ConfigError, match="calibration.data: wanda needs calibration text"):
        prune.wanda_scores(model, prune.prunable_params(model, ANY_LINEAR), [])


@pytest.fixture(scope="module")
def micro():
    """llama-micro with a 40-token vocabulary (no tokenizer: only ids are fed)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True, pad_token_id=0)
    return LlamaForCausalLM(config).eval()


def test_prunable_params_of_a_llama_are_the_blocks_linear_weights(micro):
    params = prune.prunable_params(micro)
    expected = [f"model.layers.{i}.{m}.weight" for i in range(2)
                for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                          "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    assert list(params) == expected
    named = dict(micro.named_parameters())
    assert all(params[k] is named[k] for k in expected)
    assert list(prune.prunable_params(micro, [r"mlp\.(up|down)_proj"])) == [
        "model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.down_proj.weight",
        "model.layers.1.mlp.up_proj.weight", "model.layers.1.mlp.down_proj.weight"]
    with pytest.raises(ModelError, match=r"targets \['nothing'\] match no linear weights"):
        prune.prunable_params(micro, ["nothing"])


def test_input_norms_of_a_llama_ignore_right_padding_and_add_up(micro):
    params = prune.prunable_params(micro)
    ids = torch.tensor([[5, 9, 3, 17, 22, 8]])
    plain = prune.input_norms(micro, params, [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}])
    padded = torch.cat([ids, torch.tensor([[30, 30, 30]])], 1)  # causal attention: the pads change no earlier token
    mask = torch.tensor([[1] * 6 + [0] * 3])
    with_pads = prune.input_norms(micro, params, [{"input_ids": padded, "attention_mask": mask}])
    twice = prune.input_norms(micro, params, [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}] * 2)
    unmasked = prune.input_norms(micro, params, [{"input_ids": padded}])
    for k in params:
        assert torch.allclose(with_pads[k], plain[k], rtol=1e-5, atol=1e-6), k
        assert torch.allclose(twice[k], plain[k] * math.sqrt(2), rtol=1e-5), k  # sums of squares add up
        assert (unmasked[k] > plain[k]).any(), k  # without the mask the pads would count
    # Independent check of one layer: the down projection's input is act(gate(h)) * up(h), recorded by a hook.
    seen = []
    handle = micro.model.layers[1].mlp.down_proj.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    with torch.no_grad():
        micro(input_ids=ids)
    handle.remove()
    expected = seen[0].double().reshape(-1, 64).pow(2).sum(0).sqrt().float()
    assert torch.allclose(plain["model.layers.1.mlp.down_proj.weight"], expected, rtol=1e-5)


# ---------------------------------------------------------------- masks on models and on disk


def test_apply_save_load_and_the_sparsity_report(micro, tmp_path):
    import copy

    model = copy.deepcopy(micro)
    params = prune.prunable_params(model)
    masks = prune.masks_from_scores(prune.magnitude_scores(params), 0.5, "layer")
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    prune.apply_masks(model, masks)
    after = dict(model.named_parameters())
    for k, p in after.items():
        if k in masks:
            assert torch.all(p[~masks[k]] == 0) and torch.equal(p[masks[k]], before[k][masks[k]]), k
        else:
            assert torch.equal(p, before[k]), k

    prune.save_masks(masks, tmp_path)
    from safetensors import safe_open

    with safe_open(str(tmp_path / prune.MASKS_FILE), "pt") as f:
        assert sorted(f.keys()) == sorted(masks) and all(f.get_tensor(k).dtype == torch.bool for k in f.keys())
    for loaded in (prune.load_masks(tmp_path), prune.load_masks(tmp_path / prune.MASKS_FILE)):
        assert loaded.keys() == masks.keys() and all(torch.equal(loaded[k], masks[k]) for k in masks)
    with pytest.raises(ModelError, match="no pruning masks here"):
        prune.load_masks(tmp_path / "elsewhere")

    report = prune.sparsity_report(model, masks)
    assert [r["name"] for r in report["matrices"]] == list(masks)
    for row in report["matrices"]:
        assert row["zeros"] == row["pruned"] == row["numel"] // 2 and row["sparsity"] == 0.5
        assert row["pruned_nonzero"] == 0
    total = sum(m.numel() for m in masks.values())
    assert (report["pruned_params"], report["pruned_zeros"], report["sparsity"]) == (total, total // 2, 0.5)
    assert report["model_params"] == sum(p.numel() for p in model.parameters())
    assert report["model_nonzero"] == sum(int((p != 0).sum()) for p in model.parameters())
    # Drift: a pruned weight that became non-zero shows in pruned_nonzero.
    name = next(iter(masks))
    with torch.no_grad():
        after[name][~masks[name]] = 1.0
    row = prune.sparsity_report(model, masks)["matrices"][0]
    assert row["pruned_nonzero"] == row["pruned"] and row["zeros"] == 0
    # Without masks the report covers the prunable matrices, counting zeros.
    assert [r["name"] for r in prune.sparsity_report(model)["matrices"]] == list(params)
    assert "whole model" in prune.render_sparsity(report)


def test_apply_masks_refuses_masks_of_another_model(micro):
    with pytest.raises(ModelError, match="masks: nope.weight is not a parameter of this model"):
        prune.apply_masks(micro, {"nope.weight": torch.ones(2, dtype=torch.bool)})
    with pytest.raises(ModelError, match=r"has shape \(2, 2\) but the model's is \(32, 32\)"):
        prune.apply_masks(micro, {"model.layers.0.self_attn.q_proj.weight": torch.ones(2, 2, dtype=torch.bool)})


def test_random_ticket_keeps_the_counts_and_moves_the_positions():
    g = torch.Generator().manual_seed(1)
    masks = prune.masks_from_scores({"a": torch.rand(8, 8, generator=g), "b": torch.rand(16, 4, generator=g)},
                                    0.7, "global")
    rand = prune.random_masks_like(masks, seed=3)
    assert {k: pruned(m) for k, m in rand.items()} == {k: pruned(m) for k, m in masks.items()}
    assert all(rand[k].shape == masks[k].shape and not torch.equal(rand[k], masks[k]) for k in masks)
    again = prune.random_masks_like(masks, seed=3)
    assert all(torch.equal(again[k], rand[k]) for k in masks)  # seeded
    other = prune.random_masks_like(masks, seed=4)
    assert any(not torch.equal(other[k], rand[k]) for k in masks)


# ---------------------------------------------------------------- the lottery's schedule and the recipe


def test_round_sparsity_prunes_the_same_share_of_what_remains():
    assert round_sparsity(0.8, 0, 3) == 0
    assert round_sparsity(0.8, 3, 3) == pytest.approx(0.8)
    assert round_sparsity(0.75, 1, 2) == pytest.approx(0.5)
    remaining = [1 - round_sparsity(0.8, r, 3) for r in range(4)]
    rates = [remaining[r + 1] / remaining[r] for r in range(3)]
    assert rates == pytest.approx([0.2 ** (1 / 3)] * 3)
    assert 1 - rates[0] == pytest.approx(0.415, abs=1e-3)  # the lottery recipe's "41.5% each round"


def recipe(**fields) -> PruneRecipe:
    return validate({"kind": "prune", **fields}, "r.yaml", PruneRecipe)


def test_prune_recipe_defaults_and_checks():
    assert recipe(model="m", sparsity=0.5).scope == "layer"
    assert recipe(model="m", method="wanda", sparsity=0.5).scope == "row"
    assert recipe(model="m", method="ffn", count=2).sparsity is None
    lottery = recipe(method="imp", sparsity=0.8, lottery={"train": "quickstart", "rewind": "step-20"})
    assert (lottery.lottery.rounds, lottery.lottery.rewind, lottery.scope) == (3, "step-20", "layer")
    bad = [
        ({"model": "m", "sparsity": 1.0}, "sparsity: 1.0 is outside [0, 1)"),
        ({"model": "m", "sparsity": -0.1}, "outside [0, 1)"),
        ({"model": "m", "method": "magnitud", "sparsity": 0.5}, "did you mean 'magnitude'"),
        ({"model": "m"}, "sparsity: method magnitude needs the share"),
        ({"model": "m", "sparsity": 0.5, "count": 2}, "count: method magnitude prunes single weights"),
        ({"model": "m", "method": "ffn", "sparsity": 0.5, "count": 2}, "give exactly one"),
        ({"model": "m", "method": "ffn"}, "give exactly one"),
        ({"model": "m", "method": "heads", "count": 1, "scope": "layer"}, "removes whole units"),
        ({"model": "m", "method": "wanda", "sparsity": 0.5, "scope": "global"}, "prunes per row or layer"),
        ({"model": "m", "sparsity": 0.5, "scope": "row"}, "prunes per layer or global"),
        ({"model": "m", "sparsity": 0.5, "criterion": "loss"}, "criterion: method magnitude has its own"),
        ({"model": "m", "method": "imp", "sparsity": 0.5}, "lottery: method imp needs lottery.train"),
        ({"method": "imp", "model": "m", "sparsity": 0.5, "lottery": {"train": "x"}}, "method imp trains its own"),
        ({"model": "m", "sparsity": 0.5, "lottery": {"train": "x"}}, "only method imp uses it"),
        ({"sparsity": 0.5}, "model: give the model to prune"),
        ({"method": "imp", "sparsity": 0.5, "lottery": {"train": "x", "rewind": "step-0"}}, "give init or step-K"),
        ({"method": "imp", "sparsity": 0.5, "lottery": {"train": "x", "rounds": 0}}, "rounds"),
    ]
    for fields, needle in bad:
        with pytest.raises(ConfigError) as err:
            recipe(**fields)
        assert needle in str(err.value) and "\n" not in str(err.value).strip(), (fields, str(err.value))


def test_prunable_params_of_every_family_are_its_blocks_projections():
    from families import CAUSAL, MASKED, tiny_model

    from tunelab.arch import arch_of

    for family in CAUSAL + MASKED:
        model = tiny_model(family)
        spec = arch_of(model, "test")
        assert list(prune.prunable_params(model)) == [
            n for n, _ in model.named_parameters()
            if any(n == f"{spec.blocks}.{i}.{p}.weight" for i in range(2) for p in spec.projections)], family
    gpt2 = tiny_model("gpt2")  # Conv1D projections: magnitude prunes them, Wanda refuses in one line
    params = prune.prunable_params(gpt2)
    assert list(params)[:4] == [f"transformer.h.0.{m}.weight" for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc",
                                                                          "mlp.c_proj")]
    masks = prune.masks_from_scores(prune.magnitude_scores(params), 0.5, "global")
    assert sum(int((~m).sum()) for m in masks.values()) == round(0.5 * sum(p.numel() for p in params.values()))
    batch = {"input_ids": torch.tensor([[3, 4, 5]])}
    with pytest.raises(ModelError, match=r"^wanda: gpt2 stores its projections transposed .*use method magnitude$"):
        prune.wanda_scores(gpt2, params, [batch])


def test_prunable_params_of_an_unknown_family_asks_for_targets():
    model = TinyLM(t([1, 2]))
    model.config = SimpleNamespace(model_type="falcon")
    with pytest.raises(ModelError, match=r"^prune \(default targets; or give targets, regexes over weight names\): "
                                         r"model family 'falcon' is not in tunelab's architecture table"):
        prune.prunable_params(model)
    assert list(prune.prunable_params(model, ANY_LINEAR)) == ["blocks.0.proj.weight"]


def test_select_global_matches_a_stable_sort():
    g = torch.Generator().manual_seed(0)
    scores = {"a": torch.randint(0, 5, (6, 7), generator=g).float(), "b": torch.randint(0, 5, (9,), generator=g).float()}
    flat = torch.cat([scores["a"].reshape(-1), scores["b"]])
    for n in (0, 1, 17, 50, 51):
        chosen = prune.select_global(scores, n)
        expected = torch.zeros(51, dtype=torch.bool)
        expected[torch.argsort(flat, stable=True)[:n]] = True  # ties: the earlier entry first
        assert torch.equal(torch.cat([chosen["a"].reshape(-1), chosen["b"]]), expected), n
        top = prune.select_global(scores, n, largest=True)
        expected = torch.zeros(51, dtype=torch.bool)
        expected[torch.argsort(-flat, stable=True)[:n]] = True
        assert torch.equal(torch.cat([top["a"].reshape(-1), top["b"]]), expected), n
