"""Every shipped recipe and pipeline runs end to end at toy scale; the quickstart works offline."""

from __future__ import annotations

import json

import pytest
import yaml

from conftest import pairs_file, run_cli
from tunelab.config import RECIPES_DIR
from tunelab.objectives import objective_class
from tunelab.runs import read_metrics

RECIPES = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
# Scale knobs only: what the recipe trains, how, and on which eval domains stays as shipped.
TOY = ["--set", "train.max_steps=3", "--set", "train.micro_batch_size=2", "--set", "data.seq_len=32",
       "--set", "train.eval_max_tokens=256", "--set", "tokenizer.train_bytes=100000",
       "--set", "train.grad_accum=1"]


def recipe_kind(name: str) -> str:
    return yaml.safe_load((RECIPES_DIR / f"{name}.yaml").read_text()).get("kind", "pretrain")


@pytest.fixture(scope="module")
def toy_base(tmp_path_factory, corpus_dir):
    """A quickstart run at toy scale on the test corpus: the trained model finetune recipes start from."""
    out = tmp_path_factory.mktemp("base") / "run"
    result = run_cli("pretrain", "quickstart", "--out", str(out), "--quiet", *TOY,
                     "--set", f"data.train={corpus_dir}", "--set", "data.eval=[]")
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES)
def test_shipped_recipe_at_toy_scale(tmp_path, corpus_dir, recipe, request):
    # Each recipe runs as the command its kind names; a finetune starts from a toy trained model.
    kind = recipe_kind(recipe)
    shipped = yaml.safe_load((RECIPES_DIR / f"{recipe}.yaml").read_text())
    extra = ["--set", f"model.path={request.getfixturevalue('toy_base') / 'final'}"] if kind == "finetune" else []
    if "init_from" in shipped:  # continued pretraining: from the toy run instead of runs/quickstart
        extra += ["--set", f"init_from={request.getfixturevalue('toy_base')}"]
    if shipped.get("train", {}).get("schedule", {}).get("name") == "infinite":  # its phases must fit in 3 steps
        extra += ["--set", "train.schedule.warmup_steps=1", "--set", "train.schedule.cooldown_steps=1"]
    # The overrides every training recipe must accept: max_steps, seed, checkpoint_every, log_every, data.train
    # (a preference objective's: pairs made from the same corpus).
    train = corpus_dir
    if objective_class(shipped.get("objective", {}).get("name") or "clm").data_format == "preference":
        train = f"[{{source: {pairs_file(corpus_dir)}, format: preference}}]"
    result = run_cli(kind, recipe, "--out", str(tmp_path / "run"), "--quiet", *TOY, *extra,
                     "--set", "train.seed=1", "--set", "train.checkpoint_every=2", "--set", "train.log_every=1",
                     "--set", f"data.train={train}")
    assert result.returncode == 0, result.stderr[-3000:]
    events = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [e["step"] for e in events if e["event"] == "train"] == [1, 2, 3]
    domain = "corpus" if train == corpus_dir else "corpus-pairs"
    assert {e["domain"] for e in events if e["event"] == "eval"} >= {domain}
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-2", "step-3"]
    # final/ is a model, or for an adapter method (lora) a PEFT adapter directory.
    final = tmp_path / "run" / "final"
    assert (final / "config.json").is_file() or (final / "adapter_config.json").is_file()
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["kind"] == kind


def test_every_shipped_recipe_names_a_known_kind():
    from tunelab.stages import STAGES

    assert {recipe_kind(r) for r in RECIPES} <= set(STAGES)
    assert "finetune" in {recipe_kind(r) for r in RECIPES}  # the toy test above covers both kinds


