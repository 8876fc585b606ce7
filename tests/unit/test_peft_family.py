"""The peft family beyond plain LoRA: options, one-line errors, adapters that plain peft loads, export
--merge (or its refusal), AdaLoRA's rank state across a resume, LoRA's init variants and intruder
mitigation, and a 2-process DDP run. (The shared method suite covers training, frozen parameters,
save/reload and SIGKILL resume for every registered method.)"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from tunelab import models, tokenizers
from tunelab.errors import ConfigError, ModelError
from tunelab.commands.export import export_model
from tunelab.methods import create_method
from tunelab.methods.base import lm_loss
from tunelab.methods.base import MethodContext
from tunelab.methods.peft_generic import OTHER_PEFT_TYPES

# peft 0.21 reads a property transformers 5 deprecated, in PeftModel.from_pretrained called directly below.
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
_WORDS = "the model data token train loss step layer weight value cache file text domain batch".split()
PEFT_METHODS = ["adalora", "ia3", "loha", "lokr", "vera", "oft", "boft", "shira", "ln_tuning", "trainable_tokens",
                "prompt_tuning", "prefix_tuning", "p_tuning"]
PROMPT = {"prompt_tuning", "prefix_tuning", "p_tuning"}
# Small enough for llama-micro (32 wide), and quick.
OPTIONS = {"shira": {"r": 4}, "trainable_tokens": {"tokens": list(range(0, 300, 3))}, "vera": {"r": 16},
           "adalora": {"init_r": 6, "target_r": 2}, "prompt_tuning": {"num_virtual_tokens": 4},
           "prefix_tuning": {"num_virtual_tokens": 4}, "p_tuning": {"num_virtual_tokens": 4}}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """A 32-wide model gains nothing from threads, and on a shared CPU their spinning costs ~10x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer():
    rng = random.Random(0)
    texts = [" ".join(rng.choice(_WORDS) for _ in range(60)) + "." for _ in range(80)]
    return tokenizers.train_tokenizer(texts, vocab_size=300)


def save_base(path: Path, preset: str, tokenizer, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = models.build_model(preset, tokenizer)
    with torch.no_grad():  # off the init, so that singular directions (PiSSA, intruders) are not degenerate
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, tokenizer) -> Path:
    return save_base(tmp_path_factory.mktemp("base") / "llama", "llama-micro", tokenizer)


@pytest.fixture(scope="module")
def batch(tokenizer) -> dict:
    rng = random.Random(1)
    ids = torch.tensor(tokenizer(" ".join(rng.choice(_WORDS) for _ in range(200)))["input_ids"][:2 * 24]).reshape(2, 24)
    return {"input_ids": ids, "labels": ids.clone()}


def context(path, tokenizer, max_steps: int = 10) -> MethodContext:
    recipe = SimpleNamespace(model=SimpleNamespace(path=None if path is None else str(path)))
    return MethodContext(device=torch.device("cpu"), dist=None, recipe=recipe, tokenizer=tokenizer,
                         max_steps=max_steps, seed=0)


def prepared(name, base_dir, tokenizer, max_steps: int = 10, **options):
    base = models.load_model(str(base_dir))
    method = create_method(name, options)
    torch.manual_seed(0)
    return method, method.prepare(base, context(base_dir, tokenizer, max_steps))


def train(method, model, batch, steps: int, opt=None, start: int = 0, lr: float = 1e-2, record=None):
    """The loop's order of hooks: loss, backward, after_backward, step, zero_grad, after_step.
    `record`: a list that gets the method's JSON and tensor state after every step."""
    model.train()
    opt = opt or torch.optim.AdamW([p for _, p in method.trainable_params(model)], lr=lr)
    for step in range(start, start + steps):
        lm_loss(model, batch).backward()
        method.after_backward(model, step)
        opt.step()
        opt.zero_grad(set_to_none=True)
        method.after_step(model, step)
        if record is not None:
            record.append((json.dumps(method.state_dict()), {k: v.clone() for k, v in method.tensor_state().items()}))
    return opt


