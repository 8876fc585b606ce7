"""Structured pruning (tunelab/ops/structured.py): the shrunk model computes what the big model computes with
the removed heads / neurons zeroed or the removed layers skipped, saves and reloads with plain transformers,
and has the parameter count worked out by hand here."""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import pytest
import torch
from families import CAUSAL, MASKED, tiny_model

from tunelab import models
from tunelab.arch import SHRINKS, arch_of
from tunelab.errors import ConfigError, ModelError
from tunelab.ops.structured import shrink

VOCAB = 64


class _Tokenizer:  # what build_model reads from a tokenizer
    eos_token_id = 1
    pad_token_id = 0

    def __len__(self):
        return VOCAB


def _perturb(model, seed: int):
    """Non-default norms and biases and distinct weights, so no score ties and every slice matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return model.eval()


def _build(family: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    if family in ("llama", "bert"):
        preset = "llama-tiny" if family == "llama" else "bert-tiny"
        model = models.build_model(preset, _Tokenizer(), overrides)
    else:
        import transformers

        fields = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=40, num_hidden_layers=3,
                      num_attention_heads=6, pad_token_id=0, **overrides)
        if family == "roberta":
            config = transformers.RobertaConfig(max_position_embeddings=40, **fields)
            model = transformers.RobertaForMaskedLM(config)
        else:
            config_cls = transformers.MistralConfig if family == "mistral" else transformers.Qwen2Config
            fields.setdefault("num_key_value_heads", fields["num_attention_heads"])
            config = config_cls(**fields, **({"sliding_window": None} if family == "mistral" else {}))
            config._attn_implementation = "sdpa"
            model = (transformers.MistralForCausalLM if family == "mistral" else transformers.Qwen2ForCausalLM)(config)
    return _perturb(model, seed + 1)


def _inputs(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (2, 12), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # a padded row: the attention mask must still line up after pruning
    return {"input_ids": ids, "attention_mask": mask}


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def _is_encoder(model):
    return arch_of(model, "test").kind == "masked"


def _layers(model):
    return arch_of(model, "test").block_list(model)


def _zero_columns(linear, columns):
    """Zero the layer's inputs `columns` (GPT-2's Conv1D stores its weight transposed: rows)."""
    with torch.no_grad():
        if type(linear).__name__ == "Conv1D":
            linear.weight[columns] = 0
        else:
            linear.weight[:, columns] = 0


def _masked(big, report):
    """The big model with the report's units zeroed (heads, ffn) or skipped (layers)."""
    masked = copy.deepcopy(big)
    layers = _layers(masked)
    if report["what"] == "layers":
        for i in report["layers"]["removed"]:
            layers[i].register_forward_hook(
                lambda mod, args, kwargs, out: args[0] if args else kwargs["hidden_states"], with_kwargs=True)
        return masked
    spec = arch_of(masked, "test")
    for layer, entry in zip(layers, report["layers"]):
        if report["what"] == "ffn":
            _zero_columns(layer.get_submodule(spec.ffn_out), entry["removed"])
        else:
            d = layer.get_submodule(spec.attention).head_dim
            _zero_columns(layer.get_submodule(spec.attn_out), [h * d + j for h in entry["removed"] for j in range(d)])
    return masked


def _check_equal_and_reload(big, small, report, tmp_path):
    batch = _inputs()
    expected = _logits(_masked(big, report), batch)
    got = _logits(small, batch)
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5), (got - expected).abs().max()
    small.save_pretrained(tmp_path)
    import transformers

    auto = transformers.AutoModelForMaskedLM if _is_encoder(small) else transformers.AutoModelForCausalLM
    reloaded = auto.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert torch.equal(_logits(reloaded, batch), got)
    assert models.count_params(reloaded) == report["params_after"] == models.count_params(small)
    json.dumps(report)  # JSON-able
    return reloaded


# ---------------------------------------------------------------- each part, each family


def test_heads_llama_mha(tmp_path):
    big = _build("llama")  # llama-tiny: hidden 128, 4 heads of 32, 2 layers
    small = copy.deepcopy(big)
    report = shrink(small, "heads", fraction=0.5)
    assert report["unit"] == "head" and report["removed_per_layer"] == 2
    for entry in report["layers"]:
        assert len(entry["kept"]) == 2 and sorted(entry["kept"] + entry["removed"]) == [0, 1, 2, 3]
        assert entry["kept_kv"] == entry["kept"]
    # q, k, v lose 2 heads x 32 rows x 128, o_proj the same in columns, in both layers
    assert report["params_before"] - report["params_after"] == 2 * 4 * (2 * 32 * 128)
    assert report["config_changes"] == {"num_attention_heads": [4, 2], "num_key_value_heads": [4, 2]}
    reloaded = _check_equal_and_reload(big, small, report, tmp_path)
    assert reloaded.config.head_dim == 32 and reloaded.config.num_attention_heads == 2


