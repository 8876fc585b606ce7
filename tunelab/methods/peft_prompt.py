"""peft's prompt-learning methods: prompt tuning, prefix tuning, p-tuning (virtual tokens prepended;
causal LMs only; peft cannot merge them into weights, so `export --merge` refuses them).
"""

from __future__ import annotations

import tempfile
from typing import Literal, Optional

from pydantic import Field, model_validator
from tunelab.methods.peft_base import PeftMethod, _Options

# ---------------------------------------------------------------- prompt learning


class PromptTuningOptions(_Options):
    num_virtual_tokens: int = Field(20, ge=1)
    # random: N(0, 1) rows; sample_vocab: embeddings of random vocabulary tokens; text: of init_text's tokens
    init: Literal["random", "sample_vocab", "text"] = "sample_vocab"
    init_text: Optional[str] = None

    @model_validator(mode="after")
    def _text(self):
        if (self.init == "text") != bool(self.init_text):
            raise ValueError("init: text goes with init_text (the text whose token embeddings start the prompt)")
        return self


class PromptTuning(PeftMethod):
    """Prompt tuning (Lester et al., 2021): trained embeddings of num_virtual_tokens virtual tokens,
    prepended to every input; the model is untouched. Causal LMs only; position ids are dropped (peft
    ignores them), so packed documents are not kept apart within a window."""

    name = "prompt_tuning"
    label = "prompt-tuning"
    prompt_learning = True
    Options = PromptTuningOptions

    def peft_config(self, model, ctx, task_type):
        from peft import PromptTuningConfig

        o = self.options
        text = {}
        if o.init == "text":
            # peft reads the tokenizer from a path: the run's own, written to a temporary directory.
            self._tokenizer_dir = tempfile.TemporaryDirectory(prefix="tunelab-prompt-init-")
            ctx.tokenizer.save_pretrained(self._tokenizer_dir.name)
            text = {"prompt_tuning_init_text": o.init_text, "tokenizer_name_or_path": self._tokenizer_dir.name}
        return PromptTuningConfig(num_virtual_tokens=o.num_virtual_tokens, prompt_tuning_init=o.init.upper(),
                                  task_type=task_type, **text)

    def prepare(self, model, ctx):
        model = super().prepare(model, ctx)
        if self.options.init == "text":  # the temporary path is gone: record where the tokenizer lives
            model.peft_config["default"].tokenizer_name_or_path = self.base_path
            self._tokenizer_dir.cleanup()
        return model


class PrefixTuningOptions(_Options):
    num_virtual_tokens: int = Field(20, ge=1)
    projection: bool = False  # reparameterise the prefix through a 2-layer MLP (trained; only its output is saved)
    projection_hidden_size: Optional[int] = Field(None, ge=1)  # the MLP's width (default: the model's)

    @model_validator(mode="after")
    def _hidden(self):
        if self.projection_hidden_size is not None and not self.projection:
            raise ValueError("projection_hidden_size goes with projection: true")
        return self


class PrefixTuning(PeftMethod):
    """Prefix tuning (Li & Liang, 2021): trained key/value prefixes of num_virtual_tokens positions in
    every attention layer. Causal LMs only."""

    name = "prefix_tuning"
    label = "prefix-tuning"
    prompt_learning = True
    raw_checkpoints = True  # with a projection, peft saves the MLP's output, which cannot be trained on
    Options = PrefixTuningOptions

    def gradient_checkpointing_refusal(self):
        return ("prefix tuning hands its prefixes to the layers as past key values, which transformers drops in a "
                "checkpointed layer (peft refuses the pair)")

    def peft_config(self, model, ctx, task_type):
        from peft import PrefixTuningConfig

        o = self.options
        return PrefixTuningConfig(num_virtual_tokens=o.num_virtual_tokens, prefix_projection=o.projection,
                                  encoder_hidden_size=o.projection_hidden_size or model.config.hidden_size,
                                  task_type=task_type)


class PTuningOptions(_Options):
    num_virtual_tokens: int = Field(20, ge=1)
    encoder: Literal["mlp", "lstm"] = "mlp"  # the prompt encoder that produces the virtual tokens
    encoder_hidden_size: Optional[int] = Field(None, ge=1)  # default: the model's hidden size
    encoder_num_layers: int = Field(2, ge=1)
    encoder_dropout: float = Field(0.0, ge=0, lt=1)


class PTuning(PeftMethod):
    """P-tuning (Liu et al., 2021): virtual-token embeddings produced by a trained prompt encoder (MLP or
    LSTM), prepended to every input. Checkpoints hold the encoder; final/ holds its output (peft's form).
    Causal LMs only; position ids are dropped, as in prompt tuning."""

    name = "p_tuning"
    label = "p-tuning"
    prompt_learning = True
    raw_checkpoints = True  # peft saves the encoder's output only
    Options = PTuningOptions

    def peft_config(self, model, ctx, task_type):
        from peft import PromptEncoderConfig

        o = self.options
        return PromptEncoderConfig(num_virtual_tokens=o.num_virtual_tokens, encoder_reparameterization_type=o.encoder.upper(),
                                   encoder_hidden_size=o.encoder_hidden_size or model.config.hidden_size,
                                   encoder_num_layers=o.encoder_num_layers, encoder_dropout=o.encoder_dropout,
                                   task_type=task_type)