@torch.no_grad()
def logits(model, ids) -> torch.Tensor:
    return model.eval()(input_ids=ids, use_cache=False).logits


# ---------------------------------------------------------------- options and set-up errors


def test_modules_import_neither_torch_nor_peft():
    code = ("import sys; from tunelab.methods import create_method; "
            f"[create_method(n, {{}}) for n in {sorted(set(PEFT_METHODS) - {'trainable_tokens'})}]; "
            "create_method('trainable_tokens', {'tokens': [1]}); create_method('peft', {'type': 'hra'}); "
            "assert 'torch' not in sys.modules and 'peft' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("name,options,words", [
    ("adalora", {"target_r": 16, "init_r": 12}, "target_r (16) must be <= init_r"),
    ("adalora", {"tinit_fraction": 0.5, "tfinal_fraction": 0.5}, "must be < 1"),
    ("adalora", {"tfinal_fraction": 1.0}, "tfinal_fraction"), ("adalora", {"beta1": 1.0}, "beta1"), ("adalora", {"delta_t": 0}, "delta_t"),
    ("ia3", {"target_modules": ["k_proj"], "feedforward_modules": ["down_proj"]}, "must be among target_modules"),
    ("ia3", {"feedforward_modules": ["down_proj"]}, "feedforward_modules needs target_modules"),
    ("loha", {"r": 0}, "r"), ("loha", {"module_dropout": 1.0}, "module_dropout"),
    ("lokr", {"decompose_factor": 0}, "decompose_factor"),
    ("vera", {"d_initial": 0}, "d_initial"),
    ("oft", {"block_size": 8, "r": 4}, "exactly one of block_size"), ("oft", {"block_size": 0}, "exactly one"),
    ("boft", {"block_size": 0, "block_num": 0}, "exactly one of block_size"),
    ("shira", {"r": 0}, "r"), ("shira", {"target_modules": []}, "target_modules"),
    ("ln_tuning", {"target_modules": "all-linear"}, "normalisation layers"),
    ("trainable_tokens", {}, "tokens"), ("trainable_tokens", {"tokens": []}, "tokens"),
    ("prompt_tuning", {"init": "text"}, "init_text"), ("prompt_tuning", {"num_virtual_tokens": 0}, "num_virtual"),
    ("prefix_tuning", {"projection_hidden_size": 8}, "projection: true"),
    ("p_tuning", {"encoder": "gru"}, "encoder"),
    ("lora", {"init": "svd"}, "init"), ("lora", {"init": "orthogonal", "r": 3}, "even r"),
    ("lora", {"init": "pissa", "use_dora": True}, "use_dora"),
    ("lora", {"intruders": {"top_k": 0}}, "top_k"), ("lora", {"intruders": True, "use_dora": True}, "intruders"),
    ("vera", {"rank": 4}, "rank"),
])
def test_options_are_validated(name, options, words):
    with pytest.raises(ConfigError) as err:
        create_method(name, options)
    msg = str(err.value)
    assert "\n" not in msg and words in msg and f"({name})" in msg, msg


def test_set_up_errors_are_one_line(base_dir, bert_dir, tokenizer):
    def refused(name, match, path=base_dir, max_steps=10, **options):
        base = models.load_model(str(path or base_dir))
        with pytest.raises(ConfigError, match=match) as err:
            create_method(name, options).prepare(base, context(path, tokenizer, max_steps))
        assert "\n" not in str(err.value)
        return str(err.value)

    msg = refused("loha", r"'qproj' matches no module of this LlamaForCausalLM", target_modules=["qproj"])
    assert "(linear modules: down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj)" in msg
    refused("ln_tuning", r"'q_proj' is a Linear, which LN tuning cannot adapt \(normalisation modules: "
            r"input_layernorm, norm, post_attention_layernorm\)", target_modules=["q_proj"])
    refused("boft", r"peft cannot apply BOFT to this LlamaForCausalLM: in_features \(32\) must be divisible by "
            r"boft_block_size \(5\)", block_size=5)
    refused("trainable_tokens", r"'<nope>' is not a token of this tokenizer", tokens=["<nope>"])
    refused("trainable_tokens", r"id 5000 is outside the embedding's 300 rows", tokens=[5000])
    refused("ia3", r"method ia3 adapts a trained model: set model.path", path=None)
    refused("prompt_tuning", r"prompt-tuning prepends virtual tokens, which peft supports for causal LMs only; bert",
            path=bert_dir)