def test_heads_gqa_removes_whole_kv_groups(tmp_path):
    big = _build("llama", num_attention_heads=4, num_key_value_heads=2)  # 2 query heads per KV head
    small = copy.deepcopy(big)
    report = shrink(small, "heads", count=2)
    assert report["unit"] == "kv_group" and report["removed_per_layer"] == 2
    for entry in report["layers"]:
        (kv,) = entry["removed_kv"]
        assert entry["removed"] == [2 * kv, 2 * kv + 1]
    # q and o lose 2 heads x 32 x 128; k and v one KV head x 32 x 128; 2 layers
    assert report["params_before"] - report["params_after"] == 2 * (2 * 2 * 32 * 128 + 2 * 32 * 128)
    assert report["config_changes"] == {"num_attention_heads": [4, 2], "num_key_value_heads": [2, 1]}
    _check_equal_and_reload(big, small, report, tmp_path)
    with pytest.raises(ConfigError, match="count: 1 heads per layer is not a whole number of KV groups.*multiple of 2"):
        shrink(copy.deepcopy(big), "heads", count=1)


def test_heads_qwen2_biases_and_head_dim_written(tmp_path):
    # hidden 48, 6 heads of 8 with q/k/v biases: 5 heads no longer divide 48, so head_dim must be in the config
    big = _build("qwen2")
    small = copy.deepcopy(big)
    report = shrink(small, "heads", count=1)
    assert report["config_changes"]["head_dim"] == [None, 8]
    # q, k, v lose 8 rows x (48 + 1 bias), o_proj 8 columns x 48; 3 layers
    assert report["params_before"] - report["params_after"] == 3 * (3 * 8 * 49 + 8 * 48)
    _check_equal_and_reload(big, small, report, tmp_path)


def test_heads_mistral(tmp_path):
    big = _build("mistral", num_key_value_heads=3)  # 6 heads, 3 KV heads
    small = copy.deepcopy(big)
    report = shrink(small, "heads", fraction=0.34)  # 0.34 x 3 groups -> 1 group = 2 heads
    assert report["removed_per_layer"] == 2
    _check_equal_and_reload(big, small, report, tmp_path)


@pytest.mark.parametrize("family", ["llama", "qwen2", "bert", "roberta"])  # mistral: test_heads_mistral
def test_ffn(family, tmp_path):
    big = _build(family)
    small = copy.deepcopy(big)
    n = big.config.intermediate_size
    report = shrink(small, "ffn", fraction=0.25)
    removed = int(n * 0.25 + 0.5)
    assert report["removed_per_layer"] == removed and report["config_changes"] == {"intermediate_size": [n, n - removed]}
    h, n_layers = big.config.hidden_size, big.config.num_hidden_layers
    # llama-like: gate and up rows, down columns (no MLP biases); BERT-like: intermediate rows + bias, output columns
    per_neuron = 3 * h if family in ("llama", "mistral", "qwen2") else 2 * h + 1
    assert report["params_before"] - report["params_after"] == n_layers * removed * per_neuron
    _check_equal_and_reload(big, small, report, tmp_path)


def _layer_params(model, family):
    c = model.config
    h, i = c.hidden_size, c.intermediate_size
    if family in ("bert", "roberta"):  # q, k, v, o with biases, two LayerNorms, intermediate and output
        return 4 * (h * h + h) + 2 * 2 * h + (h * i + i) + (i * h + h)
    d = c.head_dim if getattr(c, "head_dim", None) else h // c.num_attention_heads
    kv = c.num_key_value_heads * d
    bias = (c.num_attention_heads * d + 2 * kv) if family == "qwen2" else 0
    return 2 * h * c.num_attention_heads * d + 2 * h * kv + bias + 3 * h * i + 2 * h


@pytest.mark.parametrize("family", ["llama", "qwen2", "bert", "roberta"])  # mistral: test_heads_mistral
def test_layers(family, tmp_path):
    big = _build(family)
    small = copy.deepcopy(big)
    n = big.config.num_hidden_layers
    report = shrink(small, "layers", count=1)
    assert len(report["layers"]["removed"]) == 1 and len(report["layers"]["scores"]) == n
    assert report["config_changes"]["num_hidden_layers"] == [n, n - 1]
    assert report["params_before"] - report["params_after"] == _layer_params(big, family)
    if family == "qwen2":
        assert report["config_changes"]["layer_types"] == [["full_attention"] * n, ["full_attention"] * (n - 1)]
    reloaded = _check_equal_and_reload(big, small, report, tmp_path)
    assert len(_layers(reloaded)) == n - 1


