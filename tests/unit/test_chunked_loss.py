"""train.loss_chunk_tokens (train/chunked_loss.py): the model's own loss and gradients, the head never
applied to more than a chunk of positions, and one-line refusals where the chunks would change the loss."""

from __future__ import annotations

import pytest
import torch
import yaml
from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM

from tunelab.recipe import load_recipe
from tunelab.errors import ConfigError, ModelError
from tunelab.eval.preference import pair_logps, sequence_logps
from tunelab.objectives import create_objective
from tunelab.train.chunked_loss import check_reproduces_model_loss, chunked_lm_loss, chunked_sequence_logps

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
VOCAB = 61


def tiny_llama(tied: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=tied))


def batch_with_masked_targets() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (3, 11), generator=generator)
    labels = ids.clone()
    labels[0, :6] = -100  # a prompt without targets
    labels[2, 4:7] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def loss_and_grads(model, loss_fn):
    model.zero_grad()
    loss = loss_fn()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("chunk", [1, 4, 1000])
def test_same_loss_and_gradients_as_the_models_own(tied, chunk):
    model, batch = tiny_llama(tied), batch_with_masked_targets()
    own, own_grads = loss_and_grads(model, lambda: model(**batch, use_cache=False).loss)
    got, got_grads = loss_and_grads(model, lambda: chunked_lm_loss(model, batch, chunk))
    torch.testing.assert_close(got, own, rtol=1e-6, atol=1e-6)
    assert got_grads.keys() == own_grads.keys()
    for name in own_grads:
        torch.testing.assert_close(got_grads[name], own_grads[name], rtol=1e-5, atol=1e-7, msg=name)


