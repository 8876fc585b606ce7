"""What every command shares: option help texts and types, quiet transformers, stderr, and how `tunelab --help`
shows option values (click's conventional metavars instead of typer's Python types)."""

from __future__ import annotations

import sys
from typing import Annotated, Optional

import typer

SET_HELP = "Override a recipe value by dotted path, e.g. --set train.max_steps=100 (value parsed as YAML)."
DEFAULT_EVAL = ["builtin:prose", "builtin:code", "builtin:tests"]
BASE_HELP = "For an adapter directory: its base model, if it moved since training."
RECIPE_HELP = "Recipe YAML file, or the name of a shipped recipe."
OUT_HELP = "Run directory (default runs/<recipe name>)."
QUIET_HELP = "No progress bar or log lines."
# The sampling options `generate` and `chat` share (and `--base`, which eval takes too).
Greedy = Annotated[bool, typer.Option("--greedy", help="Greedy decoding instead of sampling.")]
Temperature = Annotated[float, typer.Option("--temperature", min=0.01,
                                            help="Sampling temperature (lower: closer to greedy).")]
TopK = Annotated[int, typer.Option("--top-k", min=0, help="Sample from the k most likely tokens (0: all).")]
Seed = Annotated[int, typer.Option("--seed", help="Sampling seed.")]
Base = Annotated[Optional[str], typer.Option("--base", help=BASE_HELP)]
RESUME_HELP = "Continue the same run from its newest intact checkpoint (the recipe must not change, bar safe keys)."


def quiet_transformers() -> None:
    """transformers 5 draws a "Loading weights" bar on every load, which would land between our lines."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def stderr(*parts) -> None:
    print(*parts, file=sys.stderr)


METAVARS = {"str": "TEXT", "int": "INTEGER", "float": "FLOAT", "Path": "PATH"}


def conventional_metavars(command) -> None:
    """Help shows click's TEXT / INTEGER / PATH for an option's value and nothing for a flag, instead of
    typer's Python types (<list[str]>, <bool>); an argument's name already says what it takes."""
    for sub in getattr(command, "commands", {}).values():
        conventional_metavars(sub)
    help_option = command.get_help_option(typer.Context(command))  # made once, then reused by the command
    for param in [*command.params, *([help_option] if help_option else [])]:
        if param.param_type_name == "argument":
            param.display_type_rich = lambda ctx: None
        elif param.metavar is None:
            element = param.bare_type().removeprefix("list[").removesuffix("]")  # a repeatable option: one value
            param.metavar = "" if param.is_flag else METAVARS.get(element, element.upper())
