"""LoRA (Hu et al., 2021), with the DoRA and rsLoRA variants, other initialisations (PiSSA, OLoRA,
...) and intruder-dimension mitigation, through HF peft.

The base model is frozen; peft wraps the targeted layers with low-rank factors A, B and trains
only those. Checkpoints hold only the adapter tensors (plus the base's hash, recorded by the
loop), and final/ is a plain PEFT adapter directory pointing at the base by absolute path, which
`peft.PeftModel.from_pretrained` and every tunelab command load. The shared machinery (checkpoints,
final/, target checks) is methods/peft_base.py; LoRA is one instance of it.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tunelab.methods.peft_base import LinearTargets, PeftMethod, check_targets

__all__ = ["LoRA", "LoRAOptions", "check_targets"]  # check_targets: importable from here, as before

# init -> peft's init_lora_weights. "default": A Kaiming-uniform, B = 0 (the reference LoRA).
_INITS = {"default": True, "gaussian": "gaussian", "pissa": "pissa", "olora": "olora", "orthogonal": "orthogonal"}
# These move the top singular directions of W into A, B and train on the residual W - s*B@A: the base
# in memory changes, so the adapter is converted at save time (peft's path_initial_model_for_weight_conversion).
_MUTATING = ("pissa", "olora")


class IntruderOptions(BaseModel):
    """peft's reduce_intruder_dimension ("LoRA vs Full Fine-tuning: An Illusion of Equivalence")."""
    model_config = ConfigDict(extra="forbid")
    top_k: int = Field(10, ge=1)  # how many of the tuned weight's top singular vectors are examined
    threshold_epsilon: float = Field(0.5, gt=0, lt=1)  # below this |cosine| to every base vector: an intruder
    mitigation_lambda: float = Field(0.75, ge=0, le=1)  # share of each intruder direction removed


class LoRAOptions(LinearTargets):
    r: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    use_rslora: bool = False  # scale alpha/sqrt(r) instead of alpha/r
    use_dora: bool = False  # weight-decomposed LoRA: also train a per-output-channel magnitude
    bias: Literal["none", "all", "lora_only"] = "none"
    # default | gaussian | orthogonal (even r) | pissa | pissa_niter_N (fast randomised SVD) | olora
    init: str = "default"
    # Remove intruder dimensions from the adapter when final/ is saved (true: peft's defaults).
    intruders: Optional[IntruderOptions] = None

    @field_validator("init")
    @classmethod
    def _init(cls, value):
        if value in _INITS or re.fullmatch(r"pissa_niter_\d+", value):
            return value
        raise ValueError(f"one of {', '.join(_INITS)} or pissa_niter_N")

    @field_validator("intruders", mode="before")
    @classmethod
    def _intruders(cls, value):
        if value is True:
            return {}
        return None if value is False else value

    @model_validator(mode="after")
    def _combinations(self):
        mutating = self.init.startswith(_MUTATING)
        if mutating and self.use_dora:
            raise ValueError(f"init {self.init} with use_dora: peft converts {self.init} adapters to plain LoRA "
                             "when saving, which has no DoRA magnitude")
        if self.init == "orthogonal" and self.r % 2:
            raise ValueError(f"init orthogonal needs an even r (got {self.r})")
        if self.intruders is not None and (self.use_dora or mutating):
            raise ValueError("intruders (mitigation) works on plain LoRA factors: not with use_dora or "
                             f"init {self.init}")
        return self


class LoRA(PeftMethod):
    name = "lora"
    label = "LoRA"
    target_kinds = "lora"
    Options = LoRAOptions
    quiet = ("(PiSSA|OLoRA) changes the base weights",)  # peft's advice to convert, which save_adapter does

    def peft_config(self, model, ctx, task_type):
        from peft import LoraConfig

        o = self.options
        init = _INITS.get(o.init, o.init)  # pissa_niter_N passes as is
        return LoraConfig(r=o.r, lora_alpha=o.alpha, lora_dropout=o.dropout, target_modules=o.target_modules,
                          use_rslora=o.use_rslora, use_dora=o.use_dora, bias=o.bias, init_lora_weights=init,
                          task_type=task_type)

    def prepare(self, model, ctx):
        model = super().prepare(model, ctx)
        self.initial = None
        if self.options.init.startswith(_MUTATING):
            # A0, B0 as initialised (the residual base is W - s*B0@A0); resume re-derives the same ones.
            from peft import get_peft_model_state_dict

            self.initial = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
        return model

    def adapter_info(self) -> dict:
        o = self.options
        info = {}
        if o.init != "default":
            info["init"] = o.init
        if o.init.startswith(_MUTATING):
            info["converted_to_lora"] = f"rank {2 * o.r} adapter on the original base (peft's {o.init} conversion)"
        if o.intruders is not None:
            info["intruders"] = {**o.intruders.model_dump(), "layers_mitigated": self.intruder_layers}
        return info

    def save_adapter(self, peft_model, out_dir: Path) -> None:
        if self.options.intruders is not None:
            self._mitigate_intruders(peft_model)
        if self.initial is None:
            return super().save_adapter(peft_model, out_dir)
        import tempfile

        from safetensors.torch import save_file

        # peft reads the initial adapter from a directory (it writes its config there itself) and saves
        # [A | A0], [B | -B0]: a rank-2r LoRA that computes W_res + s*B@A - W on the original base W.
        with tempfile.TemporaryDirectory(prefix="tunelab-lora-init-") as tmp:
            initial = Path(tmp) / "initial"
            initial.mkdir()
            save_file({k: v.contiguous() for k, v in self.initial.items()}, str(initial / "adapter_model.safetensors"))
            with warnings.catch_warnings():  # loading the initial adapter beside the trained one: peft's advice
                for message in self.quiet:   # to convert, which is what this does
                    warnings.filterwarnings("ignore", message=message)
                peft_model.save_pretrained(out_dir, save_embedding_layers=False,
                                           path_initial_model_for_weight_conversion=str(initial))

    def _mitigate_intruders(self, peft_model) -> None:
        """peft's mitigation writes a new adapter; its factors replace the trained ones in place, so the
        model in memory is what final/ holds. The last checkpoint keeps the unmitigated adapter."""
        import torch
        from peft.tuners.lora import LoraLayer
        from peft.tuners.lora.intruders import reduce_intruder_dimension

        found = []
        o = self.options.intruders
        reduce_intruder_dimension(peft_model, old_adapter_name="default", new_adapter_name="mitigated",
                                  top_k=o.top_k, threshold_epsilon=o.threshold_epsilon,
                                  mitigation_lambda=o.mitigation_lambda,
                                  logging_sink=lambda line: found.append(line) if ": Intruders:" in line else None)
        with torch.no_grad():
            for module in peft_model.modules():
                if not isinstance(module, LoraLayer):
                    continue
                for factors in (module.lora_A, module.lora_B, module.lora_embedding_A, module.lora_embedding_B):
                    if "mitigated" in factors:  # Linear modules (.weight) for layers, bare parameters for embeddings
                        old, new = factors["default"], factors["mitigated"]
                        getattr(old, "weight", old).copy_(getattr(new, "weight", new))
        peft_model.set_adapter("default")
        peft_model.delete_adapter("mitigated")
        self.intruder_layers = len(found)

