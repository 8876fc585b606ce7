"""The family matrix: every family of the architecture table (tunelab/arch.py), as a tiny random model built
offline from transformers' own config class and saved with tunelab's tokenizer, goes through the stages a user
runs on it, through the CLI (in this process).

Causal families: pretrain a few steps from model.path, LoRA finetune, export --merge (plain transformers loads
it and computes what tunelab's adapter loader computes), merge the two children (their mean, tensor by
tensor), magnitude prune (exact sparsity on the table's projections), FFN shrink (plain transformers reloads
the smaller model, which computes what the merged one computes with those neurons zeroed), heads shrink where
the table allows it and a one-line refusal naming the family where it does not, eval.
Masked-LM families: MLM training, eval, reload with plain transformers (same logits).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import sys
from pathlib import Path

import pytest
import torch
import yaml
from families import CAUSAL, MASKED, tiny_model
from safetensors.torch import load_file

from tunelab import models, tokenizers
from tunelab.arch import arch_of
from tunelab.runs import read_metrics

pytestmark = [pytest.mark.slow,  # ~10-20 s per family on 2 cores
              pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning"),
              # peft sets fan_in_fan_out itself for gpt2's Conv1D layers, and says so
              pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to False:UserWarning")]

SEQ = 16
TRAIN = {"max_steps": 4, "micro_batch_size": 4, "lr": 1e-2, "log_every": 1, "precision": "fp32",
         "eval_max_tokens": 64, "eval_at_start": True}
# Evaluation and calibration windows of the merge and prune stages, kept tiny.
SMALL = ["eval.seq_len=16", "eval.max_tokens=64"]
CALIBRATION = ["calibration.seq_len=16", "calibration.max_tokens=64"]


def mlm_recipe(name: str, model_dir: Path, corpus: Path) -> dict:
    """The masked-LM training recipe of an encoder family. The one place that spells the MLM objective."""
    return {"name": name, "kind": "pretrain", "model": {"path": str(model_dir)},
            "data": {"train": str(corpus), "seq_len": SEQ},
            "objective": {"name": "mlm", "options": {"mlm_probability": 0.3}}, "train": TRAIN}


def causal_recipe(name: str, model_dir: Path, corpus: Path, **extra) -> dict:
    return {"name": name, "kind": "pretrain", "model": {"path": str(model_dir)},
            "data": {"train": str(corpus), "seq_len": SEQ}, "train": dict(TRAIN), **extra}


def cli(*args) -> tuple[int, str]:
    """`tunelab ARGS` in this process (a subprocess costs seconds of imports): exit code and stderr."""
    from tunelab.commands import cli as tunelab_cli

    stdout, stderr, argv = io.StringIO(), io.StringIO(), sys.argv
    sys.argv = ["tunelab", *map(str, args)]
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = tunelab_cli.main() or 0
    except SystemExit as exc:
        code = exc.code or 0
    finally:
        sys.argv = argv
    return code, stderr.getvalue() + stdout.getvalue()


def train(root: Path, recipe: dict) -> Path:
    path = root / f"{recipe['name']}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = root / recipe["name"]
    code, output = cli("finetune" if recipe["kind"] == "finetune" else "pretrain", path, "--out", out, "--quiet")
    assert code == 0, output[-3000:]
    return out


def sets(*values: str) -> list[str]:
    return [a for v in values for a in ("--set", v)]


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, corpus_dir) -> Path:
    """tunelab's byte-level BPE (eos, pad, mask tokens), trained once on the corpus and shared by every family."""
    texts = [p.read_text() for p in sorted(corpus_dir.rglob("*.txt"))]
    path = tmp_path_factory.mktemp("family-tokenizer")
    tokenizers.train_tokenizer(texts, vocab_size=320).save_pretrained(path)
    return path


def base_model(family: str, tokenizer_dir: Path, root: Path) -> Path:
    """A tiny random model of the family, saved with the shared tokenizer: a directory model.path can name."""
    tok = tokenizers.load_tokenizer(str(tokenizer_dir))
    model = tiny_model(family, vocab_size=len(tok), pad=tok.pad_token_id, eos=tok.eos_token_id)
    path = root / "base"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


def ids_of(model_dir: Path) -> torch.Tensor:
    tok = tokenizers.load_tokenizer(str(model_dir))
    return torch.tensor([tok("the model data token train loss step layer weight")["input_ids"]])


def check_training(run: Path) -> None:
    events = read_metrics(run / "metrics.jsonl")
    losses = [e["loss"] for e in events if e.get("event") == "train"]
    assert len(losses) == TRAIN["max_steps"] and all(math.isfinite(v) for v in losses)
    evals = [e for e in events if e.get("event") == "eval"]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == TRAIN["max_steps"]
    # lr 1e-2 on a random tiny model: 4 steps lower the loss on the same held-out tokens.
    assert evals[-1]["delta_from_start"] < 0, [(e["step"], e["loss"]) for e in evals]


def check_eval(model_dir: Path, corpus: Path) -> None:
    code, output = cli("eval", model_dir, "--data", corpus, "--seq-len", SEQ, "--max-tokens", 64, "--json")
    assert code == 0, output[-3000:]
    found = [float(v) for v in _numbers(json.loads(output[output.index("{"):]), "loss")]
    assert found and all(math.isfinite(v) and v > 0 for v in found), output[-2000:]


