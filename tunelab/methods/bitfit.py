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


def is_bitfit_param(name: str, include_norms: bool) -> bool:
    last = name.rsplit(".", 1)[-1]
    if last == "bias":
        return True
    return include_norms and "norm" in name.lower() and last == "weight"


class BitFit(Method):
    name = "bitfit"
    Options = BitFitOptions

    def prepare(self, model):
        n_trainable = 0
        for name, p in model.named_parameters():
            p.requires_grad_(is_bitfit_param(name, self.options.include_norms))
            n_trainable += p.requires_grad
        if not n_trainable:
            raise ConfigError("method bitfit: the model has no bias or norm parameters to train; "
                              "set method.options.include_norms=true or use method.name=full")
        return model
