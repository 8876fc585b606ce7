"""How `tunelab --help` shows option values: click's conventional metavars instead of typer's Python types."""

from __future__ import annotations

import typer

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