def test_trainable_tokens_by_name(base_dir, tokenizer):
    eos = tokenizer.eos_token
    method, model = prepared("trainable_tokens", base_dir, tokenizer, tokens=[eos, 7, 7])
    assert model.peft_config["default"].token_indices == sorted({tokenizer.convert_tokens_to_ids(eos), 7})


# ---------------------------------------------------------------- every kind: plain peft, export --merge


@pytest.mark.parametrize("name", PEFT_METHODS)
def test_adapter_loads_with_plain_peft_and_merges_or_says_why_not(name, base_dir, tokenizer, batch, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    method, model = prepared(name, base_dir, tokenizer, **OPTIONS.get(name, {}))
    train(method, model, batch, steps=3)
    ids = batch["input_ids"]
    expected = logits(model, ids)
    assert expected.shape[:2] == ids.shape  # prompt tuning's virtual tokens are trimmed from the logits
    final = tmp_path / "final"
    method.save_final(model, tokenizer, final)
    info = json.loads((final / "tunelab_adapter.json").read_text())
    assert info["method"] == name and info["base"] == str(base_dir.resolve())

    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), final)
    got = logits(plain, ids)[:, -ids.shape[1]:]  # plain peft keeps the virtual tokens' rows: the last ones are ours
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(logits(models.load_model(str(final)), ids), expected, rtol=0, atol=1e-6)

    if name in PROMPT:
        with pytest.raises(ModelError, match="adapter: its virtual tokens are inputs, not weights, so peft cannot "
                                             "merge it into the base") as err:
            export_model(final, tmp_path / "merged", merge=True, log=lambda *a: None)
        assert "\n" not in str(err.value) and not (tmp_path / "merged").exists()
        return
    merged = export_model(final, tmp_path / "merged", merge=True, log=lambda *a: None)
    exported = AutoModelForCausalLM.from_pretrained(merged)
    torch.testing.assert_close(logits(exported, ids), expected, rtol=0, atol=1e-4)


# The generic `peft` entry: every type it accepts trains, reloads with plain peft and merges (or says
# in one line why peft cannot). Options that fit llama-micro's 32-wide matrices:
OTHER_CONFIG = {"road": {"group_size": 16}, "waveft": {"n_frequency": 64}, "fourierft": {"n_frequency": 64},
                "vblora": {"num_vectors": 16, "vector_length": 8}, "c3a": {"block_size": 16}, "miss": {"r": 8}}
NOT_MERGEABLE = {"lily": "This method is not supported for Lily", "beft": "Base layer has no bias"}


@pytest.mark.parametrize("peft_type", OTHER_PEFT_TYPES)
def test_other_peft_types_through_the_generic_entry(peft_type, base_dir, tokenizer, batch, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    method, model = prepared("peft", base_dir, tokenizer, type=peft_type, config=OTHER_CONFIG.get(peft_type, {}))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(method, model, batch, steps=3)
    trainable = {n for n, _ in method.trainable_params(model)}
    assert trainable and all(torch.equal(p, before[n]) for n, p in model.named_parameters() if n not in trainable)
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in trainable)
    ids = batch["input_ids"]
    expected = logits(model, ids)
    method.save_final(model, tokenizer, tmp_path / "final")
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "final")
    torch.testing.assert_close(logits(plain, ids), expected, rtol=0, atol=1e-6)
    if peft_type in NOT_MERGEABLE:
        with pytest.raises(ModelError, match=f"peft cannot merge the .* adapter .*{NOT_MERGEABLE[peft_type]}") as err:
            export_model(tmp_path / "final", tmp_path / "merged", merge=True, log=lambda *a: None)
        assert "\n" not in str(err.value)
        return
    merged = export_model(tmp_path / "final", tmp_path / "merged", merge=True, log=lambda *a: None)
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(merged), ids), expected, rtol=0, atol=1e-4)


