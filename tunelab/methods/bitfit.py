"""BitFit-style tuning: train only biases and normalisation parameters, freeze the rest.

Ben Zaken et al. (2022) tune biases only; Llama-style models have no biases, so the norm gains
(the other per-channel vectors) are included, as in most BitFit ports to modern decoders.
"""

from pydantic import BaseModel, ConfigDict

from tunelab.errors import ConfigError
from tunelab.methods.base import Method


class BitFitOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_norms: bool = True


def bitfit_params(model, include_norms: bool) -> set[int]:
    """ids of every bias, and of the gains of normalisation layers (found by module type, not by name:
    GPT-2 calls its LayerNorms ln_1/ln_f, Llama calls its RMSNorms input_layernorm)."""
    import torch

    chosen = set()
    for module in model.modules():
        is_norm = isinstance(module, torch.nn.LayerNorm) or "norm" in type(module).__name__.lower()
        for name, param in module.named_parameters(recurse=False):
            if name == "bias" or (include_norms and is_norm and name == "weight"):
                chosen.add(id(param))
    return chosen


class BitFit(Method):
    name = "bitfit"
    Options = BitFitOptions

    def prepare(self, model, ctx):
        chosen = bitfit_params(model, self.options.include_norms)
        for param in model.parameters():
            param.requires_grad_(id(param) in chosen)
        if not chosen:
            raise ConfigError("method bitfit: the model has no bias or norm parameters to train; "
                              "set method.options.include_norms=true or use method.name=full")
        return model
