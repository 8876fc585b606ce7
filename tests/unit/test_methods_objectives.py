"""Methods registry, BitFit/full selection, optimizer param groups, and CLM/MLM labels."""

from __future__ import annotations

import math
import random
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from tunelab.config import TrainConfig
from tunelab.errors import ConfigError
from tunelab.methods import METHODS, create_method, method_class
from tunelab.methods.base import Method, MethodContext
from tunelab.objectives import OBJECTIVES, create_objective, objective_class
from tunelab.models import build_model
from tunelab.tokenizers import train_tokenizer
from tunelab.train.objectives import add_labels, count_targets, fixed_mlm_labeler, sequence_seed
from tunelab.train.optim import build_optimizer, param_groups

_WORDS = "the model data token train loss step layer weight value cache file text domain batch".split()


@pytest.fixture(scope="module")
def tokenizer():
    rng = random.Random(0)
    texts = [" ".join(rng.choice(_WORDS) for _ in range(60)) + "." for _ in range(80)]
    return train_tokenizer(texts, vocab_size=300)


@pytest.fixture
def llama(tokenizer):
    torch.manual_seed(0)
    return build_model("llama-micro", tokenizer)


@pytest.fixture
def bert(tokenizer):
    torch.manual_seed(0)
    return build_model("bert-tiny", tokenizer)


