"""What every recipe section shares: unknown keys are errors, and near-miss names get a suggestion."""

from __future__ import annotations

import difflib

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    # Unknown keys are errors (typos must not silently fall back to defaults).
    model_config = ConfigDict(extra="forbid", validate_assignment=True)



def did_you_mean(word: str, choices) -> str:
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""
