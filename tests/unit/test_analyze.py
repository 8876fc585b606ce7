"""`tunelab analyze`: the update statistics on constructed matrices (counts, norms, ranks, intruder dimensions
checked by hand and against peft's own detection), then the command on a saved llama-micro pair, a LoRA
adapter, a run, and bad input."""

from __future__ import annotations

import json
import math
import random
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from tunelab import models, tokenizers
from tunelab.commands.analyze import analyze, effective_rank, intruder_dimensions, tensor_stats
from tunelab.errors import ModelError

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
_WORDS = "the model data token train loss step layer weight value cache file text domain batch".split()
QUIET = {"log": lambda *a: None}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Matrices this small only spin a second thread, badly so on a busy machine (5x slower here).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def orthonormal(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))[0]


def entropy_rank_by_hand(values: list[float]) -> float:
    total = sum(values)
    return math.exp(-sum(v / total * math.log(v / total) for v in values))


# ---------------------------------------------------------------- the math


def test_effective_rank_by_hand():
    assert effective_rank([3.0, 2.0, 1.0]) == pytest.approx(math.exp(-(0.5 * math.log(0.5) + math.log(1 / 3) / 3
                                                                     + math.log(1 / 6) / 6)))
    assert effective_rank([2.0, 2.0, 2.0, 2.0]) == pytest.approx(4.0)
    assert effective_rank([5.0, 0.0, 0.0]) == pytest.approx(1.0)
    assert effective_rank([]) == 0.0


def test_known_entries_changed_counts_norm_and_ranks():
    # Multiples of 1/8 and small offsets are exact in float32, so the update is exactly what was added.
    gen = torch.Generator().manual_seed(0)
    base = (torch.randint(-16, 16, (12, 10), generator=gen) / 8).float()
    tuned = base.clone()
    tuned[2, 5] += 1.0
    tuned[7, 1] -= 0.5
    tuned[0, 0] += 0.25
    row = tensor_stats(base, tuned)
    assert row["params"] == 120 and row["changed"] == 3
    assert row["unchanged_share"] == pytest.approx(117 / 120)
    assert row["norm"] == pytest.approx(math.sqrt(1 + 0.25 + 0.0625))
    assert row["relative_norm"] == pytest.approx(row["norm"] / float(base.double().norm()))
    # Three entries in distinct rows and columns: singular values 1, 0.5, 0.25.
    assert row["numerical_rank"] == 3
    assert row["effective_rank"] == pytest.approx(entropy_rank_by_hand([1.0, 0.5, 0.25]))

    vector = torch.zeros(10)
    bumped = vector.clone()
    bumped[3] = 2.0
    bias = tensor_stats(vector, bumped)
    assert (bias["changed"], bias["norm"], bias["relative_norm"], bias["numerical_rank"]) == (1, 2.0, None, None)


@pytest.mark.parametrize("rank", [1, 3, 5])
def test_rank_r_update(rank):
    u, v = orthonormal(40, 1)[:, :rank], orthonormal(30, 2)[:, :rank]
    s = torch.tensor([2.0, 1.0, 0.5, 0.3, 0.2][:rank], dtype=torch.float64)
    base = torch.randn(40, 30, generator=torch.Generator().manual_seed(3))
    tuned = (base.double() + u @ torch.diag(s) @ v.T).float()  # stored in float32: rounding noise, full rank
    row = tensor_stats(base, tuned)
    assert row["numerical_rank"] == rank
    assert row["effective_rank"] == pytest.approx(entropy_rank_by_hand(s.tolist()), rel=1e-4)
    assert row["norm"] == pytest.approx(float(s.norm()), rel=1e-5)
    assert row["changed"] == (tuned != base).sum() and row["changed"] > 0.99 * 40 * 30
    # Rounding noise is far below the tolerance, the smallest real direction far above it.
    assert 1e-7 < row["rank_tolerance"] < 1e-4


