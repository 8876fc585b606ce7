"""LoRA (Hu et al., 2021), with the DoRA and rsLoRA variants, through HF peft.

The base model is frozen; peft wraps the targeted layers with low-rank factors A, B and trains
only those. Checkpoints hold only the adapter tensors (plus the base's hash, recorded by the
loop), and final/ is a plain PEFT adapter directory pointing at the base by absolute path, which
`peft.PeftModel.from_pretrained` and every tunelab command load.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from tunelab.errors import ConfigError
from tunelab.methods.base import Method


class LoRAOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    r: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    # Module-name suffixes ("q_proj", "self_attn.v_proj"), or every linear layer but the LM head.
    target_modules: Union[str, list[str]] = "all-linear"
    use_rslora: bool = False  # scale alpha/sqrt(r) instead of alpha/r
    use_dora: bool = False  # weight-decomposed LoRA: also train a per-output-channel magnitude
    bias: Literal["none", "all", "lora_only"] = "none"

    @field_validator("target_modules")
    @classmethod
    def _targets(cls, value):
        if isinstance(value, str) and value != "all-linear":
            value = [value]  # one module name
        if value == "all-linear" or (value and all(value)):
            return value
        raise ValueError("give a list of module-name suffixes (e.g. [q_proj, v_proj]) or 'all-linear'")


def _peft_model(model):
    """The PeftModel under a DDP (.module) or torch.compile (._orig_mod) wrapper: peft's helpers need it."""
    from peft import PeftModel

    while not isinstance(model, PeftModel):
        inner = model._modules.get("module", model._modules.get("_orig_mod"))
        if inner is None:
            raise TypeError(f"method lora: expected a peft model, got {type(model).__name__}")
        model = inner
    return model


def check_targets(model, targets: list[str]) -> None:
    """Fail before wrapping, with the names that would work: peft's own error is a multi-line dump."""
    import torch
    from transformers.pytorch_utils import Conv1D

    linear_types = (torch.nn.Linear, Conv1D)
    supported = linear_types + (torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
    modules = dict(model.named_modules())
    linear = sorted({name.rsplit(".", 1)[-1] for name, m in modules.items() if isinstance(m, linear_types)})
    hint = f"(linear modules: {', '.join(linear)})"
    for target in targets:
        hits = [m for name, m in modules.items() if name == target or name.endswith("." + target)]
        if not hits:
            raise ConfigError(f"method.options.target_modules: {target!r} matches no module of this "
                              f"{type(model).__name__} {hint}")
        wrong = [m for m in hits if not isinstance(m, supported)]
        if wrong:
            raise ConfigError(f"method.options.target_modules: {target!r} is a {type(wrong[0]).__name__}, "
                              f"which LoRA cannot adapt {hint}")


class LoRA(Method):
    name = "lora"
    Options = LoRAOptions

    def prepare(self, model, ctx):
        from peft import LoraConfig, PeftModel, TaskType, get_peft_model

        from tunelab import models

        path = ctx.recipe.model.path
        if path is None:
            raise ConfigError("method lora adapts a trained model: set model.path (e.g. runs/quickstart/final)")
        if isinstance(model, PeftModel):  # a bug in the caller, not a user error
            raise TypeError("LoRA.prepare needs a plain model; load adapter dirs with models.load_model(merge=True)")
        opts = self.options
        if opts.target_modules != "all-linear":
            check_targets(model, opts.target_modules)
        # What save_final records: the base by absolute path (final/ is written elsewhere and renamed)
        # and the hash of its weights, so that loading the adapter on other weights is refused.
        local = Path(path).expanduser()
        self.base_path = str(local.resolve()) if local.exists() else path
        self.base_sha256 = ctx.base_sha256 or models.weights_sha256(model)
        config = LoraConfig(r=opts.r, lora_alpha=opts.alpha, lora_dropout=opts.dropout,
                            target_modules=opts.target_modules, use_rslora=opts.use_rslora, use_dora=opts.use_dora,
                            bias=opts.bias, task_type=None if models.is_encoder(model) else TaskType.CAUSAL_LM)
        with warnings.catch_warnings():  # peft 0.21 probes a property transformers 5 deprecated
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
            return get_peft_model(model, config)

    def weights_to_save(self, model):
        from peft import get_peft_model_state_dict

        return {k: v.detach() for k, v in get_peft_model_state_dict(_peft_model(model)).items()}

    def load_weights(self, model, tensors):
        from peft import get_peft_model_state_dict, set_peft_model_state_dict

        model = _peft_model(model)
        # peft reports every frozen base weight as "missing": compare against the adapter's own keys.
        expected = set(get_peft_model_state_dict(model))
        missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        if missing or unexpected:
            raise RuntimeError(f"LoRA checkpoint does not match the adapter: {len(missing)} missing "
                               f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]})")
        set_peft_model_state_dict(model, tensors)

    def save_final(self, model, tokenizer, out_dir: Path) -> None:
        model = _peft_model(model)
        model.peft_config["default"].base_model_name_or_path = self.base_path
        # The vocabulary is never resized here, so no full embedding copies (peft's "auto" would look for
        # the base's config.json to decide, and warn when the base is itself an adapter).
        model.save_pretrained(out_dir, save_embedding_layers=False)
        tokenizer.save_pretrained(out_dir)
        info = {"method": self.name, "base": self.base_path, "base_weights_sha256": self.base_sha256}
        (Path(out_dir) / "tunelab_adapter.json").write_text(json.dumps(info, indent=2) + "\n")