def test_generic_entry_errors(base_dir, tokenizer):
    with pytest.raises(ConfigError, match=r"method.options \(peft\): type: one of beft, .*lora or ia3, are method"):
        create_method("peft", {"type": "lora"})
    with pytest.raises(ConfigError, match=r"config: task_type is set by tunelab"):
        create_method("peft", {"type": "hra", "config": {"task_type": "SEQ_CLS"}})
    base = models.load_model(str(base_dir))
    with pytest.raises(ConfigError, match=r"method.options.config.target_module: not a field of peft's HRAConfig \(did "
                                          r"you mean 'target_modules'\?\)"):
        create_method("peft", {"type": "hra", "config": {"target_module": ["q_proj"]}}).prepare(
            base, context(base_dir, tokenizer))
    with pytest.raises(ConfigError, match=r"'qproj' matches no module"):
        create_method("peft", {"type": "hra", "config": {"target_modules": ["qproj"]}}).prepare(
            base, context(base_dir, tokenizer))
    with pytest.raises(ConfigError, match=r"peft cannot apply RoAd to this LlamaForCausalLM: .*group_size") as err:
        create_method("peft", {"type": "road", "config": {"group_size": 48}}).prepare(base, context(base_dir, tokenizer))
    assert "\n" not in str(err.value)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory, tokenizer) -> Path:
    return save_base(tmp_path_factory.mktemp("base") / "bert", "bert-tiny", tokenizer)


@pytest.mark.parametrize("name", sorted(set(PEFT_METHODS) - PROMPT - {"trainable_tokens"}))
def test_encoder_with_mlm_head(name, bert_dir, tokenizer, batch, tmp_path):
    from transformers import AutoModelForMaskedLM

    ids = batch["input_ids"]
    masked = torch.rand(ids.shape, generator=torch.Generator().manual_seed(0)) < 0.3
    mlm = {"input_ids": ids.masked_fill(masked, tokenizer.mask_token_id), "labels": ids.masked_fill(~masked, -100)}
    method, model = prepared(name, bert_dir, tokenizer, **OPTIONS.get(name, {}))
    train(method, model, mlm, steps=3)
    expected = logits(model, mlm["input_ids"])
    method.save_final(model, tokenizer, tmp_path / "final")
    loaded = models.load_model(str(tmp_path / "final"))
    assert models.is_encoder(loaded)
    torch.testing.assert_close(logits(loaded, mlm["input_ids"]), expected, rtol=0, atol=1e-5)
    merged = export_model(tmp_path / "final", tmp_path / "merged", merge=True, log=lambda *a: None)
    torch.testing.assert_close(logits(AutoModelForMaskedLM.from_pretrained(merged), mlm["input_ids"]), expected,
                               rtol=0, atol=1e-4)


def test_trainable_tokens_refuses_a_tied_head_with_a_bias(bert_dir, tokenizer):
    with pytest.raises(ConfigError, match="output layer is tied to the embeddings and has a bias, which peft's "
                                          "trainable tokens drop"):
        prepared("trainable_tokens", bert_dir, tokenizer, tokens=[1, 2])


def test_export_cli_refuses_a_prompt_adapter_with_exit_2(base_dir, tokenizer, batch, tmp_path):
    method, model = prepared("prompt_tuning", base_dir, tokenizer, num_virtual_tokens=2)
    method.save_final(model, tokenizer, tmp_path / "final")
    result = subprocess.run([sys.executable, "-m", "tunelab", "export", str(tmp_path / "final"), "--out",
                             str(tmp_path / "x"), "--merge"], capture_output=True, text=True)
    assert result.returncode == 2
    assert "is a prompt-tuning adapter: its virtual tokens are inputs" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_adapter_on_a_different_base_is_refused(base_dir, tokenizer, batch, tmp_path):
    method, model = prepared("ia3", base_dir, tokenizer)
    method.save_final(model, tokenizer, tmp_path / "final")
    other = save_base(tmp_path / "other", "llama-micro", tokenizer, seed=1)
    with pytest.raises(ModelError, match=r"was trained on a different base \(hash mismatch\)"):
        models.load_model(str(tmp_path / "final"), base=str(other))