def spread_base(n: int, seed: int = 0):
    """W = U diag(s) V^T with known distinct singular values from 10 down to 1."""
    u, v = orthonormal(n, seed), orthonormal(n, seed + 1)
    s = torch.linspace(10, 1, n, dtype=torch.float64)
    return u, s, v, (u @ torch.diag(s) @ v.T).float()


@pytest.mark.parametrize("planted", [1, 2, 3])
def test_intruders_count_the_constructed_directions(planted):
    # Each planted direction is an even mix of 8 base singular vectors outside the top 10, so its |cos|
    # with any base singular vector is about 1/sqrt(8) = 0.35 < 0.5; its singular value (50+) puts it
    # at the top of the tuned spectrum. The update touches nothing else: the other top vectors stay base ones.
    n = 48
    u, s, v, base = spread_base(n)
    update = torch.zeros(n, n, dtype=torch.float64)
    for j in range(planted):
        group = slice(12 + 8 * j, 20 + 8 * j)
        x, y = u[:, group].sum(1) / math.sqrt(8), v[:, group].sum(1) / math.sqrt(8)
        update += (50.0 + 10 * j) * torch.outer(x, y)
    tuned = (base.double() + update).float()
    count, max_cos = intruder_dimensions(base, tuned)
    assert count == planted
    assert len(max_cos) == 10
    assert all(c < 0.45 for c in max_cos[:planted]) and all(c > 0.99 for c in max_cos[planted:])
    row = tensor_stats(base, tuned)
    assert (row["intruders"], row["numerical_rank"]) == (planted, planted)
    # --top-k and --threshold: fewer vectors checked, or a threshold below the planted |cos|.
    assert intruder_dimensions(base, tuned, top_k=1)[0] == 1
    assert intruder_dimensions(base, tuned, threshold=0.2)[0] == 0


def test_no_intruders_against_itself_or_along_a_base_direction():
    _, _, _, base = spread_base(32)
    assert intruder_dimensions(base, base.clone())[0] == 0
    assert tensor_stats(base, base.clone())["intruders"] == 0
    # A large rank-1 update along a base singular pair moves that pair to the top, but it is a base direction.
    u, s, v, base = spread_base(32, seed=5)
    tuned = (base.double() + 80.0 * torch.outer(u[:, 20], v[:, 20])).float()
    count, max_cos = intruder_dimensions(base, tuned)
    assert count == 0 and max_cos[0] > 0.999


