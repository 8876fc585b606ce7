"""Loading a recipe: the schema of its kind (config/), then, for a training recipe, what the schema (which
knows no methods, objectives or models) cannot check. The method's and objective's options by their own models, the pair
(an objective that a method cannot train), the data the objective needs, the memory options each
refuses, the preset's name, and the objective's default, decided from the starting model.
Imports no torch: method and objective modules import it inside their hooks.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import ValidationError

from tunelab.config import (TrainingRecipe, apply_overrides, did_you_mean, expand_shorthands, format_validation_error,
                            read_yaml, resolve_recipe_path, validate_kind)
from tunelab.errors import ConfigError, DataError, ModelError


def validate_recipe(data: dict, source: str, kind: str | None = None):
    """A recipe mapping validated as its kind (config.validate_kind); a training recipe is then checked against its
    method and objective (check_training_recipe), so a typo in their options fails before any work."""
    cfg = validate_kind(data, source, kind)
    return check_training_recipe(cfg, source) if isinstance(cfg, TrainingRecipe) else cfg


def load_recipe(name_or_path: str | Path, overrides: list[str] | None = None, kind: str | None = None):
    """A recipe file (or a shipped recipe's name) with `--set` overrides, validated and checked."""
    path = resolve_recipe_path(name_or_path)
    data = apply_overrides(expand_shorthands(read_yaml(path)), list(overrides or []))
    return validate_recipe(data, str(path), kind)


def check_training_recipe(cfg, source: str):
    """The recipe with its objective named (a copy: the validated recipe is never changed in place)."""
    from tunelab.methods import method_class
    from tunelab.models import PRESETS
    from tunelab.objectives import objective_class

    if cfg.model.path is None and cfg.model.preset not in PRESETS:
        raise ConfigError(f"{source}: model.preset: unknown preset {cfg.model.preset!r}"
                          f"{did_you_mean(cfg.model.preset, PRESETS)}; known: {', '.join(PRESETS)}")
    encoder = _starts_from_encoder(cfg)
    if cfg.objective.name is None:
        objective = cfg.objective.model_copy(update={"name": "mlm" if encoder else "clm"})  # unknown: clm
        cfg = cfg.model_copy(update={"objective": objective})
    try:
        method = _create(method_class(cfg.method.name), cfg.method.options, f"{source}: method.options")
        objective = _create(objective_class(cfg.objective.name), cfg.objective.options, f"{source}: objective.options")
    except ConfigError as err:
        raise ConfigError(err.args[0] if err.args[0].startswith(source) else f"{source}: {err}") from None
    if encoder is not None and encoder != (objective.model_kind == "encoder"):
        trains, start = ("a causal LM", "an encoder: use mlm") if encoder else ("an encoder", "a causal LM: use clm")
        raise ConfigError(f"{source}: objective.name: {objective.name} trains {trains}, but the starting model is "
                          f"{start} (or leave objective.name unset)")
    pair = f"method {method.name} with objective {objective.name}"
    why = objective.refusal(method)
    if why:
        raise ConfigError(f"{source}: objective.name: {pair} cannot work: {why}")
    why = method.gradient_checkpointing_refusal() if cfg.train.gradient_checkpointing else None
    if why:
        raise ConfigError(f"{source}: train.gradient_checkpointing: not with method {method.name}: {why}; "
                          "set it to false")
    if cfg.train.loss_chunk_tokens is not None:
        for who, why in ((f"method {method.name}", method.chunked_loss_refusal()),
                         (f"objective {objective.name}", objective.chunked_loss_refusal())):
            if why:
                raise ConfigError(f"{source}: train.loss_chunk_tokens: not with {who}: {why}; remove it")
    _check_data(cfg, objective, source)
    return cfg


def _create(cls, options: dict, where: str):
    try:
        return cls(options)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, where, cls.Options)) from None


def _check_data(cfg, objective, source: str) -> None:
    """Preference objectives train on pairs, the language-modelling ones on text (and chat, causal only)."""
    from tunelab.objectives import OBJECTIVES, objective_class

    pairs = [s.source for s in cfg.data.train if s.format == "preference"]
    if objective.data_format == "preference" and not pairs:
        raise ConfigError(f"{source}: objective {objective.name} trains on preference pairs: data.train needs a source "
                          "with format: preference (rows with prompt or messages, chosen, rejected; or "
                          "builtin:preference)")
    if pairs and objective.data_format != "preference":
        preference = [n for n in OBJECTIVES if objective_class(n).data_format == "preference"]
        raise ConfigError(f"{source}: data.train: {pairs[0]} holds preference pairs: train them with objective "
                          f"{' | '.join(preference)} (objective {objective.name} trains on text and chat data)")
    replayed = cfg.data.replay.sources if cfg.data.replay is not None else []
    chat = [s for s in cfg.data.train + cfg.data.eval + replayed if s.format == "chat"]
    if chat and objective.model_kind != "causal":
        raise ConfigError(f"{source}: data: {chat[0].source} is a chat source: its loss is on assistant replies, for a "
                          f"causal LM (objective {objective.name} trains an encoder)")


def _starts_from_encoder(cfg) -> bool | None:
    """Whether the starting model is a masked-LM encoder, read from its config.json (no model is loaded);
    None: not known before it loads (a hub id, an adapter), where models.check_objective checks it."""
    from tunelab.models import ENCODER_TYPES, PRESETS, resolve_model_path

    if cfg.model.path is None and cfg.init_from is None:
        return PRESETS[cfg.model.preset][0] in ENCODER_TYPES
    try:
        start = Path(resolve_model_path(cfg.model.path)) if cfg.model.path else Path(cfg.init_from).expanduser()
    except ModelError:
        return None  # reported where the model loads
    for folder in (start, start / "final"):
        try:
            config = json.loads((folder / "config.json").read_text())
        except (OSError, ValueError):
            continue
        return config.get("model_type") in ENCODER_TYPES and not config.get("is_decoder", False)
    return None


def check_data_paths(cfg) -> None:
    """Every file or folder source of the recipe exists (built-in sources need no check): before torch is
    imported, so a mistyped path fails in a second."""
    replay = cfg.data.replay.sources if cfg.data.replay else []
    for section, specs in (("data.train", cfg.data.train), ("data.eval", cfg.data.eval), ("data.replay", replay)):
        for spec in specs:
            path = Path(spec.source.removeprefix("hf:")).expanduser()
            if not spec.source.startswith("builtin:") and not path.exists():
                raise DataError(f"{section}: {spec.source}: no such file or folder; fix the path in the recipe "
                                f"(or --set {section}=PATH)")
