"""Recipe schema, loading, `--set` overrides and their one-line errors (tunelab/config.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tunelab.config import (RECIPE_KINDS, RECIPES_DIR, FinetuneRecipe, MergeRecipe, PretrainRecipe, RecipeConfig,
                            ScheduleConfig, SourceSpec, apply_overrides, dump_config, parse_override, read_yaml,
                            resolve_recipe_path, validate)
from tunelab.recipe import load_recipe, validate_recipe
from tunelab.errors import ConfigError, TunelabError

SHIPPED = sorted(RECIPES_DIR.glob("*.yaml"))
TUNELAB_BIN = Path(sys.executable).parent / "tunelab"


def write(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg, f"error message is not one line: {msg!r}"
    return msg


# ---------------------------------------------------------------- defaults and shipped recipes


def test_defaults_resolve_from_an_empty_recipe(tmp_path):
    cfg = load_recipe(write(tmp_path, ""))
    assert isinstance(cfg, RecipeConfig)
    # Spot-check values written in the schema (these are the documented defaults).
    assert cfg.kind == "pretrain"
    assert cfg.model.preset == "llama-tiny" and cfg.model.path is None
    assert cfg.tokenizer.vocab_size == 4096
    assert [s.source for s in cfg.data.train] == ["builtin:prose"]
    assert cfg.data.train[0].weight == 1.0
    assert cfg.data.eval == []
    assert cfg.train.max_steps == 100 and cfg.train.lr == 1e-3
    assert cfg.train.schedule.name == "cosine"
    assert cfg.method.name == "full" and cfg.method.options == {}
    assert cfg.objective.name == "clm"  # decided from the starting model (llama-tiny) and written out
    # Same thing without a file: through the kind union, and through the pretrain class directly (the schema
    # alone leaves the objective to the second check, which knows the models).
    assert validate_recipe({}, "x") == cfg
    schema_only = validate({}, "x", PretrainRecipe)
    assert schema_only.objective.name is None and schema_only.model_copy(update={"objective": cfg.objective}) == cfg
    assert type(cfg) is PretrainRecipe


def test_shipped_recipes_exist():
    assert {p.stem for p in SHIPPED} >= {"quickstart", "pretrain-small", "bitfit-code", "mlm-bert-tiny"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_every_shipped_recipe_validates(path):
    cfg = load_recipe(path)
    assert cfg.name == path.stem  # recipes name their runs after themselves
    # By name too (how the CLI and docs refer to them).
    assert load_recipe(path.stem) == cfg
    assert resolve_recipe_path(path.stem) == path


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_dump_config_round_trips(path, tmp_path):
    cfg = load_recipe(path)
    text = dump_config(cfg)
    assert validate_recipe(yaml.safe_load(text), "dumped") == cfg
    assert validate(yaml.safe_load(text), "dumped", RECIPE_KINDS[cfg.kind]) == cfg
    # And through a file, the way a run's resolved config.yaml is re-read on resume.
    assert load_recipe(write(tmp_path, text, "resolved.yaml")) == cfg
    # The dump is fully resolved: every section present, nothing left to defaults.
    data = yaml.safe_load(text)
    assert set(data) == set(type(cfg).model_fields) == set(RecipeConfig.model_fields) | {"kind"}
    assert data["kind"] == cfg.kind
    assert set(data["train"]["schedule"]) == set(ScheduleConfig.model_fields)


# ---------------------------------------------------------------- unknown keys and wrong types


def test_unknown_top_level_key(tmp_path):
    path = write(tmp_path, "modle:\n  preset: llama-tiny\n")
    with pytest.raises(ConfigError) as err:
        load_recipe(path)
    msg = one_line(err)
    assert str(path) in msg
    assert "modle" in msg and "did you mean 'model'" in msg


def test_unknown_nested_key_names_the_path_and_hint(tmp_path):
    path = write(tmp_path, "train:\n  max_step: 3\n")
    with pytest.raises(ConfigError) as err:
        load_recipe(path)
    msg = one_line(err)
    assert "train.max_step" in msg
    assert "did you mean 'max_steps'" in msg


def test_unknown_key_two_levels_down(tmp_path):
    path = write(tmp_path, "train:\n  schedule:\n    warmup_step: 3\n")
    with pytest.raises(ConfigError) as err:
        load_recipe(path)
    msg = one_line(err)
    assert "train.schedule.warmup_step" in msg and "did you mean 'warmup_steps'" in msg


def test_unknown_key_inside_a_source_list(tmp_path):
    path = write(tmp_path, "data:\n  train:\n    - {source: a.txt, wieght: 2}\n")
    with pytest.raises(ConfigError) as err:
        load_recipe(path)
    msg = one_line(err)
    assert "data.train.0.wieght" in msg and "did you mean 'weight'" in msg


def test_wrong_type_names_key_and_value(tmp_path):
    path = write(tmp_path, "train:\n  max_steps: lots\n")
    with pytest.raises(ConfigError) as err:
        load_recipe(path)
    msg = one_line(err)
    assert "train.max_steps" in msg and "'lots'" in msg


def test_out_of_range_value_names_key_and_value(tmp_path):
    path = write(tmp_path, "data:\n  train: [{source: a.txt, weight: -1}]\n")
    with pytest.raises(ConfigError) as err:
        load_recipe(path)
    msg = one_line(err)
    assert "data.train.0.weight" in msg and "-1" in msg


def test_bad_literal_names_key(tmp_path):
    path = write(tmp_path, "train:\n  schedule: {name: cosinus}\n")
    with pytest.raises(ConfigError) as err:
        load_recipe(path)
    msg = one_line(err)
    assert "train.schedule.name" in msg and "'cosinus'" in msg


def test_config_error_is_a_tunelab_error():
    assert issubclass(ConfigError, TunelabError)


# ---------------------------------------------------------------- --set overrides


def test_parse_override_yaml_typed_values():
    assert parse_override("train.max_steps=7") == (["train", "max_steps"], 7)
    assert parse_override("train.lr=3.0e-4") == (["train", "lr"], 3.0e-4)
    assert parse_override("train.compile=true") == (["train", "compile"], True)
    assert parse_override("train.grad_clip=null") == (["train", "grad_clip"], None)
    assert parse_override("data.eval=[a.txt, b.txt]") == (["data", "eval"], ["a.txt", "b.txt"])
    assert parse_override("name=a=b") == (["name"], "a=b")  # only the first '=' splits
    assert parse_override("name=") == (["name"], "")


def test_yaml11_exponent_without_dot_is_still_a_float_for_typed_fields():
    # Plain YAML 1.1 (PyYAML) reads `3e-4` as the string '3e-4' (its float regex needs a dot);
    # tunelab's loader reads it as the float every user means.
    assert parse_override("train.lr=3e-4") == (["train", "lr"], 3e-4)
    for text in ("train.lr=3e-4", "train.lr=3.0e-4"):
        cfg = load_recipe("quickstart", [text])
        assert type(cfg.train.lr) is float and cfg.train.lr == pytest.approx(3e-4, rel=0, abs=1e-18)


def test_yaml11_exponent_in_a_recipe_file_is_a_float(tmp_path):
    cfg = load_recipe(write(tmp_path, "train:\n  lr: 3e-4\n  eps: 1e-6\n"))
    assert type(cfg.train.lr) is float and cfg.train.lr == 3e-4
    assert cfg.train.eps == 1e-6


@pytest.mark.parametrize("word", ["-e5", ".e5", "+E3"])
def test_exponent_without_mantissa_stays_a_string(tmp_path, word):
    # The 1e-5-is-a-float resolver must not claim words float() cannot parse (that was a traceback).
    assert parse_override(f"name={word}") == (["name"], word)
    assert load_recipe(write(tmp_path, f"name: {word}\n")).name == word


def test_exponent_float_in_untyped_model_overrides():
    cfg = load_recipe("quickstart", ["model.overrides.rms_norm_eps=1e-5"])
    assert cfg.model.overrides["rms_norm_eps"] == 1e-5


def test_set_nested_values_with_types():
    cfg = load_recipe("quickstart", [
        "train.max_steps=7",
        "train.schedule.warmup_steps=3",
        "train.schedule.name=wsd",
        "train.betas=[0.8, 0.99]",
        "train.compile=true",
        "train.grad_clip=null",
        "model.overrides.num_hidden_layers=1",
        "name=my-run",
    ])
    assert cfg.train.max_steps == 7 and type(cfg.train.max_steps) is int
    assert cfg.train.schedule.warmup_steps == 3 and cfg.train.schedule.name == "wsd"
    assert cfg.train.schedule.min_lr_ratio == 0.1  # untouched sibling keeps the recipe's value
    assert cfg.train.betas == (0.8, 0.99)
    assert cfg.train.compile is True and cfg.train.grad_clip is None
    assert cfg.model.overrides == {"num_hidden_layers": 1}
    assert cfg.name == "my-run"
    assert cfg.train.lr == 3.0e-3  # the recipe's own value survives


def test_later_override_wins():
    cfg = load_recipe("quickstart", ["train.max_steps=5", "train.max_steps=9"])
    assert cfg.train.max_steps == 9


def test_override_creates_missing_sections(tmp_path):
    cfg = load_recipe(write(tmp_path, "name: x\n"), ["train.schedule.decay_fraction=0.5", "method.name=bitfit"])
    assert cfg.train.schedule.decay_fraction == 0.5
    assert cfg.method.name == "bitfit"


def test_source_string_shorthand_becomes_one_source_with_weight_1():
    cfg = load_recipe("pretrain-small", ["data.train=some/path.txt"])
    assert cfg.data.train == [SourceSpec(source="some/path.txt", weight=1.0)]
    assert cfg.data.train[0].domain == "path"


def test_source_list_of_strings():
    cfg = load_recipe("quickstart", ["data.eval=[a.txt, builtin:code]"])
    assert [(s.source, s.weight) for s in cfg.data.eval] == [("a.txt", 1.0), ("builtin:code", 1.0)]


def test_list_index_override_on_a_list_of_mappings():
    cfg = load_recipe("pretrain-small", ["data.train.0.weight=2", "data.train.1.name=py"])
    assert [(s.source, s.weight, s.name) for s in cfg.data.train] == [
        ("builtin:prose", 2.0, None), ("builtin:code", 1.0, "py")]


def test_list_index_override_on_string_shorthand_source():
    cfg = load_recipe("quickstart", ["data.train.0.weight=2"])
    assert [(s.source, s.weight) for s in cfg.data.train] == [("builtin:prose", 2.0)]


def test_override_unknown_key_gets_hint():
    with pytest.raises(ConfigError) as err:
        load_recipe("quickstart", ["train.max_step=3"])
    msg = one_line(err)
    assert "train.max_step" in msg and "did you mean 'max_steps'" in msg


def test_override_wrong_type_names_key_and_value():
    with pytest.raises(ConfigError) as err:
        load_recipe("quickstart", ["train.lr=fast"])
    msg = one_line(err)
    assert "train.lr" in msg and "'fast'" in msg


@pytest.mark.parametrize("bad", ["foo", "=3", "  =3"])
def test_malformed_override_is_a_config_error(bad):
    with pytest.raises(ConfigError) as err:
        load_recipe("quickstart", [bad])
    msg = one_line(err)
    assert repr(bad) in msg


def test_override_through_a_scalar_is_a_config_error():
    with pytest.raises(ConfigError) as err:
        apply_overrides({"train": {"max_steps": 3}}, ["train.max_steps.x=1"])
    assert "train.max_steps" in one_line(err)


def test_apply_overrides_does_only_what_it_is_told():
    data = {"train": {"lr": 1}, "data": {"train": [{"source": "a"}, {"source": "b"}]}}
    out = apply_overrides(data, ["train.lr=2", "data.train.1.weight=3", "model.preset=llama-micro"])
    assert out == {"train": {"lr": 2}, "data": {"train": [{"source": "a"}, {"source": "b", "weight": 3}]},
                   "model": {"preset": "llama-micro"}}


# ---------------------------------------------------------------- methods


def test_unknown_method_name_with_hint():
    with pytest.raises(ConfigError) as err:
        load_recipe("quickstart", ["method.name=bitfitt"])
    msg = one_line(err)
    assert "method.name" in msg and "'bitfitt'" in msg and "did you mean 'bitfit'" in msg


def test_bad_method_option_is_caught_by_load_recipe():
    # "Every recipe validates fully before any work starts": method options included.
    with pytest.raises(ConfigError) as err:
        load_recipe("bitfit-code", ["method.options.include_norm=true"])
    msg = one_line(err)
    assert "method.options" in msg and "include_norm" in msg and "did you mean 'include_norms'" in msg


def test_bad_method_option_type_is_caught_by_load_recipe():
    with pytest.raises(ConfigError) as err:
        load_recipe("bitfit-code", ["method.options.include_norms=sometimes"])
    msg = one_line(err)
    assert "method.options" in msg and "include_norms" in msg and "'sometimes'" in msg


def test_options_for_a_method_without_options_are_rejected():
    with pytest.raises(ConfigError) as err:
        load_recipe("quickstart", ["method.options.rank=8"])
    assert "rank" in one_line(err)


def test_create_method_validates_options_too():
    from tunelab.methods import create_method

    with pytest.raises(ConfigError) as err:
        create_method("bitfit", {"include_norm": True})
    msg = one_line(err)
    assert "include_norm" in msg and "did you mean 'include_norms'" in msg
    assert create_method("bitfit", {"include_norms": False}).options.include_norms is False


def test_model_preset_is_validated_by_load_recipe():
    with pytest.raises(ConfigError) as err:
        load_recipe("quickstart", ["model.preset=llama-tiyn"])
    for word in ["model.preset", "did you mean 'llama-tiny'"]:
        assert word in one_line(err)


def test_misspelt_model_override_fails_before_any_work(tmp_path):
    # Changed with protocol v2: checking model.overrides needs the HF config classes (transformers,
    # torch), which recipe validation no longer imports; the stage checks them first thing, before the
    # run directory, the tokenizer or the data exist.
    from tunelab.errors import ModelError
    from tunelab.stages import run_stage

    cfg = load_recipe("quickstart", ["model.overrides.num_hiden_layers=1"])
    with pytest.raises(ModelError) as err:
        run_stage(cfg, out=tmp_path / "run", quiet=True)
    for word in ["num_hiden_layers", "did you mean 'num_hidden_layers'"]:
        assert word in one_line(err)
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- files


def test_invalid_yaml_names_file_and_line(tmp_path):
    path = write(tmp_path, "name: x\ntrain:\n  lr: [1, 2\n  max_steps: 3\n")
    with pytest.raises(ConfigError) as err:
        load_recipe(path)
    msg = one_line(err)
    assert str(path) in msg
    assert "line 4" in msg  # PyYAML notices the unclosed bracket at the next key (line 4, 1-based)


def test_tab_indentation_names_the_line(tmp_path):
    path = write(tmp_path, "name: x\ntrain:\n\tlr: 1\n")
    with pytest.raises(ConfigError) as err:
        load_recipe(path)
    msg = one_line(err)
    assert str(path) in msg and "line 3" in msg


def test_recipe_that_is_not_a_mapping(tmp_path):
    path = write(tmp_path, "- a\n- b\n")
    with pytest.raises(ConfigError) as err:
        load_recipe(path)
    assert str(path) in one_line(err)


def test_missing_file_is_a_config_error(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as err:
        load_recipe(missing)
    assert str(missing) in one_line(err)
    with pytest.raises(ConfigError) as err:
        read_yaml(missing)
    assert str(missing) in one_line(err)


def test_misspelt_shipped_recipe_name_gets_a_hint():
    with pytest.raises(ConfigError) as err:
        load_recipe("quickstrat")
    msg = one_line(err)
    assert "did you mean 'quickstart'" in msg and "pretrain-small" in msg


# ---------------------------------------------------------------- CLI


def test_cli_bad_key_exits_2_with_one_line():
    assert TUNELAB_BIN.exists(), TUNELAB_BIN
    proc = subprocess.run([str(TUNELAB_BIN), "pretrain", "quickstart", "--set", "train.max_step=3"],
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "train.max_step" in lines[0] and "did you mean" in lines[0]
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout


# ---------------------------------------------------------------- recipe kinds (a union on `kind`)


def test_recipe_kinds_table():
    from tunelab.config import AverageRecipe, PruneRecipe

    assert RECIPE_KINDS == {"pretrain": PretrainRecipe, "finetune": FinetuneRecipe, "merge": MergeRecipe,
                            "prune": PruneRecipe, "average": AverageRecipe}
    for kind, cls in RECIPE_KINDS.items():
        assert cls.model_fields["kind"].default == kind
        assert issubclass(cls, RecipeConfig) == (kind in ("pretrain", "finetune"))  # merge, prune: no training


def test_unknown_kind_is_a_one_line_error_with_hint(tmp_path):
    path = write(tmp_path, "kind: finetnue\nmodel: {path: somewhere}\n")
    with pytest.raises(ConfigError) as err:
        load_recipe(path)
    msg = one_line(err)
    assert str(path) in msg and "kind" in msg and "'finetnue'" in msg
    assert "did you mean 'finetune'" in msg and "pretrain" in msg  # the known kinds are listed


def test_finetune_without_model_path_names_model_path(tmp_path):
    for path, kind in ((write(tmp_path, "kind: finetune\n"), None), (write(tmp_path, "name: x\n", "b.yaml"), "finetune")):
        with pytest.raises(ConfigError) as err:
            load_recipe(path, kind=kind)
        msg = one_line(err)
        assert str(path) in msg and "model.path" in msg


def test_finetune_defaults_to_lora_and_keeps_an_explicit_method(tmp_path):
    cfg = load_recipe(write(tmp_path, "kind: finetune\nmodel: {path: runs/base/final}\n"))
    assert type(cfg) is FinetuneRecipe and cfg.kind == "finetune"
    assert cfg.method.name == "lora" and cfg.method.options == {}
    # The same recipe without a kind, run as `tunelab finetune`, takes the kind it is run as.
    assert load_recipe(write(tmp_path, "model: {path: runs/base/final}\n", "b.yaml"), kind="finetune") == cfg
    explicit = load_recipe(write(tmp_path, "kind: finetune\nmodel: {path: p}\nmethod: {name: bitfit}\n", "c.yaml"))
    assert explicit.method.name == "bitfit"
    # Pretraining keeps full as its default method.
    assert load_recipe(write(tmp_path, "model: {path: p}\n", "d.yaml")).method.name == "full"


def test_lora_options_are_validated_at_load_in_a_finetune(tmp_path):
    path = write(tmp_path, "kind: finetune\nmodel: {path: p}\nmethod: {options: {rank: 4}}\n")
    with pytest.raises(ConfigError) as err:
        load_recipe(path)
    msg = one_line(err)
    assert "method.options" in msg and "rank" in msg


def test_kind_named_in_the_recipe_must_match_the_command(tmp_path):
    path = write(tmp_path, "kind: pretrain\nmodel: {preset: llama-micro}\n")
    with pytest.raises(ConfigError) as err:
        load_recipe(path, kind="finetune")
    msg = one_line(err)
    assert str(path) in msg and "tunelab pretrain" in msg
    # And the other way round, with a shipped finetune recipe run as pretrain.
    with pytest.raises(ConfigError) as err:
        load_recipe("lora-code", kind="pretrain")
    assert "tunelab finetune" in one_line(err)
    # Matching kinds (or no kind asked for) load.
    assert load_recipe(path, kind="pretrain").kind == "pretrain"
    assert load_recipe("lora-code").kind == "finetune"


@pytest.mark.parametrize("eval_spec", ["[builtin:prose]", "[{source: other.txt, name: prose}]"])
def test_eval_source_clashing_with_a_training_domain_is_an_error(tmp_path, eval_spec):
    path = write(tmp_path, f"data:\n  train: builtin:prose\n  eval: {eval_spec}\n")
    with pytest.raises(ConfigError) as err:
        load_recipe(path)
    msg = one_line(err)
    assert "data.eval" in msg and "'prose'" in msg
    # A distinct name resolves the clash.
    assert load_recipe(write(tmp_path, "data:\n  train: builtin:prose\n  eval: [{source: x.txt, name: held}]\n",
                             "ok.yaml")).data.eval[0].domain == "held"


def test_two_eval_sources_with_one_name_are_an_error(tmp_path):
    path = write(tmp_path, "data:\n  train: builtin:prose\n  eval: [a/notes.txt, b/notes.txt]\n")
    with pytest.raises(ConfigError) as err:
        load_recipe(path)
    assert "data.eval" in one_line(err) and "'notes'" in one_line(err)


def test_method_option_typo_fails_at_load_time_not_at_run_time(tmp_path, monkeypatch):
    # validate_recipe asks the method's Options model through the lazy registry: no stage code runs.
    import tunelab.stages

    monkeypatch.setattr(tunelab.stages, "run_stage", lambda *a, **k: pytest.fail("a stage started"))
    path = write(tmp_path, "method:\n  name: bitfit\n  options: {include_norm: false}\n")
    with pytest.raises(ConfigError) as err:
        load_recipe(path)
    msg = one_line(err)
    assert str(path) in msg and "method.options" in msg and "did you mean 'include_norms'" in msg


def test_validate_recipe_does_not_mutate_its_input():
    data = {"model": {"preset": "llama-micro"}}
    validate_recipe(data, "x", kind="pretrain")
    assert data == {"model": {"preset": "llama-micro"}}


# ---------------------------------------------------------------- import cost: validation needs no torch


def test_loading_recipes_imports_no_torch():
    import json

    recipes = sorted(p.stem for p in SHIPPED)
    code = ("import sys, json\n"
            "import tunelab.config\n"
            "from tunelab.recipe import load_recipe\n"
            f"cfgs = [load_recipe(r) for r in {recipes!r}]\n"
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'peft', 'safetensors'))\n"
            "methods = sorted(m for m in sys.modules if m.startswith('tunelab.methods.'))\n"
            "print(json.dumps([heavy, methods]))\n")
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "lora-code" in recipes  # the lora method module is imported (options validated) and still no torch
    heavy, methods = json.loads(proc.stdout)
    assert heavy == [], heavy
    # The method modules were really imported (their Options validated the recipes' method.options).
    assert {"tunelab.methods.lora", "tunelab.methods.bitfit"} <= set(methods), methods
    # -X importtime lists every module imported by an import statement: none of the heavy ones.
    imported = [line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")]
    assert "tunelab.config" in imported
    assert not [m for m in imported if m.split(".")[0] in ("torch", "transformers", "peft")]


def test_cli_help_answers_in_under_a_second():
    import time

    assert TUNELAB_BIN.exists(), TUNELAB_BIN
    times = []
    for _ in range(3):
        start = time.perf_counter()
        proc = subprocess.run([str(TUNELAB_BIN), "--help"], capture_output=True, text=True, timeout=60,
                              stdin=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
        assert proc.returncode == 0, proc.stderr
        assert "pretrain" in proc.stdout and "finetune" in proc.stdout
    assert min(times) < 1.0, times
