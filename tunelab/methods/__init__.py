"""Registry of training methods: name -> "module:Class" implementing the hooks in methods/base.py.

Entries are import paths, not classes, so that naming a method (the recipe schema, `--help`)
imports nothing; a method's module is imported when its options are validated or it is created.
Adding a method = one module + one line here; the shared method suite in tests/unit/test_method_suite.py
then runs it.
"""

from __future__ import annotations

import importlib

METHODS: dict[str, str] = {
    "full": "tunelab.methods.full:Full",
    "bitfit": "tunelab.methods.bitfit:BitFit",
    "lora": "tunelab.methods.lora:LoRA",
    "adalora": "tunelab.methods.peft_family:AdaLoRA",
    "ia3": "tunelab.methods.peft_family:IA3",
    "loha": "tunelab.methods.peft_family:LoHa",
    "lokr": "tunelab.methods.peft_family:LoKr",
    "vera": "tunelab.methods.peft_family:VeRA",
    "oft": "tunelab.methods.peft_family:OFT",
    "boft": "tunelab.methods.peft_family:BOFT",
    "shira": "tunelab.methods.peft_family:SHiRA",
    "ln_tuning": "tunelab.methods.peft_family:LNTuning",
    "trainable_tokens": "tunelab.methods.peft_family:TrainableTokens",
    "prompt_tuning": "tunelab.methods.peft_prompt:PromptTuning",
    "prefix_tuning": "tunelab.methods.peft_prompt:PrefixTuning",
    "p_tuning": "tunelab.methods.peft_prompt:PTuning",
    "peft": "tunelab.methods.peft_generic:Peft",  # the other peft methods, by type
    "masked": "tunelab.methods.masked:Masked",
    "lisa": "tunelab.methods.lisa:LISA",
    "hft": "tunelab.methods.hft:HFT",
    "mezo": "tunelab.methods.mezo:MeZO",
    "sparse": "tunelab.methods.sparse:SparseFT",
    # Preference tuning on pairs (format: preference); any of the methods above chooses the weights (`tuning`).
    "dpo": "tunelab.methods.preference:DPO",
    "simpo": "tunelab.methods.preference:SimPO",
    "orpo": "tunelab.methods.preference:ORPO",
}
PREFERENCE_METHODS = ("dpo", "simpo", "orpo")


def method_class(name: str):
    from tunelab.config import did_you_mean
    from tunelab.errors import ConfigError

    if name not in METHODS:
        raise ConfigError(f"method.name: unknown method {name!r}{did_you_mean(name, METHODS)}; "
                          f"known: {', '.join(METHODS)}")
    module, cls = METHODS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def create_method(name: str, options: dict):
    from pydantic import ValidationError

    from tunelab.config import format_validation_error
    from tunelab.errors import ConfigError

    cls = method_class(name)
    try:
        return cls(options)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, f"method.options ({name})", cls.Options)) from None
