"""LoRA through peft: options, frozen base, adapter-only checkpoints, PEFT/HF round trips, export, hashes."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tunelab import models, paths, tokenizers
from tunelab.errors import ConfigError, ModelError, TunelabError
from tunelab.commands.export import export_model
from tunelab.runs import weight_files_sha256
from tunelab.methods import create_method
from tunelab.methods.base import MethodContext, lm_loss

_WORDS = "the model data token train loss step layer weight value cache file text domain batch".split()
# peft 0.21 reads a property transformers 5 deprecated, in PeftModel.from_pretrained called directly below.
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
LLAMA_LINEAR = ("down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj")


@pytest.fixture(scope="module")
def tokenizer():
    rng = random.Random(0)
    texts = [" ".join(rng.choice(_WORDS) for _ in range(60)) + "." for _ in range(80)]
    return tokenizers.train_tokenizer(texts, vocab_size=300)


def save_base(path: Path, preset: str, tokenizer, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    models.build_model(preset, tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, tokenizer) -> Path:
    return save_base(tmp_path_factory.mktemp("base") / "llama", "llama-micro", tokenizer)


def context(path, tokenizer, base_sha256=None) -> MethodContext:
    recipe = SimpleNamespace(model=SimpleNamespace(path=None if path is None else str(path)))
    return MethodContext(device=torch.device("cpu"), dist=None, recipe=recipe, tokenizer=tokenizer, max_steps=10,
                         seed=0, base_sha256=base_sha256)


def prepared(base_dir, tokenizer, seed: int = 0, **options):
    """(method, peft model) on a freshly loaded base, as the finetune stage builds them."""
    base = models.load_model(str(base_dir))
    method = create_method("lora", options)
    torch.manual_seed(seed)
    model = method.prepare(base, context(base_dir, tokenizer, models.weights_sha256(base)))
    return method, model


def make_batch(tokenizer, mlm: bool = False) -> dict:
    rng = random.Random(1)
    ids = tokenizer(" ".join(rng.choice(_WORDS) for _ in range(400)))["input_ids"][:4 * 32]
    ids = torch.tensor(ids).reshape(4, 32)
    if not mlm:
        return {"input_ids": ids, "labels": ids.clone()}
    gen = torch.Generator().manual_seed(0)
    masked = torch.rand(ids.shape, generator=gen) < 0.15
    masked[:, 0] = True
    return {"input_ids": ids.masked_fill(masked, tokenizer.mask_token_id),
            "labels": ids.masked_fill(~masked, -100)}


def train(method, model, batch, steps: int = 8, lr: float = 1e-2) -> list[float]:
    model.train()
    opt = torch.optim.AdamW([p for _, p in method.trainable_params(model)], lr=lr)
    losses = []
    for _ in range(steps):
        loss = lm_loss(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def logits(model, batch) -> torch.Tensor:
    model.eval()
    return model(input_ids=batch["input_ids"]).logits


@pytest.fixture(scope="module")
def trained(tmp_path_factory, base_dir, tokenizer):
    """A LoRA adapter trained a few steps on llama-micro and saved with save_final."""
    method, model = prepared(base_dir, tokenizer, r=4, alpha=8)
    batch = make_batch(tokenizer)
    losses = train(method, model, batch)
    final = tmp_path_factory.mktemp("run") / "final"
    final.mkdir()
    method.save_final(model, tokenizer, final)
    return SimpleNamespace(method=method, model=model, batch=batch, losses=losses, final=final,
                           logits=logits(model, batch))


# ---------------------------------------------------------------- options and set-up


def test_module_imports_neither_torch_nor_peft():
    code = ("import sys, tunelab.methods.lora as m; m.LoRA({'r': 4}); "
            "assert 'torch' not in sys.modules and 'peft' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("options,field", [
    ({"r": 0}, "r"), ({"r": 2.5}, "r"), ({"alpha": 0}, "alpha"), ({"dropout": 1.5}, "dropout"),
    ({"dropout": -0.1}, "dropout"), ({"bias": "some"}, "bias"), ({"target_modules": []}, "target_modules"),
    ({"rank": 4}, "rank"),
])
def test_options_are_validated(options, field):
    with pytest.raises(ConfigError) as err:
        create_method("lora", options)
    msg = str(err.value)
    assert "\n" not in msg and field in msg and "lora" in msg


def test_option_defaults():
    opts = create_method("lora", {}).options
    assert (opts.r, opts.alpha, opts.dropout, opts.target_modules) == (8, 16.0, 0.0, "all-linear")
    assert (opts.use_rslora, opts.use_dora, opts.bias) == (False, False, "none")
    assert create_method("lora", {"target_modules": "q_proj"}).options.target_modules == ["q_proj"]


def test_unknown_target_module_lists_the_real_ones(base_dir, tokenizer):
    base = models.load_model(str(base_dir))
    with pytest.raises(ConfigError) as err:
        create_method("lora", {"target_modules": ["q_proj", "qproj"]}).prepare(base, context(base_dir, tokenizer))
    msg = str(err.value)
    assert "\n" not in msg and "'qproj'" in msg and "LlamaForCausalLM" in msg
    assert all(name in msg for name in LLAMA_LINEAR)
    with pytest.raises(ConfigError, match="'input_layernorm' is a LlamaRMSNorm, which LoRA cannot adapt"):
        create_method("lora", {"target_modules": ["input_layernorm"]}).prepare(base, context(base_dir, tokenizer))
    assert not any("lora_" in n for n, _ in base.named_parameters())  # nothing was wrapped


def test_lora_needs_a_trained_model(tokenizer):
    model = models.build_model("llama-micro", tokenizer)
    with pytest.raises(ConfigError, match=r"method lora adapts a trained model: set model.path \(e.g. "):
        create_method("lora", {}).prepare(model, context(None, tokenizer))


@pytest.mark.parametrize("targets,n_modules", [("all-linear", 7 * 2), (["q_proj", "self_attn.v_proj"], 2 * 2)])
def test_only_lora_factors_are_trainable(base_dir, tokenizer, targets, n_modules):
    method, model = prepared(base_dir, tokenizer, target_modules=targets)
    names = [n for n, _ in method.trainable_params(model)]
    assert names == [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(names) == 2 * n_modules
    assert all(".lora_A." in n or ".lora_B." in n for n in names)
    assert not any("lm_head" in n or "embed" in n for n in names)  # all-linear leaves the LM head alone


# ---------------------------------------------------------------- training


def test_training_moves_only_the_adapter(base_dir, tokenizer):
    base = models.load_model(str(base_dir))
    before = {n: (p, p.detach().clone()) for n, p in base.named_parameters()}
    method = create_method("lora", {"r": 4})
    torch.manual_seed(0)
    model = method.prepare(base, context(base_dir, tokenizer))
    lora_before = {n: p.detach().clone() for n, p in method.trainable_params(model)}
    losses = train(method, model, make_batch(tokenizer))
    assert losses[-1] < losses[0] - 0.1, losses
    # peft wraps the base's own Linear modules: the very same parameters, bit-identical after training.
    frozen = {id(p) for n, p in model.named_parameters() if not p.requires_grad}
    for name, (param, copy) in before.items():
        assert id(param) in frozen, name
        assert torch.equal(param, copy), name
    for name, param in method.trainable_params(model):
        assert not torch.equal(param, lora_before[name]), name  # A and B both moved


def test_weights_to_save_round_trip(trained, base_dir, tokenizer):
    saved = trained.method.weights_to_save(trained.model)
    assert len(saved) == 2 * 7 * 2
    assert all(".lora_A." in k or ".lora_B." in k for k in saved)
    assert not any("base_layer" in k or ".default." in k for k in saved)
    # A fresh model whose LoRA init differs (another seed), then the saved tensors: the same function.
    method, fresh = prepared(base_dir, tokenizer, seed=123, r=4, alpha=8)
    assert not torch.equal(logits(fresh, trained.batch), trained.logits)
    method.load_weights(fresh, saved)
    torch.testing.assert_close(logits(fresh, trained.batch), trained.logits, rtol=0, atol=0)


def test_load_weights_refuses_missing_or_foreign_tensors(trained, base_dir, tokenizer):
    saved = trained.method.weights_to_save(trained.model)
    method, fresh = prepared(base_dir, tokenizer, r=4, alpha=8)
    missing = dict(list(saved.items())[1:])
    with pytest.raises(RuntimeError, match="1 missing"):
        method.load_weights(fresh, missing)
    with pytest.raises(RuntimeError, match="1 unexpected"):
        method.load_weights(fresh, {**saved, "base_model.model.extra.lora_A.weight": torch.zeros(1)})


# ---------------------------------------------------------------- final adapter, loading, export


def test_save_final_is_a_plain_peft_adapter(trained, base_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    final = trained.final
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tunelab_adapter.json"):
        assert (final / name).is_file(), name
    assert not (final / "model.safetensors").exists()
    config = json.loads((final / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base_dir.resolve())
    assert (config["r"], config["lora_alpha"], config["peft_type"]) == (4, 8, "LORA")
    info = json.loads((final / "tunelab_adapter.json").read_text())
    assert info == {"method": "lora", "base": str(base_dir.resolve()),
                    "base_weights_sha256": models.weights_sha256(models.load_model(str(base_dir)))}

    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), final)
    torch.testing.assert_close(logits(peft_model, trained.batch), trained.logits, rtol=0, atol=1e-6)
    # And through tunelab's own loader, which every command uses.
    assert paths.is_adapter_dir(final) and not paths.is_adapter_dir(base_dir)
    loaded = models.load_model(str(final))
    assert not loaded.training
    torch.testing.assert_close(logits(loaded, trained.batch), trained.logits, rtol=0, atol=1e-6)
    assert models.max_positions(loaded) == 2048 and not models.is_encoder(loaded)
    models.check_pair(loaded, tokenizers.load_tokenizer(str(final)), 32)
    merged = models.load_model(str(final), merge=True)
    assert type(merged).__name__ == "LlamaForCausalLM"
    torch.testing.assert_close(logits(merged, trained.batch), trained.logits, rtol=0, atol=1e-4)


def test_export_merge_loads_with_plain_transformers(trained, base_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = export_model(trained.final, tmp_path / "merged", merge=True, log=lambda *a: None)
    exported = AutoModelForCausalLM.from_pretrained(out)
    assert len(AutoTokenizer.from_pretrained(out)) == 300
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), trained.final).merge_and_unload()
    torch.testing.assert_close(logits(exported, trained.batch), logits(merged, trained.batch), rtol=0, atol=1e-5)
    torch.testing.assert_close(logits(exported, trained.batch), trained.logits, rtol=0, atol=1e-4)

    lineage = json.loads((out / "lineage.json").read_text())  # the schema of tunelab/lineage.py (version 2)
    assert lineage == {"schema_version": 2, "stage": "export", "name": "merged", "merged": True, "parents": [
        {"role": "base", "path": str(base_dir.resolve()), "weights_sha256": weight_files_sha256(base_dir),
         "weights_sha256_in_memory": models.weights_sha256(AutoModelForCausalLM.from_pretrained(base_dir))},
        {"role": "adapter", "path": str(trained.final.resolve()), "label": trained.final.parent.name,
         "weights_sha256": weight_files_sha256(trained.final)}]}


def test_export_of_a_run_directory_and_of_a_full_model(trained, base_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    # A run directory stands for its final/.
    out = export_model(trained.final.parent, tmp_path / "from-run", merge=True, log=lambda *a: None)
    assert json.loads((out / "lineage.json").read_text())["merged"] is True
    # A full model is copied; --merge has nothing to fold in.
    out = export_model(base_dir, tmp_path / "copy", log=lambda *a: None)
    lineage = json.loads((out / "lineage.json").read_text())
    assert lineage["merged"] is False and lineage["parents"][0]["role"] == "model"
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(out), trained.batch),
                               logits(AutoModelForCausalLM.from_pretrained(base_dir), trained.batch), rtol=0, atol=0)


def test_export_refusals(trained, tmp_path):
    with pytest.raises(ModelError, match="is a LoRA adapter; pass --merge") as err:
        export_model(trained.final, tmp_path / "x", log=lambda *a: None)
    assert "\n" not in str(err.value) and not (tmp_path / "x").exists()
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    with pytest.raises(TunelabError, match="already exists and is not empty"):
        export_model(trained.final, occupied, merge=True, log=lambda *a: None)
    assert [p.name for p in occupied.iterdir()] == ["keep.txt"] and (occupied / "keep.txt").read_text() == "mine"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (export_model(trained.final, empty, merge=True, log=lambda *a: None) / "config.json").is_file()
    assert not list(tmp_path.glob(".*tmp*"))


def test_adapter_on_a_different_base_is_refused(trained, base_dir, tokenizer, tmp_path):
    other = save_base(tmp_path / "other-base", "llama-micro", tokenizer, seed=1)
    moved = tmp_path / "adapter"
    shutil.copytree(trained.final, moved)
    config = json.loads((moved / "adapter_config.json").read_text())
    (moved / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(other)}))
    with pytest.raises(ModelError, match=r"was trained on a different base \(hash mismatch\)") as err:
        models.load_model(str(moved))
    assert "\n" not in str(err.value)
    with pytest.raises(ModelError, match="hash mismatch"):
        models.load_model(str(trained.final), base=str(other))
    # The right base passed explicitly is accepted; a base that is gone is named, with the fix.
    torch.testing.assert_close(logits(models.load_model(str(moved), base=str(base_dir)), trained.batch),
                               trained.logits, rtol=0, atol=1e-6)
    gone = {**config, "base_model_name_or_path": str(tmp_path / "gone")}
    (moved / "adapter_config.json").write_text(json.dumps(gone))
    with pytest.raises(ModelError, match=r"base model .*gone does not exist; pass the base model directory"):
        models.load_model(str(moved))


def test_an_adapter_on_an_adapter(trained, tokenizer, tmp_path):
    """A finetune of a LoRA run starts from the merged model; its adapter's base is the first adapter dir."""
    start = models.load_model(str(trained.final), merge=True)
    method = create_method("lora", {"r": 2, "target_modules": ["q_proj"]})
    torch.manual_seed(0)
    model = method.prepare(start, context(trained.final, tokenizer, models.weights_sha256(start)))
    train(method, model, trained.batch, steps=3)
    expected = logits(model, trained.batch)
    method.save_final(model, tokenizer, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        str(trained.final.resolve())
    torch.testing.assert_close(logits(models.load_model(str(tmp_path)), trained.batch), expected, rtol=0, atol=1e-6)
    with pytest.raises(TypeError, match="merge=True"):  # the caller's bug, said plainly
        create_method("lora", {}).prepare(models.load_model(str(trained.final)), context(trained.final, tokenizer))


def test_load_tokenizer_of_an_adapter(trained, base_dir, tmp_path):
    assert len(tokenizers.load_tokenizer(str(trained.final))) == 300
    bare = tmp_path / "bare"  # a PEFT adapter without a tokenizer: its base's
    bare.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(trained.final / name, bare / name)
    assert len(tokenizers.load_tokenizer(str(bare))) == 300


def test_eval_and_generate_accept_an_adapter_dir(trained, corpus_dir, tmp_path):
    from tunelab.commands.evaluate import evaluate_model, generate_text

    quiet = dict(seq_len=32, max_tokens=512, log=lambda *a: None)
    got = evaluate_model(str(trained.final), [str(corpus_dir)], **quiet)
    merged = export_model(trained.final, tmp_path / "merged", merge=True, log=lambda *a: None)
    expected = evaluate_model(str(merged), [str(corpus_dir)], **quiet)
    assert got.keys() == expected.keys() and len(got) == 1
    for domain in got:
        assert got[domain]["eval_tokens"] == expected[domain]["eval_tokens"] > 0
        assert got[domain]["loss"] == pytest.approx(expected[domain]["loss"], abs=1e-4)
    text = generate_text(str(trained.final), "the model", max_new_tokens=8, greedy=True)
    assert isinstance(text, str) and text.startswith("the model")


# ---------------------------------------------------------------- variants and encoders


@pytest.mark.parametrize("options", [{"use_dora": True}, {"use_rslora": True, "r": 16, "alpha": 4},
                                     {"use_dora": True, "target_modules": ["q_proj", "v_proj"], "dropout": 0.1}])
def test_variants_train_and_round_trip(base_dir, tokenizer, tmp_path, options):
    method, model = prepared(base_dir, tokenizer, **options)
    batch = make_batch(tokenizer)
    losses = train(method, model, batch)
    assert losses[-1] < losses[0], losses
    saved = method.weights_to_save(model)
    if options.get("use_dora"):
        assert any("lora_magnitude_vector" in k for k in saved)
    if options.get("use_rslora"):  # rank-stabilised scale alpha / sqrt(r)
        layer = model.base_model.model.model.layers[0].self_attn.q_proj
        assert layer.scaling["default"] == pytest.approx(4 / 16 ** 0.5)
    expected = logits(model, batch)
    fresh_method, fresh = prepared(base_dir, tokenizer, seed=5, **options)
    fresh_method.load_weights(fresh, saved)
    torch.testing.assert_close(logits(fresh, batch), expected, rtol=0, atol=0)
    method.save_final(model, tokenizer, tmp_path)
    torch.testing.assert_close(logits(models.load_model(str(tmp_path)), batch), expected, rtol=0, atol=1e-6)


def test_encoder_with_mlm_head(tokenizer, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForMaskedLM

    base_dir = save_base(tmp_path / "bert", "bert-tiny", tokenizer)
    method, model = prepared(base_dir, tokenizer, r=4)
    names = [n for n, _ in method.trainable_params(model)]
    # 6 linear layers per block x 2 blocks + the head's transform; the tied decoder stays frozen.
    assert len(names) == 2 * 13 and not any("decoder" in n for n in names)
    batch = make_batch(tokenizer, mlm=True)
    losses = train(method, model, batch)
    assert losses[-1] < losses[0], losses
    expected = logits(model, batch)
    method.save_final(model, tokenizer, tmp_path / "final")
    loaded = models.load_model(str(tmp_path / "final"))
    assert models.is_encoder(loaded) and isinstance(loaded, PeftModel)
    torch.testing.assert_close(logits(loaded, batch), expected, rtol=0, atol=1e-6)
    out = export_model(tmp_path / "final", tmp_path / "merged", merge=True, log=lambda *a: None)
    torch.testing.assert_close(logits(AutoModelForMaskedLM.from_pretrained(out), batch), expected, rtol=0, atol=1e-4)


# ---------------------------------------------------------------- sizes and hashes


def test_adapter_checkpoint_is_small(tmp_path):
    from safetensors.torch import save_file, save_model

    class Tok:  # build_model needs only a length and special ids
        pad_token_id, eos_token_id = 1, 0

        def __len__(self):
            return 4096

    torch.manual_seed(0)
    model = models.build_model("llama-small", Tok())
    save_model(model, str(tmp_path / "full.safetensors"))
    method = create_method("lora", {})
    peft_model = method.prepare(model, context("base-dir", None, base_sha256="0" * 64))
    save_file(method.weights_to_save(peft_model), str(tmp_path / "adapter.safetensors"))
    full, adapter = (tmp_path / "full.safetensors").stat().st_size, (tmp_path / "adapter.safetensors").stat().st_size
    print(f"llama-small: full model {full / 1e6:.1f} MB, LoRA r=8 adapter {adapter / 1e6:.2f} MB "
          f"({100 * adapter / full:.1f}%)")
    assert full > 60e6 and adapter < 0.1 * full


def test_weights_sha256(base_dir, tokenizer):
    model = models.load_model(str(base_dir))
    digest = models.weights_sha256(model)
    assert len(digest) == 64 and digest == models.weights_sha256(model.state_dict())
    torch.manual_seed(0)
    assert models.weights_sha256(models.build_model("llama-micro", tokenizer)) == digest  # the unsaved original
    # Tied embeddings are hashed once: the same as the state dict without the LM head's alias.
    state = model.state_dict()
    assert state["lm_head.weight"].data_ptr() == state["model.embed_tokens.weight"].data_ptr()
    untied = {k: v.clone() for k, v in state.items()}
    assert models.weights_sha256(untied) != digest
    del untied["model.embed_tokens.weight"]
    assert models.weights_sha256(untied) == digest
    with torch.no_grad():
        model.model.norm.weight[0] += 1e-3
    changed = models.weights_sha256(model)
    assert changed != digest
    assert models.weights_sha256(model.to(torch.bfloat16)) != changed  # dtype is part of the identity
