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
    "masked": "tunelab.methods.masked:Masked",
}


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
