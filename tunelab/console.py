"""The console tables are printed to.

On a terminal, its width; piped or redirected, as wide as each table needs: a fixed width cut run
names short (quickstart-code-replay and quickstart-code-lora both became "quickstart-code…").
Columns holding names fold (wrap inside the name) on a narrow terminal instead of cutting it.
"""

from __future__ import annotations

import sys

WIDTH_WITHOUT_TERMINAL = 100_000  # a limit no table reaches: each is printed at its natural width


def table_console(**options):
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else WIDTH_WITHOUT_TERMINAL, **options)