def norm_weights_and_biases(model, include_norms: bool = True) -> set[int]:
    """Independently: every `.bias` parameter, plus the weight of every normalisation module."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    ids = set()
    for module in model.modules():
        bias = getattr(module, "bias", None)
        if isinstance(bias, nn.Parameter):
            ids.add(id(bias))
        if include_norms and isinstance(module, (nn.LayerNorm, LlamaRMSNorm)):
            ids.add(id(module.weight))
    # A bias that is not a module attribute (BERT's MLM head keeps `cls.predictions.bias`).
    for name, p in model.named_parameters():
        if name.rsplit(".", 1)[-1] == "bias":
            ids.add(id(p))
    return ids


def trainable_ids(model) -> set[int]:
    return {id(p) for p in model.parameters() if p.requires_grad}


def ctx(model_path=None) -> MethodContext:
    recipe = SimpleNamespace(model=SimpleNamespace(path=model_path))
    return MethodContext(device=torch.device("cpu"), dist=None, recipe=recipe, tokenizer=None, max_steps=10, seed=0)


# ---------------------------------------------------------------- registry


# Methods with a required option (no sensible default): the least that creates them.
REQUIRED_OPTIONS = {"trainable_tokens": {"tokens": [0]}, "peft": {"type": "hra"}}


def test_registry():
    assert {"full", "bitfit", "lora"} <= set(METHODS)
    for name, target in METHODS.items():
        # Entries are "module:Class" strings (naming a method imports nothing); method_class imports one.
        assert isinstance(target, str) and target.count(":") == 1, target
        cls = method_class(name)
        assert issubclass(cls, Method) and cls.name == name
        method = create_method(name, REQUIRED_OPTIONS.get(name, {}))
        assert isinstance(method, cls)
        for hook in ("prepare", "aux_models", "batch_source", "select_trainable", "trainable_params",
                     "train_step", "after_backward", "after_step", "state_dict", "load_state_dict", "tensor_state",
                     "load_tensor_state", "weights_to_save", "load_weights", "save_final"):
            assert callable(getattr(method, hook)), (name, hook)
    for name in OBJECTIVES:  # the other axis: every objective has the loss and the hooks the loop calls
        objective = create_objective(name, {})
        assert isinstance(objective, objective_class(name)) and objective.name == name
        for hook in ("prepare", "aux_models", "batch_source", "loss", "after_step", "metrics", "refusal"):
            assert callable(getattr(objective, hook)), (name, hook)


def test_unknown_method_is_a_config_error_with_hint():
    with pytest.raises(ConfigError) as err:
        method_class("lroa")
    assert "did you mean 'lora'" in str(err.value) and "\n" not in str(err.value)


def test_base_method_defaults(llama):
    m = Method()
    assert m.uses_backward and m.aux_models() == {} and m.tensor_state() == {} and m.state_dict() == {}
    assert m.select_trainable(llama, 0) is False and m.weights_to_save(llama) is None
    default = object()
    assert m.batch_source(default, ctx()) is default
    assert m.prepare(llama, ctx()) is llama
    with pytest.raises(NotImplementedError):
        m.train_step(llama, [], 0, 1e-3)


# ---------------------------------------------------------------- bitfit


def test_bitfit_llama_trains_exactly_the_norm_gains(llama):
    method = create_method("bitfit", {})
    model = method.prepare(llama, ctx())
    expected = norm_weights_and_biases(model)
    # llama-micro: 2 layers x 2 RMSNorms + the final norm, no biases.
    assert len(expected) == 2 * 2 + 1
    assert trainable_ids(model) == expected
    names = [n for n, _ in method.trainable_params(model)]
    assert len(names) == 5 and all(n.endswith("norm.weight") for n in names)
    assert sum(p.numel() for _, p in method.trainable_params(model)) == 5 * 32


def test_bitfit_bert_trains_exactly_biases_and_layernorms(bert):
    model = create_method("bitfit", {"include_norms": True}).prepare(bert, ctx())
    expected = norm_weights_and_biases(model)
    # Counted by hand for bert-tiny (2 layers): LayerNorms: embeddings 1 + 2 per layer x 2 + MLM head 1 = 6;
    # biases: 6 Linear per layer x 2 + 6 LayerNorm + head dense 1 + vocab bias 1 = 20.
    assert len(expected) == 6 + 20
    assert trainable_ids(model) == expected


def test_bitfit_bert_without_norms_trains_only_biases(bert):
    model = create_method("bitfit", {"include_norms": False}).prepare(bert, ctx())
    assert trainable_ids(model) == norm_weights_and_biases(model, include_norms=False)
    assert all(n.endswith("bias") for n, p in model.named_parameters() if p.requires_grad)


def test_bitfit_without_norms_on_llama_is_a_config_error(llama):
    with pytest.raises(ConfigError) as err:
        create_method("bitfit", {"include_norms": False}).prepare(llama, ctx())
    msg = str(err.value)
    assert "\n" not in msg and "include_norms" in msg


def _tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=300, n_embd=32, n_layer=1, n_head=2, n_positions=64,
                                      bos_token_id=0, eos_token_id=0))


def test_bitfit_gpt2_includes_layernorm_weights():
    # GPT-2 names its LayerNorms ln_1/ln_2/ln_f: norms must be found by module type, not by name.
    model = create_method("bitfit", {}).prepare(_tiny_gpt2(), ctx())
    assert trainable_ids(model) == norm_weights_and_biases(model)
    # By hand, 1 layer: 7 biases (ln_1, c_attn, attn c_proj, ln_2, c_fc, mlp c_proj, ln_f) + 3 LayerNorm gains.
    assert len(trainable_ids(model)) == 10


def test_full_trains_everything(llama):
    method = create_method("full", {})
    model = method.prepare(llama, ctx())
    all_params = list(model.named_parameters())
    assert trainable_ids(model) == {id(p) for _, p in all_params}
    assert [n for n, _ in method.trainable_params(model)] == [n for n, _ in all_params]
    assert sum(p.numel() for _, p in method.trainable_params(model)) == sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- optimizer


def test_param_groups_no_decay_for_ndim_below_2(bert):
    named = list(bert.named_parameters())
    groups = param_groups(named, weight_decay=0.1)
    assert len(groups) == 2
    decay, no_decay = groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    # Independently: classify by shape.
    vectors = {id(p) for _, p in named if len(p.shape) < 2}
    matrices = {id(p) for _, p in named if len(p.shape) >= 2}
    assert {id(p) for _, p in no_decay["params"]} == vectors
    assert {id(p) for _, p in decay["params"]} == matrices
    assert len(no_decay["params"]) + len(decay["params"]) == len(named)  # each exactly once


def test_param_groups_drop_empty_groups(llama):
    model = create_method("bitfit", {}).prepare(llama, ctx())
    groups = param_groups(create_method("bitfit", {}).trainable_params(model), weight_decay=0.1)
    assert len(groups) == 1 and groups[0]["weight_decay"] == 0.0


def test_build_optimizer_adamw_and_sgd(llama):
    named = list(llama.named_parameters())
    adamw = build_optimizer(named, TrainConfig(lr=0.02, betas=(0.8, 0.9), eps=1e-7, weight_decay=0.05))
    assert isinstance(adamw, torch.optim.AdamW)
    assert [g["weight_decay"] for g in adamw.param_groups] == [0.05, 0.0]
    g = adamw.param_groups[0]
    assert g["lr"] == 0.02 and g["betas"] == (0.8, 0.9) and g["eps"] == 1e-7
    sgd = build_optimizer(named, TrainConfig(optimizer="sgd", lr=0.5, momentum=0.7))
    assert isinstance(sgd, torch.optim.SGD)
    assert sgd.param_groups[0]["momentum"] == 0.7 and sgd.param_groups[0]["lr"] == 0.5


def test_adamw_step_matches_hand_computation():
    # One AdamW step on a matrix (decayed) and a vector (not decayed), against the formula.
    w = nn.Parameter(torch.tensor([[1.0, -2.0], [0.5, 3.0]]))
    b = nn.Parameter(torch.tensor([0.25, -0.75]))
    cfg = TrainConfig(lr=0.1, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.5)
    opt = build_optimizer([("w", w), ("b", b)], cfg)
    gw, gb = torch.tensor([[0.1, -0.2], [0.3, 0.0]]), torch.tensor([1.0, -0.5])
    w.grad, b.grad = gw.clone(), gb.clone()
    w0, b0 = w.detach().clone(), b.detach().clone()
    opt.step()

    def adamw_first_step(p0, g, wd):
        # m = (1-b1) g, v = (1-b2) g^2; bias-corrected m_hat = g, v_hat = g^2 -> update g / (|g| + eps)
        p = p0 * (1 - 0.1 * wd)
        return p - 0.1 * g / (g.abs() + 1e-8)

    torch.testing.assert_close(w.detach(), adamw_first_step(w0, gw, 0.5), rtol=0, atol=1e-6)
    torch.testing.assert_close(b.detach(), adamw_first_step(b0, gb, 0.0), rtol=0, atol=1e-6)


# ---------------------------------------------------------------- objectives: clm


def test_clm_labels_equal_inputs_and_are_a_copy():
    ids = torch.arange(24).reshape(3, 8)
    batch = {"input_ids": ids, "position_ids": torch.arange(8).repeat(3, 1)}
    out = add_labels(batch, "clm")
    assert torch.equal(out["labels"], ids) and torch.equal(out["input_ids"], ids)
    assert out["labels"].data_ptr() != ids.data_ptr()
    assert "position_ids" in out  # document packing needs them


# ---------------------------------------------------------------- objectives: mlm

VOCAB, MASK, SPECIAL = 1000, 2, [0, 1, 2]


def mlm_batch(seed=0, shape=(64, 512)):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, shape, generator=g)
    # sprinkle special tokens (EOS/pad) that must never be chosen
    ids[:, ::50] = 0
    ids[:, 7::50] = 1
    return {"input_ids": ids, "position_ids": torch.arange(shape[1]).repeat(shape[0], 1)}


def row_seeds(seed: int, n: int) -> list[int]:
    return [sequence_seed(seed, i) for i in range(n)]


def run_mlm(batch, seed=1234, p=0.15):
    return add_labels(batch, "mlm", mask_id=MASK, mlm_probability=p, vocab_size=VOCAB, special_ids=SPECIAL,
                      seeds=row_seeds(seed, batch["input_ids"].shape[0]))


def within(count: int, n: int, p: float, sigmas: float = 5.0) -> bool:
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


def test_mlm_rates_80_10_10():
    batch = mlm_batch()
    ids = batch["input_ids"].clone()
    out = run_mlm(batch)
    assert torch.equal(batch["input_ids"], ids)  # the input batch is not modified in place
    labels, inputs = out["labels"], out["input_ids"]
    chosen = labels != -100
    eligible = ~torch.isin(ids, torch.tensor(SPECIAL))
    n_eligible, n_chosen = int(eligible.sum()), int(chosen.sum())

    # ~15% of eligible tokens are chosen; specials never.
    assert within(n_chosen, n_eligible, 0.15), n_chosen / n_eligible
    assert not (chosen & ~eligible).any()
    # Labels hold the original ids at chosen positions.
    assert torch.equal(labels[chosen], ids[chosen])
    # Unchosen positions are untouched.
    assert torch.equal(inputs[~chosen], ids[~chosen])

    as_mask = int((inputs[chosen] == MASK).sum())
    unchanged = int((inputs[chosen] == ids[chosen]).sum())
    random_other = n_chosen - as_mask - unchanged
    # A random replacement equals the original or the mask id with prob 1/VOCAB each: negligible but
    # account for it in the expected rates.
    assert within(as_mask, n_chosen, 0.8 + 0.1 / VOCAB)
    assert within(unchanged, n_chosen, 0.1 + 0.1 / VOCAB)
    assert within(random_other, n_chosen, 0.1 - 0.2 / VOCAB)
    # Random replacements are valid ids spread over the vocabulary.
    replaced = inputs[chosen & (inputs != MASK) & (inputs != ids)]
    assert int(replaced.min()) >= 0 and int(replaced.max()) < VOCAB
    # Uniform over [0, VOCAB): mean (VOCAB-1)/2, std of the mean sqrt((VOCAB^2-1)/12 / n).
    n = replaced.numel()
    assert abs(replaced.double().mean().item() - (VOCAB - 1) / 2) <= 5 * math.sqrt((VOCAB ** 2 - 1) / 12 / n)
    # BERT uses absolute positions per window: packed position ids are dropped.
    assert "position_ids" not in out


def test_mlm_probability_is_respected():
    batch = mlm_batch(shape=(32, 512))
    eligible = int((~torch.isin(batch["input_ids"], torch.tensor(SPECIAL))).sum())
    for p in (0.05, 0.3):
        n = int((run_mlm(batch, p=p)["labels"] != -100).sum())
        assert within(n, eligible, p), (p, n / eligible)


def test_mlm_same_seed_same_masks_different_seed_different():
    batch = mlm_batch(shape=(8, 128))
    a, b, c = run_mlm(batch, seed=5), run_mlm(batch, seed=5), run_mlm(batch, seed=6)
    assert torch.equal(a["labels"], b["labels"]) and torch.equal(a["input_ids"], b["input_ids"])
    assert not torch.equal(a["labels"], c["labels"])


def test_mlm_does_not_touch_the_global_rng():
    batch = mlm_batch(shape=(4, 64))
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    run_mlm(batch)
    assert torch.equal(torch.rand(3), expected)


def test_mlm_needs_a_mask_token():
    with pytest.raises(ValueError):
        add_labels(mlm_batch(shape=(2, 16)), "mlm", mask_id=None, vocab_size=VOCAB)


def test_mlm_batch_trains_a_bert(bert, tokenizer):
    # End to end on the tiny BERT: the model's loss is the CE over only the chosen positions.
    bert.eval()  # no dropout, so two forward passes agree
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, len(tokenizer), (4, 32), generator=g)
    out = add_labels({"input_ids": ids}, "mlm", mask_id=tokenizer.mask_token_id, vocab_size=len(tokenizer),
                     special_ids=tokenizer.all_special_ids, seeds=row_seeds(1, 4))
    loss = bert(**out).loss
    logits = bert(input_ids=out["input_ids"]).logits
    manual = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), out["labels"].reshape(-1),
                                         ignore_index=-100)
    torch.testing.assert_close(loss, manual)


# ---------------------------------------------------------------- objectives: keyed masks, loss masks, counts


def test_mlm_masks_are_keyed_per_row_not_per_batch():
    # Row i depends on seeds[i] alone: any split of a global batch into micro-batches draws the same masks.
    batch = mlm_batch(seed=3, shape=(6, 64))
    seeds = row_seeds(77, 6)
    whole = add_labels(batch, "mlm", mask_id=MASK, vocab_size=VOCAB, special_ids=SPECIAL, seeds=seeds)
    for parts in ([0, 1, 2, 3, 4, 5], [0, 4, 6], [0, 1, 6]):
        for lo, hi in zip(parts, parts[1:]):
            sub = {k: v[lo:hi] for k, v in batch.items()}
            out = add_labels(sub, "mlm", mask_id=MASK, vocab_size=VOCAB, special_ids=SPECIAL, seeds=seeds[lo:hi])
            assert torch.equal(out["labels"], whole["labels"][lo:hi])
            assert torch.equal(out["input_ids"], whole["input_ids"][lo:hi])
    # Rows with different seeds get different masks (same row content).
    same = {"input_ids": batch["input_ids"][:1].repeat(2, 1)}
    out = add_labels(same, "mlm", mask_id=MASK, vocab_size=VOCAB, special_ids=SPECIAL, seeds=[1, 2])
    assert not torch.equal(out["labels"][0], out["labels"][1])


@pytest.mark.parametrize("seeds", [None, [1, 2, 3]])
def test_mlm_needs_one_seed_per_row(seeds):
    with pytest.raises(ValueError, match="seed"):
        add_labels(mlm_batch(shape=(2, 16)), "mlm", mask_id=MASK, vocab_size=VOCAB, seeds=seeds)


def test_loss_mask_becomes_minus_100_in_clm():
    ids = torch.arange(3, 27).reshape(3, 8)
    loss_mask = torch.tensor([[1, 1, 0, 0, 1, 1, 1, 0]] * 3)
    out = add_labels({"input_ids": ids, "loss_mask": loss_mask}, "clm")
    assert "loss_mask" not in out  # never reaches the model
    assert torch.equal(out["labels"], torch.where(loss_mask.bool(), ids, torch.tensor(-100)))
    assert torch.equal(out["input_ids"], ids)
    # Targets exclude position 0 (nothing predicts it) and every masked token.
    assert count_targets(out, "clm") == int(loss_mask[:, 1:].sum()) == 3 * 4
    assert count_targets(add_labels({"input_ids": ids}, "clm"), "clm") == 3 * 7


def test_loss_mask_excludes_tokens_from_mlm_targets():
    batch = mlm_batch(seed=5, shape=(8, 256))
    loss_mask = torch.zeros_like(batch["input_ids"])
    loss_mask[:, 128:] = 1
    out = add_labels({**batch, "loss_mask": loss_mask}, "mlm", mask_id=MASK, vocab_size=VOCAB, special_ids=SPECIAL,
                     seeds=row_seeds(0, 8), mlm_probability=0.3)
    chosen = out["labels"] != -100
    assert "loss_mask" not in out
    assert not chosen[:, :128].any() and chosen[:, 128:].sum() > 100
    assert torch.equal(out["input_ids"][:, :128], batch["input_ids"][:, :128])  # unmasked half untouched
    assert count_targets(out, "mlm") == int(chosen.sum())  # mlm counts every labelled position


def test_fixed_mlm_labeler_is_keyed_on_window_indices():
    label = fixed_mlm_labeler(MASK, VOCAB, SPECIAL, 0.15)
    batch = mlm_batch(seed=9, shape=(4, 128))
    a = label(batch, [10, 11, 12, 13])
    # The same windows in another batch composition (reordered, split) get the same masks.
    b = label({k: v[[2, 0]] for k, v in batch.items()}, [12, 10])
    assert torch.equal(b["labels"], a["labels"][[2, 0]]) and torch.equal(b["input_ids"], a["input_ids"][[2, 0]])
    # Other window indices, other masks; and the global RNG is not touched.
    torch.manual_seed(0)
    expected = torch.rand(2)
    torch.manual_seed(0)
    c = label(batch, [20, 21, 22, 23])
    assert torch.equal(torch.rand(2), expected)
    assert not torch.equal(c["labels"], a["labels"])
    # Distinct from the training masks of step 0 (training keys on (seed, step, position)).
    assert sequence_seed(-1, 10) != sequence_seed(0, 0, 10)