def _numbers(tree, key):
    if isinstance(tree, dict):
        for k, v in tree.items():
            if k == key and isinstance(v, (int, float)):
                yield v
            else:
                yield from _numbers(v, key)
    elif isinstance(tree, list):
        for v in tree:
            yield from _numbers(v, key)


@pytest.mark.parametrize("family", CAUSAL)
def test_causal_family(family, tmp_path, tokenizer_dir, corpus_dir):
    from transformers import AutoModelForCausalLM

    spec = arch_of(tiny_model(family), "test")
    base = base_model(family, tokenizer_dir, tmp_path)
    ids = ids_of(base)

    # Two children of the base: continued pretraining, and a LoRA finetune exported with the adapter merged.
    pretrained = train(tmp_path, causal_recipe("pretrain", base, corpus_dir))
    check_training(pretrained)
    child_a = pretrained / "final"
    plain = AutoModelForCausalLM.from_pretrained(child_a, dtype=torch.float32)
    assert torch.equal(logits(plain, ids), logits(models.load_model(str(child_a)), ids))
    lora = train(tmp_path, causal_recipe("lora", base, corpus_dir, kind="finetune",
                                         method={"name": "lora", "options": {"r": 2, "alpha": 4}}))
    check_training(lora)
    child_b = tmp_path / "exported"
    code, output = cli("export", lora / "final", "--merge", "--out", child_b, "--quiet")
    assert code == 0, output[-3000:]
    exported = AutoModelForCausalLM.from_pretrained(child_b, dtype=torch.float32)
    torch.testing.assert_close(logits(exported, ids), logits(models.load_model(str(lora / "final")), ids))
    assert not torch.equal(logits(exported, ids), logits(models.load_model(str(base)), ids))

    # Merge: the mean of the two children, tensor by tensor.
    merged = tmp_path / "merged"
    code, output = cli("merge", child_a, child_b, "--method", "linear", "--data", corpus_dir, *sets(*SMALL),
                       "--out", merged, "--quiet")
    assert code == 0, output[-3000:]
    a, b, m = (load_file(str(d / "model.safetensors")) for d in (child_a, child_b, merged))
    assert m.keys() == a.keys()
    for key in m:
        torch.testing.assert_close(m[key], (a[key] + b[key]) / 2, rtol=1e-6, atol=1e-6)

    # Magnitude pruning: exactly half of each of the table's projections, in every block.
    pruned = tmp_path / "pruned"
    code, output = cli("prune", merged, "--method", "magnitude", "--sparsity", 0.5, "--data", corpus_dir,
                       *sets(*SMALL, *CALIBRATION), "--out", pruned, "--quiet")
    assert code == 0, output[-3000:]
    weights = load_file(str(pruned / "model.safetensors"))
    matrices = [f"{spec.blocks}.{i}.{p}.weight" for i in range(2) for p in spec.projections]
    for name in matrices:
        assert int((weights[name] == 0).sum()) == round(0.5 * weights[name].numel()), name

    # Structured: FFN neurons (every family), heads where the table allows; the model reloads and computes
    # what the merged model computes with the removed units zeroed.
    for what, count in (("ffn", 8), ("heads", 2)):
        out = tmp_path / f"shrunk-{what}"
        code, output = cli("prune", merged, "--method", what, "--count", count, "--data", corpus_dir,
                           *sets(*SMALL, *CALIBRATION), "--out", out, "--quiet")
        if what not in spec.shrinks():
            line = output.strip().splitlines()[-1]
            assert code == 2 and line.startswith(f"error: {what}: cannot remove {what} from {family}: "), output
            assert not out.exists()
            continue
        assert code == 0, output[-3000:]
        small = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        record = json.loads((out / "prune.json").read_text())
        report = next(v for k, v in _dicts(record) if k == "structured")
        reference = _zeroed(AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32), spec, report)
        torch.testing.assert_close(logits(small, ids), logits(reference, ids), rtol=1e-5, atol=1e-5)
        assert models.count_params(small) < models.count_params(reference)

    check_eval(merged, corpus_dir)


def _dicts(tree):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield k, v
            yield from _dicts(v)


def _zeroed(model, spec, report):
    """The model with the report's FFN neurons or heads zeroed at their output projection's inputs."""
    with torch.no_grad():
        for block, entry in zip(spec.block_list(model), report["layers"]):
            if report["what"] == "ffn":
                out, index = block.get_submodule(spec.ffn_out), entry["removed"]
            else:
                out = block.get_submodule(spec.attn_out)
                d = block.get_submodule(spec.attention).head_dim
                index = [h * d + j for h in entry["removed"] for j in range(d)]
            weight = out.weight.T if spec.conv1d else out.weight  # Conv1D stores (in, out)
            weight[:, index] = 0
    return model


@pytest.mark.parametrize("family", MASKED)
def test_masked_family(family, tmp_path, tokenizer_dir, corpus_dir):
    from transformers import AutoModelForMaskedLM

    base = base_model(family, tokenizer_dir, tmp_path)
    run = train(tmp_path, mlm_recipe("mlm", base, corpus_dir))
    check_training(run)
    final = run / "final"
    ids = ids_of(final)
    plain = AutoModelForMaskedLM.from_pretrained(final, dtype=torch.float32)
    assert torch.equal(logits(plain, ids), logits(models.load_model(str(final)), ids))
    assert not torch.equal(logits(plain, ids), logits(models.load_model(str(base)), ids))
    check_eval(final, corpus_dir)
