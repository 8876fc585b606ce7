"""Name -> "module:Class" tables (methods, objectives): naming one imports nothing until it is used.

Entries are import paths, not classes, so that listing the names (the recipe schema, `--help`) stays
free of torch; a class's module is imported when its options are validated or it is created.
"""

from __future__ import annotations

import importlib

from tunelab.errors import ConfigError


def registered_class(table: dict[str, str], name: str, field: str, noun: str):
    """The class registered as `name`; an unknown name is a one-line error on `field` with a hint."""
    from tunelab.config.base import did_you_mean

    if name not in table:
        raise ConfigError(f"{field}: unknown {noun} {name!r}{did_you_mean(name, table)}; known: {', '.join(table)}")
    module, cls = table[name].split(":")
    return getattr(importlib.import_module(module), cls)


def create(table: dict[str, str], name: str, options: dict, field: str):
    """An instance of the class registered as `name` (`field`: method, objective), its options validated."""
    from pydantic import ValidationError

    from tunelab.config.loading import format_validation_error

    cls = registered_class(table, name, f"{field}.name", field)
    try:
        return cls(options)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, f"{field}.options ({name})", cls.Options)) from None
