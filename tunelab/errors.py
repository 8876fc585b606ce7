"""User-facing errors: caught in cli.py and printed as one line, exit code 2.

Bugs are not TunelabErrors and keep their traceback.
"""


class TunelabError(Exception):
    """A mistake in the user's input (recipe, data, paths) with a one-line fix."""


class ConfigError(TunelabError):
    """A recipe or override that does not validate."""


class DataError(TunelabError):
    """Missing, empty, binary or otherwise unusable data."""


class ModelError(TunelabError):
    """A model/tokenizer that cannot be built, loaded or paired."""


class RunDirError(TunelabError):
    """A run directory that would be overwritten or cannot be resumed."""