def test_detection_matches_peft_reduce_intruder_dimension():
    """peft 0.21's reduce_intruder_dimension (a LoRA mitigation) logs each layer's intruder count; ours agrees."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora.intruders import reduce_intruder_dimension

    tokenizer = small_tokenizer()
    torch.manual_seed(0)
    model = get_peft_model(models.build_model("llama-micro", tokenizer),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    gen = torch.Generator().manual_seed(1)
    ours = {}
    with torch.no_grad():
        for name, layer in model.named_modules():
            if isinstance(layer, LoraLayer):  # a random B: some layers get intruders, some none
                b = layer.lora_B["default"].weight
                b.copy_(torch.randn(b.shape, generator=gen) * 0.02)
                w = layer.get_base_layer().weight
                ours[name] = intruder_dimensions(w, w + layer.get_delta_weight("default"))[0]
    logged = []
    reduce_intruder_dimension(model, logging_sink=logged.append)
    theirs = {}
    for line in logged:  # "<module>: Intruders: 2" or "<module>: No intruders"
        name, what = line.split(": ")[0], line.split(": ")[-1]
        if name in ours:
            theirs[name] = 0 if what == "No intruders" else int(what)
    assert theirs == ours
    assert 0 in ours.values() and max(ours.values()) > 0


# ---------------------------------------------------------------- saved models and the command


def small_tokenizer():
    rng = random.Random(0)
    texts = [" ".join(rng.choice(_WORDS) for _ in range(60)) + "." for _ in range(80)]
    return tokenizers.train_tokenizer(texts, vocab_size=300)


def save_model(path: Path, tokenizer, seed: int = 0, **overrides) -> Path:
    torch.manual_seed(seed)
    models.build_model("llama-micro", tokenizer, overrides).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


Q = "model.layers.0.self_attn.q_proj.weight"
DOWN = "model.layers.1.mlp.down_proj.weight"
NORM = "model.layers.0.input_layernorm.weight"


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """base: a saved llama-micro; tuned: the same with a rank-1 update on one matrix, 5 entries of another and
    one norm gain changed."""
    root = tmp_path_factory.mktemp("analyze")
    tokenizer = small_tokenizer()
    base = save_model(root / "base", tokenizer)
    tuned = root / "tuned"
    shutil.copytree(base, tuned)
    tensors = load_file(str(tuned / "model.safetensors"))
    x = torch.linspace(0.5, 1.0, tensors[Q].shape[0])
    y = torch.linspace(-1.0, -0.5, tensors[Q].shape[1])
    tensors[Q] = tensors[Q] + 0.3 * torch.outer(x, y)  # no zero entry: every entry moves by >= 0.075
    for i in range(5):
        tensors[DOWN][i, 2 * i] += 0.5
    tensors[NORM][3] += 1.0
    save_file(tensors, str(tuned / "model.safetensors"), metadata={"format": "pt"})
    return SimpleNamespace(root=root, base=base, tuned=tuned, tokenizer=tokenizer,
                           numel={k: v.numel() for k, v in tensors.items()})


def cli(monkeypatch, capsys, *args: str):
    """`tunelab ...` in this process (main(): typer parsing, one-line errors, exit codes): (code, out, err)."""
    from tunelab.commands import cli as tunelab_cli

    monkeypatch.setattr(sys, "argv", ["tunelab", *args])
    code = 0
    try:
        tunelab_cli.main()
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_a_model_against_itself(pair):
    result = analyze(str(pair.base), str(pair.base), **QUIET)
    assert result["changed"] == 0 and result["intruders"] == 0 and result["matrices_changed"] == 0
    assert result["mean_effective_rank"] is None
    assert all(r["changed"] == 0 and r["intruders"] in (0, None) for r in result["rows"])
    assert result["params"] == sum(pair.numel.values())


def test_cli_on_a_known_perturbation(pair, monkeypatch, capsys):
    code, out, err = cli(monkeypatch, capsys, "analyze", str(pair.base), str(pair.tuned), "--json")
    assert code == 0 and err == ""  # --json: nothing but the JSON
    result = json.loads(out)
    rows = {r["name"]: r for r in result["rows"]}
    assert rows[Q]["changed"] == pair.numel[Q] and rows[Q]["numerical_rank"] == 1
    assert rows[Q]["effective_rank"] == pytest.approx(1.0)
    assert rows[DOWN]["changed"] == 5 and rows[DOWN]["numerical_rank"] == 5
    assert rows[DOWN]["norm"] == pytest.approx(math.sqrt(5 * 0.25), rel=1e-6)
    assert rows[DOWN]["effective_rank"] == pytest.approx(5.0, rel=1e-6)  # five equal singular values
    assert rows[NORM]["changed"] == 1 and rows[NORM]["numerical_rank"] is None
    assert result["changed"] == pair.numel[Q] + 5 + 1
    assert result["tensors_changed"] == 3 and result["matrices_changed"] == 2
    assert result["mean_effective_rank"] == pytest.approx(3.0, rel=1e-6)
    assert result["trainable"] is None  # a bare model directory records nothing
    assert len(result["rows"]) == len(pair.numel)  # every tensor, in --json
    norms = [r["relative_norm"] for r in result["rows"]]
    assert norms == sorted(norms, reverse=True)

    code, out, _ = cli(monkeypatch, capsys, "analyze", str(pair.base), str(pair.tuned), "--limit", "3")
    assert code == 0
    assert "3 of 15 matrices shown" in out  # 7 linear layers x 2 blocks + the (tied) embedding
    body = [line for line in out.splitlines() if "│ model." in line]
    assert len(body) == 3 and Q in body[0]
    assert f"changed {result['changed']:,} of" in out and "intruder dimensions" in out


def test_a_run_reports_what_it_recorded(pair, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(pair.tuned, run / "final")
    (run / "metrics.jsonl").write_text(json.dumps({"event": "model", "parameters": 12345, "trainable": 6789,
                                                   "method": "full"}) + "\n")
    result = analyze(str(pair.base), str(run), **QUIET)
    assert (result["trainable"], result["trainable_source"]) == (6789, "run/metrics.jsonl")
    assert result["tuned"] == str(run / "final")


def test_cli_on_a_lora_adapter(pair, monkeypatch, capsys):
    """An adapter trained a few steps by the lora method and saved as the finetune stage saves it."""
    from tunelab.methods import create_method
    from tunelab.methods.base import lm_loss
    from tunelab.methods.base import MethodContext

    base_model = models.load_model(str(pair.base))
    recipe = SimpleNamespace(model=SimpleNamespace(path=str(pair.base)))
    ctx = MethodContext(device=torch.device("cpu"), dist=None, recipe=recipe, tokenizer=pair.tokenizer, max_steps=4,
                        seed=0, base_sha256=models.weights_sha256(base_model))
    method = create_method("lora", {"r": 4, "alpha": 8})
    torch.manual_seed(0)
    model = method.prepare(base_model, ctx)
    ids = torch.tensor(pair.tokenizer(" ".join(_WORDS * 12))["input_ids"][:128]).reshape(4, 32)
    optimizer = torch.optim.AdamW([p for _, p in method.trainable_params(model)], lr=1e-2)
    for _ in range(4):
        lm_loss(model, {"input_ids": ids, "labels": ids}).backward()
        optimizer.step()
        optimizer.zero_grad()
    adapter = pair.root / "lora-final"
    adapter.mkdir()
    method.save_final(model, pair.tokenizer, adapter)
    lora_params = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)

    code, out, _ = cli(monkeypatch, capsys, "analyze", str(pair.base), str(adapter), "--json")
    assert code == 0
    result = json.loads(out)
    assert result["tuned_is_adapter"] and (result["trainable"], result["trainable_source"]) == (lora_params,
                                                                                              "adapter tensors")
    changed = {r["name"] for r in result["rows"] if r["changed"]}
    linear = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert changed == {f"model.layers.{i}.{'self_attn' if m[0] in 'qkvo' else 'mlp'}.{m}.weight"
                       for i in range(2) for m in linear}
    for r in result["rows"]:
        if r["changed"]:  # a rank-4 adapter: the merged update has rank <= 4
            assert 1 <= r["numerical_rank"] <= 4 and r["effective_rank"] <= r["numerical_rank"] + 1e-9

    # An adapter on a base other than the one it was trained on: the recorded hash refuses it.
    other = save_model(pair.root / "other-base", pair.tokenizer, seed=1)
    code, _, err = cli(monkeypatch, capsys, "analyze", str(other), str(adapter))
    assert code == 2 and "Traceback" not in err
    assert err.splitlines()[-1].startswith("error: TUNED:") and "the adapter expects" in err


@pytest.mark.parametrize("overrides, names", [({"num_hidden_layers": 1}, "has tensor model.layers.1."),
                                              ({"intermediate_size": 48}, "tensor model.layers.0.mlp.down_proj.weight")])
def test_different_architectures_are_one_line_errors(pair, overrides, names, monkeypatch, capsys):
    other = save_model(pair.root / f"other-{next(iter(overrides))}", pair.tokenizer, **overrides)
    code, out, err = cli(monkeypatch, capsys, "analyze", str(pair.base), str(other))
    assert code == 2 and out == "" and err.count("\n") == 1
    assert err.startswith("error: models differ:") and names in err
    with pytest.raises(ModelError, match="does not exist"):
        analyze(str(pair.base), str(pair.root / "missing"), **QUIET)