# ---------------------------------------------------------------- AdaLoRA's rank state across a resume


@pytest.mark.parametrize("cut", [3, 8])  # mid-schedule (importances matter), final phase (the pattern does)
def test_adalora_resume_allocates_ranks_exactly(base_dir, tokenizer, batch, cut):
    """A run cut after `cut` steps and rebuilt from what a checkpoint holds (adapter, JSON state, tensor
    state, optimizer) allocates the same ranks and ends with the same weights as an uninterrupted one."""
    options = {"init_r": 6, "target_r": 2, "tinit_fraction": 0.1, "tfinal_fraction": 0.3, "delta_t": 2}
    steps = 10  # full budget up to step 1, pruning up to step 7, ranks fixed from then on
    method, model = prepared("adalora", base_dir, tokenizer, max_steps=steps, **options)
    states = []
    train(method, model, batch, steps, record=states)
    reference = method.weights_to_save(model)
    pattern = model.peft_config["default"].rank_pattern
    kept = [sum(v) for v in pattern.values()]
    assert sum(kept) == 2 * len(kept) and len(set(kept)) > 1  # the budget was reallocated unevenly

    first, model1 = prepared("adalora", base_dir, tokenizer, max_steps=steps, **options)
    opt = train(first, model1, batch, cut)
    saved = (first.weights_to_save(model1), json.loads(json.dumps(first.state_dict())),
             {k: v.clone() for k, v in first.tensor_state().items()}, opt.state_dict())
    assert saved[1]["rank_pattern"] is not None
    assert bool(saved[2]) == (cut < 7)  # importances until the final allocation, which resets them

    second, model2 = prepared("adalora", base_dir, tokenizer, max_steps=steps, **options)
    second.load_weights(model2, saved[0])
    second.load_tensor_state(saved[2])
    second.load_state_dict(saved[1])
    opt2 = torch.optim.AdamW([p for _, p in second.trainable_params(model2)], lr=1e-2)
    opt2.load_state_dict(saved[3])
    resumed_states = []
    train(second, model2, batch, steps - cut, opt=opt2, start=cut, record=resumed_states)
    # Step by step: the same rank pattern and the same smoothed importances (exactly) as without the cut.
    for step, ((pattern_a, ipt_a), (pattern_b, ipt_b)) in enumerate(zip(states[cut:], resumed_states), start=cut):
        assert pattern_a == pattern_b, step
        assert ipt_a.keys() == ipt_b.keys() and all(torch.equal(ipt_a[k], ipt_b[k]) for k in ipt_a), step
    assert model2.peft_config["default"].rank_pattern == pattern
    resumed = second.weights_to_save(model2)
    assert resumed.keys() == reference.keys()
    for key in reference:
        assert torch.equal(resumed[key], reference[key]), key


# ---------------------------------------------------------------- LoRA: init variants, intruders


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_mutating_inits_save_a_lora_on_the_original_base(init, base_dir, tokenizer, batch, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    method, model = prepared("lora", base_dir, tokenizer, r=4, init=init)
    original = models.load_model(str(base_dir)).model.layers[0].self_attn.q_proj.weight
    residual = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
    assert not torch.equal(original, residual)  # the base in memory is W - s*B0@A0
    train(method, model, batch, steps=3)
    expected = logits(model, batch["input_ids"])
    method.save_final(model, tokenizer, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["r"], config["init_lora_weights"]) == (8, True)  # converted: rank 2r, plain LoRA
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path)
    torch.testing.assert_close(logits(plain, batch["input_ids"]), expected, rtol=0, atol=1e-4)
    assert json.loads((tmp_path / "tunelab_adapter.json").read_text())["init"] == init


