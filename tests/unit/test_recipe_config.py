"""Recipe validation: defaults, --set overrides, one-line errors with the key path and a hint."""

from pathlib import Path

import pytest
import yaml

from tunelab.config import RECIPES_DIR, RecipeConfig, apply_overrides, dump_config, load_recipe, validate
from tunelab.errors import ConfigError


def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("recipe", sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")))
def test_every_shipped_recipe_validates_and_round_trips(recipe):
    cfg = load_recipe(recipe)
    assert validate(yaml.safe_load(dump_config(cfg)), "dumped") == cfg


def test_defaults_fill_everything(tmp_path):
    cfg = load_recipe(write(tmp_path, {}))
    assert cfg.train.schedule.name == "cosine" and cfg.method.name == "full"
    assert [s.source for s in cfg.data.train] == ["builtin:prose"]


@pytest.mark.parametrize("override, expected", [
    ("train.max_steps=7", ("train", "max_steps", 7)),
    ("train.lr=3.0e-4", ("train", "lr", 3e-4)),
    ("train.lr=3e-4", ("train", "lr", 3e-4)),  # YAML 1.1 reads this as a string; pydantic still takes it
    ("train.schedule.name=wsd", ("train", "schedule", "name", "wsd")),
    ("train.grad_clip=null", ("train", "grad_clip", None)),
])
def test_overrides_are_typed(tmp_path, override, expected):
    cfg = load_recipe(write(tmp_path, {}), [override])
    node = cfg
    for part in expected[:-1]:
        node = getattr(node, part)
    assert node == expected[-1]


def test_data_train_path_shorthand_and_list_index(tmp_path):
    cfg = load_recipe(write(tmp_path, {}), ["data.train=some/notes.txt"])
    assert [(s.source, s.weight) for s in cfg.data.train] == [("some/notes.txt", 1.0)]
    two = {"data": {"train": [{"source": "a.txt"}, {"source": "b.txt"}]}}
    cfg = load_recipe(write(tmp_path, two), ["data.train.1.weight=3"])
    assert [s.weight for s in cfg.data.train] == [1.0, 3.0]


@pytest.mark.parametrize("data, overrides, needles", [
    ({"train": {"max_step": 3}}, [], ["train.max_step", "did you mean 'max_steps'"]),
    ({"trian": {}}, [], ["trian", "did you mean 'train'"]),
    ({}, ["train.schedule.warmup=5"], ["train.schedule.warmup", "did you mean 'warmup_steps'"]),
    ({"train": {"max_steps": "many"}}, [], ["train.max_steps", "'many'"]),
    ({"train": {"precision": "fp16"}}, [], ["train.precision", "fp32"]),
    ({"method": {"name": "lora2"}}, [], ["method.name", "unknown method"]),
    ({"method": {"name": "bitfit", "options": {"include_norm": True}}}, [], ["include_norm", "include_norms"]),
    ({"data": {"train": []}}, [], ["data.train", "at least one source"]),
])
def test_bad_recipes_are_one_line_errors(tmp_path, data, overrides, needles):
    with pytest.raises(ConfigError) as err:
        load_recipe(write(tmp_path, data), overrides)
    message = str(err.value)
    assert "\n" not in message and str(tmp_path / "r.yaml") in message
    for needle in needles:
        assert needle in message


def test_malformed_override_invalid_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        apply_overrides({}, ["train.max_steps"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  max_steps: [1,\n")
    with pytest.raises(ConfigError, match="bad.yaml.*line"):
        load_recipe(bad)
    with pytest.raises(ConfigError, match="no such recipe"):
        load_recipe(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="did you mean 'quickstart'"):
        load_recipe("quikstart")


def test_resolved_config_is_complete():
    dumped = yaml.safe_load(dump_config(RecipeConfig()))
    assert set(dumped) == {"kind", "name", "model", "tokenizer", "data", "train", "method"}
    assert dumped["train"]["schedule"]["warmup_steps"] == 0