def test_the_head_never_sees_more_than_a_chunk_forward_or_backward():
    model, batch = tiny_llama(), batch_with_masked_targets()
    targets = int((batch["labels"][:, 1:] != -100).sum())
    rows = []
    model.lm_head.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[:-1].numel()))
    loss = chunked_lm_loss(model, batch, 4)
    forward_rows = list(rows)
    loss.backward()
    assert forward_rows[0] == 0  # the model's own head call projects no position
    chunks = -(-targets // 4)
    assert forward_rows[1:] == [4] * (targets // 4) + ([targets % 4] if targets % 4 else [])
    assert len(rows) == 1 + 2 * chunks  # each chunk recomputed once in the backward pass
    assert max(rows) <= 4


def test_no_target_gives_nan_like_the_models_own_loss():
    model, batch = tiny_llama(), batch_with_masked_targets()
    batch["labels"] = torch.full_like(batch["labels"], -100)
    assert torch.isnan(model(**batch, use_cache=False).loss)
    assert torch.isnan(chunked_lm_loss(model, batch, 4))


def test_under_bf16_autocast_it_follows_the_models_own_loss():
    model, batch = tiny_llama(), batch_with_masked_targets()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        own = model(**batch, use_cache=False).loss
        got = chunked_lm_loss(model, batch, 4)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, own.float(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("adapter", ["lora_on_the_head", "prompt_tuning"])
def test_peft_adapters_on_the_head_or_the_inputs_reproduce_the_loss_and_adapter_gradients(adapter):
    from peft import LoraConfig, PromptTuningConfig, get_peft_model

    config = (LoraConfig(r=2, target_modules=["q_proj", "lm_head"], init_lora_weights=False)
              if adapter == "lora_on_the_head" else PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    model, batch = get_peft_model(tiny_llama(), config), batch_with_masked_targets()
    check_reproduces_model_loss(model, VOCAB, 4, "cpu")
    own, own_grads = loss_and_grads(model, lambda: model(**batch, use_cache=False).loss)
    got, got_grads = loss_and_grads(model, lambda: chunked_lm_loss(model, batch, 4))
    torch.testing.assert_close(got, own, rtol=1e-6, atol=1e-6)
    assert own_grads and got_grads.keys() == own_grads.keys()
    if adapter == "lora_on_the_head":
        assert any("lm_head.lora_B" in name for name in own_grads)
    for name in own_grads:
        torch.testing.assert_close(got_grads[name], own_grads[name], rtol=1e-5, atol=1e-7, msg=name)


def test_a_model_that_soft_caps_its_logits_is_refused_in_one_line():
    torch.manual_seed(0)
    model = Gemma2ForCausalLM(Gemma2Config(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                           num_attention_heads=2, num_key_value_heads=2, head_dim=8,
                                           final_logit_softcapping=30.0))
    with pytest.raises(ModelError, match="Gemma2ForCausalLM computes its loss differently") as err:
        check_reproduces_model_loss(model, VOCAB, 4, "cpu")
    assert "\n" not in str(err.value) and "remove train.loss_chunk_tokens" in str(err.value)
    assert model.training  # the check leaves the mode as it found it
    assert not model.lm_head._forward_pre_hooks  # and no hook behind


def test_a_model_that_cannot_skip_its_head_is_refused_in_one_line():
    class OldStyleCausalLM(torch.nn.Module):  # a forward without logits_to_keep
        def __init__(self):
            super().__init__()
            self.inner = tiny_llama()

        def get_output_embeddings(self):
            return self.inner.lm_head

        def forward(self, input_ids, attention_mask=None, labels=None, use_cache=False):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, labels=labels, use_cache=use_cache)

    with pytest.raises(ModelError, match="OldStyleCausalLM cannot run with its head skipped") as err:
        check_reproduces_model_loss(OldStyleCausalLM(), VOCAB, 4, "cpu")
    assert "\n" not in str(err.value)


def test_a_model_the_check_accepts_is_left_as_it_was():
    model = tiny_llama().eval()
    before = {n: p.clone() for n, p in model.state_dict().items()}
    check_reproduces_model_loss(model, VOCAB, 4, "cpu")
    assert not model.training and not model.lm_head._forward_pre_hooks
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())


def write(tmp_path, **changes):
    recipe = {"kind": "pretrain", "model": {"preset": "llama-micro"}, "data": {"train": "builtin:prose"},
              "train": {"loss_chunk_tokens": 64, "precision": "fp32"}}
    for key, value in changes.items():
        section, name = key.split("__")
        recipe.setdefault(section, {})[name] = value
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.mark.parametrize("changes, message", [
    ({"train__loss_chunk_tokens": 0}, "train.loss_chunk_tokens"),
    ({"model__preset": "bert-tiny"}, "not with objective mlm: the masked-LM loss is the model's own"),
    ({"objective__name": "dpo", "data__train": [{"source": "builtin:preference", "format": "preference"}],
      "method__name": "adalora"},
     "train.loss_chunk_tokens: not with method adalora: peft adds AdaLoRA's orthogonality penalty"),
    ({"method__name": "adalora"}, "not with method adalora: peft adds AdaLoRA's orthogonality penalty"),
])
def test_recipes_it_cannot_serve_are_refused_when_they_load(tmp_path, changes, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_recipe(write(tmp_path, **changes))
    assert "\n" not in str(err.value)


def test_adalora_without_its_penalty_may_chunk(tmp_path):
    cfg = load_recipe(write(tmp_path, method__name="adalora", method__options={"orth_reg_weight": 0.0}))
    assert cfg.train.loss_chunk_tokens == 64


def test_evaluation_with_chunks_gives_the_same_loss_and_bytes():
    import numpy as np

    from tunelab.eval.perplexity import evaluate_tokens

    model = tiny_llama()
    tokens = np.random.default_rng(0).integers(0, VOCAB - 1, 500).astype(np.int32)
    byte_lengths = np.arange(VOCAB) % 4 + 1
    common = dict(eos_id=VOCAB - 1, document_mask=True, byte_lengths=byte_lengths, batch_size=4)
    whole = evaluate_tokens(model, tokens, 32, **common)
    chunked = evaluate_tokens(model, tokens, 32, chunk_tokens=7, **common)
    assert chunked["eval_tokens"] == whole["eval_tokens"] > 400
    assert chunked["loss"] == pytest.approx(whole["loss"], rel=1e-6)
    assert chunked["bpb"] == pytest.approx(whole["bpb"], rel=1e-6)


# ---------------------------------------------------------------- preference methods: each reply's log-probability


def pairs_batch() -> dict[str, torch.Tensor]:
    """2 pairs: rows 0-1 the chosen replies, rows 2-3 the rejected ones, each after a prompt (loss_mask 0)."""
    generator = torch.Generator().manual_seed(2)
    ids = torch.randint(0, VOCAB, (4, 13), generator=generator)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate([3, 5, 3, 7]):
        mask[row, prompt:] = 1
    mask[3, 11:] = 0  # a padded reply
    return {"input_ids": ids, "loss_mask": mask, "pair_id": torch.tensor([0, 1])}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("chunk", [1, 4, 1000])
def test_reply_log_probs_and_their_gradients_equal_the_whole_logits_ones(dtype, chunk):
    model, batch = tiny_llama(tied=True).to(dtype), pairs_batch()
    ids, mask = batch["input_ids"], batch["loss_mask"]

    def logps_counts_and_grads(fn):  # the gradient of a weighted sum: each row's log-prob counts on its own
        model.zero_grad()
        logps, counts = fn()
        (logps * torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=logps.dtype)).sum().backward()
        return logps.detach(), counts, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    expected_logps, expected_counts, expected_grads = logps_counts_and_grads(
        lambda: sequence_logps(model(input_ids=ids).logits, ids, mask))
    got_logps, got_counts, got_grads = logps_counts_and_grads(lambda: chunked_sequence_logps(model, ids, mask, chunk))
    assert got_logps.dtype == expected_logps.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(got_logps, expected_logps, rtol=1e-6, atol=1e-5)
    assert got_counts.tolist() == expected_counts.tolist() == [10, 8, 10, 4]
    assert got_grads.keys() == expected_grads.keys()
    for name in expected_grads:
        torch.testing.assert_close(got_grads[name], expected_grads[name], rtol=1e-5, atol=1e-7, msg=name)
    torch.testing.assert_close(pair_logps(model, batch, chunk)[0], pair_logps(model, batch)[0], rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("name", ["dpo", "simpo", "orpo"])
def test_preference_losses_are_the_same_with_chunks_and_the_head_sees_a_chunk_at_most(name):
    model, batch = tiny_llama(), pairs_batch()
    method = create_objective(name, {})
    if name == "dpo":  # the cached-reference path: [pair id, (chosen, rejected)] from the starting weights
        method.reference = pair_logps(model, batch)[0] - 0.25
    whole = loss_and_grads(model, lambda: method.loss(model, batch))
    rows = []
    hook = model.lm_head.register_forward_hook(lambda module, args, out: rows.append(args[0].shape[0]))
    method.loss_chunk_tokens = 4
    try:
        chunked = loss_and_grads(model, lambda: method.loss(model, batch))
    finally:
        hook.remove()
    assert rows and max(rows) <= 4
    torch.testing.assert_close(chunked[0], whole[0], rtol=1e-6, atol=1e-6)
    for param in whole[1]:
        torch.testing.assert_close(chunked[1][param], whole[1][param], rtol=1e-5, atol=1e-7, msg=param)


def test_preference_objectives_may_chunk(tmp_path):
    data = [{"source": "builtin:preference", "format": "preference"}]
    for name in ("dpo", "simpo", "orpo"):
        cfg = load_recipe(write(tmp_path, objective__name=name, data__train=data))
        assert cfg.train.loss_chunk_tokens == 64
