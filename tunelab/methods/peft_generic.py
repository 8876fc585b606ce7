"""Every other peft method through one entry: `method: {name: peft, options: {type, config}}`, the config
checked against peft's own config class when the run is set up.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator

from tunelab.errors import ConfigError
from tunelab.adapters import PEFT_LABELS
from tunelab.methods.peft_base import PeftMethod, _Options, _check_targets_value, check_targets, one_line


# ---------------------------------------------------------------- the rest of peft, through one entry

# peft methods without an entry of their own: trained by the plain loop (none needs a per-step call),
# saved, reloaded and merged by peft; each is run on llama-micro by tests/unit/test_peft_family.py.
# Left out: adamss (its subspace allocation needs per-step calls), shadow (fails on llama in peft
# 0.21), and those that need task ids or special inputs (multitask prompt tuning, poly, cpt, x-lora).
OTHER_PEFT_TYPES = ("beft", "c3a", "deft", "delora", "fourierft", "frod", "glora", "gralora", "hira", "hra", "lily",
                    "miss", "osf", "peanut", "psoft", "pvera", "randlora", "road", "supertuning", "tinylora",
                    "unilora", "vblora", "waveft")
_OWNED = ("task_type", "peft_type", "base_model_name_or_path", "inference_mode", "revision")  # set by tunelab


class PeftOptions(_Options):
    type: str  # one of OTHER_PEFT_TYPES (peft's name, lower case)
    # The fields of peft's config class for that type (validated by it at set-up, before any training);
    # target_modules defaults to all-linear.
    config: dict[str, Any] = Field(default_factory=dict)

    @field_validator("type")
    @classmethod
    def _type(cls, value):
        value = value.lower()
        if value not in OTHER_PEFT_TYPES:
            raise ValueError(f"one of {', '.join(OTHER_PEFT_TYPES)} (the methods with an entry of their own, "
                             "e.g. lora or ia3, are method names)")
        return value

    @field_validator("config")
    @classmethod
    def _owned(cls, value):
        owned = sorted(set(value) & set(_OWNED))
        if owned:
            raise ValueError(f"{', '.join(owned)} is set by tunelab")
        return value


class Peft(PeftMethod):
    """Any other peft method (OTHER_PEFT_TYPES), configured by peft's own config fields."""

    name = "peft"
    Options = PeftOptions

    def prepare(self, model, ctx):
        self.label = PEFT_LABELS.get(self.options.type.upper(), self.options.type)
        return super().prepare(model, ctx)

    def peft_config(self, model, ctx, task_type):
        import dataclasses

        from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

        from tunelab.config import did_you_mean

        config_class = PEFT_TYPE_TO_CONFIG_MAPPING[self.options.type.upper()]
        fields = {f.name for f in dataclasses.fields(config_class)} - set(_OWNED)
        config = dict(self.options.config)
        for key in config:
            if key not in fields:
                raise ConfigError(f"method.options.config.{key}: not a field of peft's {config_class.__name__}"
                                  f"{did_you_mean(key, fields)}")
        if "target_modules" in fields:
            config.setdefault("target_modules", "all-linear")
            targets = _check_targets_value(config["target_modules"])
            if isinstance(targets, list):
                check_targets(model, targets, self.label, "linear")
            config["target_modules"] = targets
        try:
            return config_class(task_type=task_type, **config)
        except (ValueError, TypeError) as err:
            raise ConfigError(f"method.options.config ({self.options.type}): {one_line(err)}") from None