def test_layers_generate_uses_the_renumbered_cache():
    big = _build("llama", num_hidden_layers=3)
    small = copy.deepcopy(big)
    with torch.no_grad():  # layer 0 writes nothing: it goes, and layers 1, 2 become 0, 1
        for lin in (small.model.layers[0].self_attn.o_proj, small.model.layers[0].mlp.down_proj):
            lin.weight.zero_()
    report = shrink(small, "layers", count=1)
    assert report["layers"]["kept"] == [1, 2] and report["layers"]["removed"] == [0]
    assert [layer.self_attn.layer_idx for layer in small.model.layers] == [0, 1]
    ids = _inputs()["input_ids"][:1]
    gen = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    cached = small.generate(ids, **gen)
    uncached = small.generate(ids, use_cache=False, **gen)
    assert torch.equal(cached, uncached) and cached.shape[1] == ids.shape[1] + 8


# ---------------------------------------------------------------- the loss criterion


def _self_labelled(model, seed=0):
    """Calibration batches labelled with the model's own greedy predictions (a causal LM shifts labels
    itself), so any real change to the function raises the loss."""
    batches = []
    for s in range(2):
        batch = _inputs(seed + s)
        pred = _logits(model, batch).argmax(-1)
        labels = torch.cat([batch["input_ids"][:, :1], pred[:, :-1]], 1)
        batches.append({**batch, "labels": labels.masked_fill(batch["attention_mask"] == 0, -100)})
    return batches


def test_loss_criterion_ffn_picks_a_dead_neuron_that_magnitude_keeps():
    model = _build("llama", seed=3)
    with torch.no_grad():  # neuron 7 (layer 0) and 11 (layer 1): silu(0) = 0, so they never fire, but are big
        for layer, j in zip(model.model.layers, (7, 11)):
            layer.mlp.gate_proj.weight[j] = 0
            layer.mlp.up_proj.weight[j] *= 20
            layer.mlp.down_proj.weight[:, j] *= 20
    batches = _self_labelled(model)
    by_magnitude = shrink(copy.deepcopy(model), "ffn", count=1)
    assert [e["removed"] for e in by_magnitude["layers"]] != [[7], [11]]
    small = copy.deepcopy(model)
    report = shrink(small, "ffn", count=1, criterion="loss", batches=batches)
    assert [e["removed"] for e in report["layers"]] == [[7], [11]]
    batch = _inputs()
    assert torch.allclose(_logits(small, batch), _logits(model, batch), atol=1e-5)


def test_loss_criterion_heads_picks_a_head_that_reads_nothing():
    model = _build("llama", seed=4)
    d = 32
    with torch.no_grad():  # head 1 of layer 0 and head 2 of layer 1: zero values, but a big o_proj
        for layer, h in zip(model.model.layers, (1, 2)):
            layer.self_attn.v_proj.weight[h * d:(h + 1) * d] = 0
            layer.self_attn.o_proj.weight[:, h * d:(h + 1) * d] *= 20
    report = shrink(copy.deepcopy(model), "heads", count=2, criterion="loss", batches=_self_labelled(model))
    assert all(h in e["removed"] for e, h in zip(report["layers"], (1, 2)))


def test_loss_criterion_layers_removes_an_identity_layer_first():
    model = _build("llama", seed=5, num_hidden_layers=3)
    layer = model.model.layers[1]
    with torch.no_grad():  # normalised input zero: the layer adds nothing, yet its output projections are big
        layer.input_layernorm.weight.zero_()
        layer.post_attention_layernorm.weight.zero_()
        layer.self_attn.o_proj.weight.mul_(20)
        layer.mlp.down_proj.weight.mul_(20)
    by_magnitude = shrink(copy.deepcopy(model), "layers", count=1)
    assert by_magnitude["layers"]["removed"] != [1]
    small = copy.deepcopy(model)
    report = shrink(small, "layers", count=1, criterion="loss", batches=_self_labelled(model))
    scores = report["layers"]["scores"]
    assert report["layers"]["removed"] == [1] and scores[1] == 0 and min(scores[0], scores[2]) > 0
    batch = _inputs()
    assert torch.allclose(_logits(small, batch), _logits(model, batch), atol=1e-5)


