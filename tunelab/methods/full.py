"""Full training: every parameter is trained (pretraining, continued pretraining, full fine-tuning)."""

from tunelab.methods.base import Method


class Full(Method):
    name = "full"