def test_gaussian_and_orthogonal_inits(base_dir, tokenizer, batch):
    base_logits = logits(models.load_model(str(base_dir)), batch["input_ids"])
    _, gaussian = prepared("lora", base_dir, tokenizer, init="gaussian")
    torch.testing.assert_close(logits(gaussian, batch["input_ids"]), base_logits)  # B = 0: starts as the base
    _, orthogonal = prepared("lora", base_dir, tokenizer, init="orthogonal", r=4)
    assert not torch.allclose(logits(orthogonal, batch["input_ids"]), base_logits)  # B != 0 from the start


def test_intruder_mitigation_at_save(base_dir, tokenizer, batch, tmp_path):
    # threshold_epsilon near 1: nearly every top direction counts as an intruder, so something changes.
    method, model = prepared("lora", base_dir, tokenizer, r=4, intruders={"threshold_epsilon": 0.99, "top_k": 2})
    train(method, model, batch, steps=5, lr=5e-2)
    trained = {k: v.clone() for k, v in method.weights_to_save(model).items()}  # views of the live factors
    before = logits(model, batch["input_ids"])
    method.save_final(model, tokenizer, tmp_path)
    info = json.loads((tmp_path / "tunelab_adapter.json").read_text())
    assert info["intruders"]["layers_mitigated"] > 0 and info["intruders"]["mitigation_lambda"] == 0.75
    assert list(model.peft_config) == ["default"]  # the mitigated factors replaced the trained ones
    mitigated = method.weights_to_save(model)
    assert mitigated.keys() == trained.keys() and any(not torch.equal(mitigated[k], trained[k]) for k in trained)
    after = logits(model, batch["input_ids"])
    assert not torch.allclose(after, before)
    torch.testing.assert_close(logits(models.load_model(str(tmp_path)), batch["input_ids"]), after, rtol=0, atol=1e-6)


# ---------------------------------------------------------------- DDP


@pytest.mark.slow
@pytest.mark.parametrize("name,options", [("adalora", {"init_r": 6, "target_r": 2}),
                                          ("prompt_tuning", {"num_virtual_tokens": 4})])
def test_under_ddp_matches_one_process(tmp_path, corpus_dir, base_dir, name, options):
    """2 gloo processes x micro-batch 2 == 1 process x micro-batch 4: AdaLoRA's rank allocation included
    (every rank sees the same all-reduced gradients, so each allocates the same ranks), and prompt
    tuning's hooks on the PeftModel under the DDP wrapper."""
    from conftest import REPO, run_cli
    from tunelab.runs import train_losses

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "kind": "finetune", "name": f"ddp-{name}", "model": {"path": str(base_dir)},
        "data": {"train": str(corpus_dir), "seq_len": 32}, "method": {"name": name, "options": options},
        "train": {"max_steps": 8, "micro_batch_size": 4, "lr": 1e-2, "log_every": 1, "precision": "fp32",
                  "eval_max_tokens": 128, "checkpoint_every": 0, "schedule": {"name": "constant"}}}))
    one = run_cli("finetune", str(recipe), "--out", str(tmp_path / "one"), "--quiet")
    assert one.returncode == 0, one.stderr[-3000:]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-port", str(29500 + (os.getpid() + 7 + len(name)) % 1000), "-m", "tunelab",
                          "finetune", str(recipe), "--out", str(tmp_path / "two"), "--quiet",
                          "--set", "train.micro_batch_size=2"],
                         cwd=REPO, capture_output=True, text=True, timeout=600, env=env, stdin=subprocess.DEVNULL)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = train_losses(tmp_path / "one" / "metrics.jsonl"), train_losses(tmp_path / "two" / "metrics.jsonl")
    assert sorted(b) == list(range(1, 9))
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-4, abs=1e-5), step
    configs = [json.loads((tmp_path / run / "final" / "adapter_config.json").read_text()) for run in ("one", "two")]
    assert configs[0].get("rank_pattern") == configs[1].get("rank_pattern")
    assert (configs[0].get("rank_pattern") is not None) == (name == "adalora")