def test_bert_loss_criterion_ffn():
    model = _build("bert", seed=6)
    with torch.no_grad():
        model.bert.encoder.layer[0].output.dense.weight[:, 5] = 0
        model.bert.encoder.layer[1].output.dense.weight[:, 9] = 0
    batch = _inputs()
    labels = batch["input_ids"].masked_fill(torch.rand(batch["input_ids"].shape) < 0.5, -100)
    report = shrink(copy.deepcopy(model), "ffn", count=1, criterion="loss", batches=[{**batch, "labels": labels}])
    assert [e["removed"] for e in report["layers"]] == [[5], [9]]


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(what="layers", count=5), ConfigError, r"^count: cannot remove 5 layers from a model with 2 layers; give at most 1$"),
    (dict(what="layers", count=2), ConfigError, "count: cannot remove 2 layers"),
    (dict(what="layers", fraction=0.9), ConfigError, r"fraction: 0.9 of 2 layers rounds to 2, removing them all; give a fraction below 0.75"),
    (dict(what="ffn", fraction=1.0), ConfigError, r"fraction: 1.0 is outside \[0, 1\)"),
    (dict(what="ffn", fraction=-0.1), ConfigError, "fraction: -0.1 is outside"),
    (dict(what="ffn", count=-1), ConfigError, "count: -1 is not a whole number"),
    (dict(what="ffn", count=1.5), ConfigError, "count: 1.5 is not a whole number"),
    (dict(what="ffn", count=352), ConfigError, "count: cannot remove 352 neurons from a model with 352 neurons per layer"),
    (dict(what="heads", count=4), ConfigError, "count: cannot remove 4 heads from a model with 4 heads per layer; give at most 3"),
    (dict(what="ffn", count=1, fraction=0.5), ConfigError, "give exactly one of them"),
    (dict(what="ffn"), ConfigError, "give exactly one of them"),
    (dict(what="blocks", count=1), ConfigError, "what: 'blocks' is not a prunable part; choose one of heads, ffn, layers"),
    (dict(what="ffn", count=1, criterion="random"), ConfigError, "criterion: 'random' is unknown"),
    (dict(what="ffn", count=1, criterion="loss"), ConfigError, "criterion: loss needs calibration batches"),
    (dict(what="heads", count=1), ModelError, r"heads: LlamaConfig needs hidden_size \(128\) divisible by "
                                              r"num_attention_heads.*leaves 3; counts that fit: 2, 3$"),
])
def test_bad_input_is_one_line_and_changes_nothing(kwargs, error, message):
    model = _build("llama")
    before = models.weights_sha256(model)
    with pytest.raises(error, match=message) as info:
        shrink(model, **kwargs)
    assert "\n" not in str(info.value)
    assert models.weights_sha256(model) == before and model.config.num_attention_heads == 4


@pytest.mark.parametrize("family", CAUSAL + MASKED)
def test_every_family_shrinks_as_the_table_allows(family, tmp_path):
    """Each part the table allows: one unit (a KV group of heads) removed per layer computes what the big model
    computes with it zeroed / skipped, and reloads; each part it refuses: one line naming the family."""
    big = _perturb(tiny_model(family), 1)
    spec = arch_of(big, "test")
    for what in SHRINKS:
        small = copy.deepcopy(big)
        if what not in spec.shrinks():
            with pytest.raises(ModelError, match=rf"^{what}: cannot remove {what} from {family}: [^\n]*instead$"):
                shrink(small, what, count=1)
            continue
        report = shrink(small, what, count=2 if what == "heads" else 1)  # heads: one KV group of 2 query heads
        assert report["params_after"] < report["params_before"]
        _check_equal_and_reload(big, small, report, tmp_path / what)


def test_gpt2_scaling_attention_by_layer_index_keeps_its_layers():
    model = tiny_model("gpt2", scale_attn_by_inverse_layer_idx=True)
    with pytest.raises(ModelError, match=r"^layers: this gpt2 scales attention by 1 / \(layer index \+ 1\)"):
        shrink(model, "layers", count=1)
    assert len(model.transformer.h) == 2


def test_unsupported_models():
    with pytest.raises(ModelError, match=r"structured pruning \(ffn\): model family 'falcon' is not in tunelab's "
                                         "architecture table"):
        shrink(SimpleNamespace(config=SimpleNamespace(model_type="falcon")), "ffn", count=1)
    with pytest.raises(ModelError, match="heads: cannot remove heads from bert.*prune ffn or layers instead"):
        shrink(_build("bert"), "heads", count=1)


def test_nothing_removed_is_a_no_op():
    model = _build("llama")
    before = models.weights_sha256(model)
    report = shrink(model, "ffn", fraction=0.0)
    assert report["removed_per_layer"] == 0 and report["config_changes"] == {}
    assert report["params_after"] == report["params_before"] and models.weights_sha256(model) == before
