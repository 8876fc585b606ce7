"""The machinery every HF peft method shares (`PeftMethod`), the option pieces and the helpers lora.py
uses (what models.py and export.py need of peft is in tunelab/adapters.py). The methods themselves: peft_family.py (adapters), peft_prompt.py
(prompt learning) and peft_generic.py (any other peft type); LoRA in lora.py.

What every peft method shares (`PeftMethod`):
  - prepare: the model must come from model.path (an adapter records its base); named target
    modules are checked first (a one-line error listing the model's modules); peft's own refusals
    become one-line errors; the base's absolute path and weights sha256 are kept for save_final.
  - checkpoints hold only the adapter (peft's state dict, or the raw trainable tensors where
    peft's saved form cannot be trained on: AdaLoRA's pruned ranks, p-tuning's prompt encoder);
  - final/ is a plain PEFT adapter directory (adapter_config.json + adapter_model.safetensors)
    plus tunelab_adapter.json (method, base path, base weights sha256), which
    `peft.PeftModel.from_pretrained` and `tunelab.models.load_model` load; models.load_adapter
    refuses it on other base weights.
  - prompt-learning methods (prompt, prefix and p-tuning) prepend virtual tokens: causal LMs only,
    and peft cannot merge them into weights (`export --merge` says so).

LoRA itself (with its init variants and intruder-dimension mitigation) is in methods/lora.py.
Importing this module imports neither torch nor peft: recipes validate without them.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Union

from pydantic import BaseModel, ConfigDict, field_validator

from tunelab.adapters import fit_for_tunelab
from tunelab.errors import ConfigError
from tunelab.methods.base import Method

# ---------------------------------------------------------------- helpers shared with lora.py and models.py


def peft_model_of(model):
    """The PeftModel under a DDP (.module) or torch.compile (._orig_mod) wrapper: peft's helpers need it."""
    from peft import PeftModel

    while not isinstance(model, PeftModel):
        inner = model._modules.get("module", model._modules.get("_orig_mod"))
        if inner is None:
            raise TypeError(f"expected a peft model, got {type(model).__name__}")
        model = inner
    return model


def _is_norm(module) -> bool:
    return "Norm" in type(module).__name__  # LayerNorm, LlamaRMSNorm, ...: no common base class


def check_targets(model, targets: list[str], method: str = "LoRA", kinds: str = "lora") -> None:
    """Fail before wrapping, with the names that would work: peft's own error is a multi-line dump.

    kinds: "lora" (linear layers, embeddings and convolutions), "linear" (linear layers only), "norm"
    (normalisation layers, for LN tuning). The hint lists the model's module names of that kind.
    """
    import torch
    from transformers.pytorch_utils import Conv1D

    linear_types = (torch.nn.Linear, Conv1D)
    modules = dict(model.named_modules())
    if kinds == "norm":
        accepts, listed, what = _is_norm, _is_norm, "normalisation"
    else:
        extra = (torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d) if kinds == "lora" else ()
        accepts = lambda m: isinstance(m, linear_types + extra)  # noqa: E731
        listed, what = (lambda m: isinstance(m, linear_types)), "linear"
    names = sorted({name.rsplit(".", 1)[-1] for name, m in modules.items() if name and listed(m)})
    hint = f"({what} modules: {', '.join(names)})"
    for target in targets:
        hits = [m for name, m in modules.items() if name == target or name.endswith("." + target)]
        if not hits:
            raise ConfigError(f"method.options.target_modules: {target!r} matches no module of this "
                              f"{type(model).__name__} {hint}")
        wrong = [m for m in hits if not accepts(m)]
        if wrong:
            raise ConfigError(f"method.options.target_modules: {target!r} is a {type(wrong[0]).__name__}, "
                              f"which {method} cannot adapt {hint}")


def one_line(err: Exception) -> str:
    return " ".join(str(err).split())[:300]


# ---------------------------------------------------------------- option pieces


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _check_targets_value(value, allow_none: bool = False):
    if value is None and allow_none:
        return value
    if isinstance(value, str) and value != "all-linear":
        value = [value]  # one module name
    if value == "all-linear" or (isinstance(value, list) and value and all(value)):
        return value
    raise ValueError("give a list of module-name suffixes (e.g. [q_proj, v_proj]) or 'all-linear'")


class LinearTargets(_Options):
    # Module-name suffixes ("q_proj", "self_attn.v_proj"), or every linear layer but the LM head.
    target_modules: Union[str, list[str]] = "all-linear"

    @field_validator("target_modules")
    @classmethod
    def _targets(cls, value):
        return _check_targets_value(value)


# ---------------------------------------------------------------- the shared machinery


