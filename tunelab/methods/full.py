"""Full training: every parameter is trained (pretraining, continued pretraining, full fine-tuning).

`freeze: [regex, ...]` keeps the parameters whose names match any pattern (re.search) frozen, e.g.
`["embed_tokens", "layers\\.[0-3]\\."]` trains everything but the embeddings and the first four
blocks. A pattern that matches nothing is an error (a typo would otherwise train everything).
"""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, field_validator

from tunelab.errors import ConfigError
from tunelab.methods.base import Method


class FullOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    freeze: list[str] = []  # regexes over parameter names (model.named_parameters()); matches stay frozen

    @field_validator("freeze")
    @classmethod
    def _compiles(cls, patterns: list[str]) -> list[str]:
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"{pattern!r} is not a regular expression ({err})") from None
        return patterns


def name_examples(names: list[str], n: int = 6) -> str:
    """A few parameter names, from the start, middle and end of the model, for error messages."""
    picked = names if len(names) <= n else [names[round(i * (len(names) - 1) / (n - 1))] for i in range(n)]
    return ", ".join(picked)


class Full(Method):
    name = "full"
    Options = FullOptions

    def prepare(self, model, ctx):
        patterns = self.options.freeze
        if not patterns:
            return model
        names = [n for n, _ in model.named_parameters()]
        for pattern in patterns:
            if not any(re.search(pattern, n) for n in names):
                raise ConfigError(f"method.options.freeze: {pattern!r} matches no parameter; parameters are named "
                                  f"like {name_examples(names)}")
        frozen = 0
        for name, param in model.named_parameters():
            freeze = any(re.search(p, name) for p in patterns)
            param.requires_grad_(not freeze)
            frozen += param.numel() if freeze else 0
        if all(not p.requires_grad for p in model.parameters()):
            raise ConfigError(f"method.options.freeze: {patterns} freezes every parameter; nothing would train")
        total = sum(p.numel() for p in model.parameters())
        ctx.log(f"full: {frozen:,} of {total:,} parameters frozen by {len(patterns)} pattern(s)")
        return model
