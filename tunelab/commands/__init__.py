"""The command layer: the typer app (cli.py) and one module per command body. Everything below (stages,
library, config) is imported from here and never imports this package (tests/unit/test_layering.py)."""