class PeftMethod(Method):
    """A method that wraps the model with one peft adapter ("default") and trains only the adapter."""

    label = "peft"  # how messages name the method (LoRA, IA3, ...)
    target_kinds = "linear"  # what named target modules may be (check_targets)
    prompt_learning = False  # virtual tokens: causal LMs only, not mergeable
    raw_checkpoints = False  # checkpoints hold the trainable tensors themselves, not peft's saved form
    quiet = ()  # peft warnings (message regexes) that say nothing about this use of the method

    def peft_config(self, model, ctx, task_type):
        """The peft config for this model (task_type: CAUSAL_LM, or None for an encoder)."""
        raise NotImplementedError

    def prepare(self, model, ctx):
        from peft import PeftModel, TaskType, get_peft_model

        from tunelab import models

        path = ctx.recipe.model.path
        if path is None:
            raise ConfigError(f"method {self.name} adapts a trained model: set model.path (e.g. runs/quickstart/final)")
        if isinstance(model, PeftModel):  # a bug in the caller, not a user error
            raise TypeError(f"{type(self).__name__}.prepare needs a plain model; load adapter dirs with "
                            "models.load_model(merge=True)")
        encoder = models.is_encoder(model)
        if encoder and self.prompt_learning:
            raise ConfigError(f"method {self.name}: {self.label} prepends virtual tokens, which peft supports for "
                              f"causal LMs only; {model.config.model_type} is a masked-LM encoder (use lora or ia3)")
        if self.prompt_learning:  # the virtual tokens take positions too
            limit, n = models.max_positions(model), self.options.num_virtual_tokens
            seq_len = getattr(getattr(ctx.recipe, "data", None), "seq_len", None)
            if limit and seq_len and seq_len + n > limit:
                raise ConfigError(f"method.options.num_virtual_tokens: {n} virtual tokens + data.seq_len {seq_len} "
                                  f"exceed the model's {limit} positions")
        targets = getattr(self.options, "target_modules", None)
        if isinstance(targets, list):
            check_targets(model, targets, self.label, self.target_kinds)
        # What save_final records: the base by absolute path (final/ is written elsewhere and renamed)
        # and the hash of its weights, so that loading the adapter on other weights is refused.
        local = Path(path).expanduser()
        self.base_path = str(local.resolve()) if local.exists() else path
        self.base_sha256 = ctx.base_sha256 or models.weights_sha256(model)
        config = self.peft_config(model, ctx, None if encoder else TaskType.CAUSAL_LM)
        with warnings.catch_warnings():
            for message in (".*is_gradient_checkpointing.*",) + self.quiet:  # that one: peft 0.21 on transformers 5
                warnings.filterwarnings("ignore", message=message)
            try:
                peft_model = get_peft_model(model, config)
            except (ValueError, TypeError, NotImplementedError) as err:  # e.g. a block size that does not divide
                raise ConfigError(f"method.options ({self.name}): peft cannot apply {self.label} to this "
                                  f"{type(model).__name__}: {one_line(err)}") from None
        return fit_for_tunelab(peft_model)

    # ---- checkpoints: the adapter only

    def _trainable(self, model) -> dict:
        return {n: p for n, p in peft_model_of(model).named_parameters() if p.requires_grad}

    def weights_to_save(self, model):
        from peft import get_peft_model_state_dict

        if self.raw_checkpoints:
            tensors = {n: p.detach() for n, p in self._trainable(model).items()}
        else:
            tensors = {k: v.detach() for k, v in get_peft_model_state_dict(peft_model_of(model)).items()}
        # One tensor under two names (an adapter on tied embeddings): safetensors stores each once.
        seen = set()
        for key, value in tensors.items():
            if value.data_ptr() in seen:
                tensors[key] = value.clone()
            seen.add(value.data_ptr())
        return tensors

    def load_weights(self, model, tensors):
        import torch
        from peft import get_peft_model_state_dict, set_peft_model_state_dict

        model = peft_model_of(model)
        # peft reports every frozen base weight as "missing": compare against the adapter's own keys.
        expected = set(self._trainable(model) if self.raw_checkpoints else get_peft_model_state_dict(model))
        missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        if missing or unexpected:
            raise RuntimeError(f"{self.label} checkpoint does not match the adapter: {len(missing)} missing "
                               f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]})")
        if self.raw_checkpoints:
            params = self._trainable(model)
            with torch.no_grad():
                for name, value in tensors.items():
                    params[name].copy_(value)
        else:
            set_peft_model_state_dict(model, tensors)

    # ---- final/: a PEFT adapter directory

    def adapter_info(self) -> dict:
        """Extra facts for tunelab_adapter.json (how the adapter was made)."""
        return {}

    def save_adapter(self, peft_model, out_dir: Path) -> None:
        # The vocabulary is never resized here, so no full embedding copies (peft's "auto" would look for
        # the base's config.json to decide, and warn when the base is itself an adapter).
        peft_model.save_pretrained(out_dir, save_embedding_layers=False)

    def save_final(self, model, tokenizer, out_dir: Path) -> None:
        import json

        from tunelab.paths import ADAPTER_INFO

        model = peft_model_of(model)
        model.peft_config["default"].base_model_name_or_path = self.base_path
        self.save_adapter(model, Path(out_dir))
        tokenizer.save_pretrained(out_dir)
        info = {"method": self.name, "base": self.base_path, "base_weights_sha256": self.base_sha256,
                **self.adapter_info()}
        (Path(out_dir) / ADAPTER_INFO).write_text(json.dumps(info, indent=2) + "\n")