@pytest.mark.slow
def test_shipped_pipeline_at_toy_scale_and_skips_done_stages(tmp_path, corpus_dir):
    shipped = RECIPES_DIR / "pipelines" / "quickstart-to-code.yaml"
    # --set scales the training stages; eval stages get the same scale knobs in a copy of the pipeline
    # (an eval stage scores a domain the model did not train on whole: 4.6M tokens of code, ~35 s each).
    spec = yaml.safe_load(shipped.read_text())
    for stage in spec["stages"]:
        if "eval" in stage:
            stage.update(seq_len=32, max_tokens=2048)
    pipeline = tmp_path / "quickstart-to-code.yaml"
    pipeline.write_text(yaml.safe_dump(spec, sort_keys=False))
    args = ["run", str(pipeline), "--out", str(tmp_path / "pipe"), *TOY, "--set", "tokenizer.vocab_size=512"]
    first = run_cli(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    root = tmp_path / "pipe"
    stages = yaml.safe_load(pipeline.read_text())["stages"]
    for stage in ("base", "code-full", "code-bitfit"):
        assert (root / stage / "final" / "config.json").is_file(), stage
    assert (root / "code-lora" / "final" / "adapter_config.json").is_file()
    # The adapted models start from the base stage's output, and say so.
    for stage in ("code-full", "code-bitfit", "code-lora"):
        lineage = json.loads((root / stage / "lineage.json").read_text())
        assert lineage["parents"][0]["path"] == str((root / "base" / "final").resolve()), stage
    for stage in ("score-base", "score-code-full", "score-code-bitfit", "score-code-lora"):
        scores = json.loads((root / stage / "eval.json").read_text())
        scored = scores.pop("model")  # eval.json names the model it scored (the report links the two)
        assert scored["path"] == str((root / stage.removeprefix("score-") / "final").resolve()), stage
        assert scored["weights_sha256"] and len(scored["weights_sha256"]) == 64, stage
        assert set(scores) == {"prose", "code"} and all(v["bpb"] > 0 for v in scores.values()), stage

    second = run_cli(*args)
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stdout.count("up to date, skipped") == len(stages) == 8


@pytest.mark.slow
def test_quickstart_offline(tmp_path):
    result = run_cli("quickstart", "--out", str(tmp_path / "qs"), "--set", "train.max_steps=4",
                     "--set", "train.eval_every=2", "--set", "train.checkpoint_every=2",
                     "--set", "train.eval_max_tokens=512")
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "run directory" in out and str(tmp_path / "qs") in out
    assert "sample" in out
    events = read_metrics(tmp_path / "qs" / "metrics.jsonl")
    assert {e["domain"] for e in events if e["event"] == "eval"} == {"prose", "code", "tests"}
    # The LoRA branch: a PEFT adapter on the prose model's final/ (no full weights), beside the CPT runs in the
    # forgetting table (its summary line) and the report.
    lora = tmp_path / "qs-code-lora" / "final"
    adapter = json.loads((lora / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "LORA" and adapter["base_model_name_or_path"] == str(tmp_path / "qs" / "final")
    assert (lora / "adapter_model.safetensors").is_file() and not (lora / "model.safetensors").exists()
    assert "qs-code-lora: forgetting" in out and "qs-code-replay: forgetting" in out
    roles = {e["domain"]: e["role"] for e in read_metrics(tmp_path / "qs-code-lora" / "metrics.jsonl")
             if e["event"] == "eval" and e["step"] == 0}
    assert roles == {"code": "target", "prose": "reference"}  # evaluated at step 0: forgetting has a baseline
    report = tmp_path / "qs-report.html"  # the HTML report of the four runs, its path printed
    assert f"report: {report}" in out and report.is_file()
    page = report.read_text()
    assert all(f">{name}</a>" in page for name in ("qs", "qs-code", "qs-code-replay", "qs-code-lora", "qs-sft", "qs-dpo"))
    # Instruction tuning on builtin:instruct, then DPO on builtin:preference, both LoRA adapters; what they changed.
    assert (tmp_path / "qs-sft" / "final" / "adapter_config.json").is_file()
    assert (tmp_path / "qs-dpo" / "final" / "adapter_config.json").is_file()
    assert "held-out replies (builtin:instruct): loss" in out and "held-out pairs (builtin:preference)" in out
    assert "chat 'What does `json.dumps` do?' ->" in out
    domains = {e["domain"] for e in read_metrics(tmp_path / "qs-dpo" / "metrics.jsonl") if e["event"] == "eval"}
    assert {"preference", "instruct"} <= domains
    assert "<b>Return the number of</b>" in page  # the sample, recorded as a sample event


@pytest.mark.slow
def test_eval_and_generate_cli(toy_base, corpus_dir):
    final = toy_base / "final"
    result = run_cli("eval", str(final), "--data", str(corpus_dir), "--seq-len", "32", "--max-tokens", "256", "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    scores = json.loads(result.stdout)
    assert set(scores) == {"corpus"} and scores["corpus"]["loss"] > 0 and scores["corpus"]["eval_tokens"] > 0
    # The held-out score equals what training logged at the end (same split, same windows, same model).
    final_eval = [e for e in read_metrics(toy_base / "metrics.jsonl") if e["event"] == "eval"][-1]
    assert scores["corpus"]["eval_tokens"] == final_eval["eval_tokens"]
    assert final_eval["tokens"] == 3 * 2 * 32  # eval events keep the run's token axis
    assert scores["corpus"]["loss"] == pytest.approx(final_eval["loss"], rel=1e-5)
    assert scores["corpus"]["bpb"] == pytest.approx(final_eval["bpb"], rel=1e-5)

    gen = run_cli("generate", str(final), "--prompt", "the model", "--max-new-tokens", "8", "--greedy")
    assert gen.returncode == 0, gen.stderr[-3000:]
    assert gen.stdout.startswith("the model")
    again = run_cli("generate", str(final), "--prompt", "the model", "--max-new-tokens", "8", "--greedy")
    assert again.stdout == gen.stdout  # greedy decoding is deterministic


def test_every_shipped_prune_recipe_validates():
    from tunelab.recipe import validate_recipe
    from tunelab.stages.prune import PRUNE_RECIPES_DIR, load_prune_recipe

    names = sorted(p.stem for p in PRUNE_RECIPES_DIR.glob("*.yaml"))
    assert {"prune-wanda", "prune-ffn", "lottery"} <= set(names)
    for name in names:
        cfg = load_prune_recipe(name)
        if cfg.method == "imp":  # its training recipe, with the lottery's overrides, is a valid dense run
            from tunelab.config import apply_overrides, expand_shorthands, read_yaml, resolve_recipe_path

            data = apply_overrides(expand_shorthands(read_yaml(resolve_recipe_path(cfg.lottery.train))),
                                   list(cfg.lottery.set))
            assert validate_recipe(data, name).method.name == "full"


@pytest.mark.slow
def test_shipped_prune_pipeline_at_toy_scale(tmp_path):
    """prune-and-recover: pretrain, Wanda -> masked recovery (sparsity kept), FFN shrink -> LoRA recovery."""
    import torch
    from safetensors.torch import load_file

    spec = yaml.safe_load((RECIPES_DIR / "pipelines" / "prune-and-recover.yaml").read_text())
    for stage in spec["stages"]:
        if "eval" in stage:
            stage.update(seq_len=32, max_tokens=2048)
        if "prune" in stage:  # toy scale for the prune stages' own calibration and scoring
            stage["set"].update({"calibration.seq_len": 32, "calibration.max_tokens": 512,
                                 "eval.seq_len": 32, "eval.max_tokens": 512})
    pipeline = tmp_path / "prune-and-recover.yaml"
    pipeline.write_text(yaml.safe_dump(spec, sort_keys=False))
    result = run_cli("run", str(pipeline), "--out", str(tmp_path / "pipe"), *TOY, "--set", "tokenizer.vocab_size=512")
    assert result.returncode == 0, result.stderr[-3000:]
    root = tmp_path / "pipe"
    masks = load_file(str(root / "wanda" / "final" / "masks.safetensors"))
    recovered = load_file(str(root / "wanda-recovered" / "final" / "model.safetensors"))
    assert masks and all(torch.all(recovered[name][~mask.bool()] == 0) for name, mask in masks.items())
    assert (root / "wanda-recovered" / "final" / "masks.safetensors").is_file()
    shrunk = json.loads((root / "ffn" / "final" / "config.json").read_text())
    assert shrunk["intermediate_size"] == 352 - 88  # a quarter of llama-tiny's FFN neurons removed
    assert (root / "ffn-recovered" / "final" / "adapter_config.json").is_file()
    assert set(json.loads((root / "score" / "eval.json").read_text())) == {"prose", "code", "model"}
