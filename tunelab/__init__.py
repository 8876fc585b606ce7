"""tunelab: pretrain, adapt, and compare language models with one loop and self-describing runs."""

__version__ = "0.1.0"
