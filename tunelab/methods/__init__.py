"""Registry of training methods: name -> class implementing the hooks in methods/base.py."""

from tunelab.methods.bitfit import BitFit
from tunelab.methods.full import Full

METHODS = {"full": Full, "bitfit": BitFit}


def create_method(name: str, options: dict):
    from pydantic import ValidationError

    from tunelab.config import format_validation_error
    from tunelab.errors import ConfigError

    cls = METHODS[name]
    try:
        return cls(options)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, f"method.options ({name})", cls.Options)) from None
