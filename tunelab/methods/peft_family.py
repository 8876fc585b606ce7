"""The HF peft adapter methods besides LoRA: AdaLoRA, IA3, LoHa, LoKr, VeRA, OFT, BOFT, SHiRA, LN tuning,
trainable tokens: one small Options model and config builder each on top of peft_base.PeftMethod.
Importing this module imports neither torch nor peft: recipes validate without them.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional, Union

from pydantic import Field, field_validator, model_validator

from tunelab.errors import ConfigError
from tunelab.methods.peft_base import LinearTargets, PeftMethod, _Options, _check_targets_value, _is_norm, peft_model_of


# ---------------------------------------------------------------- AdaLoRA


class AdaLoRAOptions(LinearTargets):
    target_r: int = Field(8, ge=1)  # average rank per matrix at the end of the budget schedule
    init_r: int = Field(12, ge=1)  # rank per matrix at the start
    # The budget schedule as shares of train.max_steps (peft's tinit, tfinal in steps), so that it keeps its
    # shape when max_steps changes: full budget first, then a cubic decrease, then the final ranks fixed.
    tinit_fraction: float = Field(0.1, ge=0, lt=1)
    tfinal_fraction: float = Field(0.2, ge=0, lt=1)
    delta_t: int = Field(1, ge=1)  # steps between budget allocations
    beta1: float = Field(0.85, gt=0, lt=1)  # smoothing of the importance (sensitivity)
    beta2: float = Field(0.85, gt=0, lt=1)  # smoothing of its uncertainty
    orth_reg_weight: float = Field(0.5, ge=0)  # weight of the orthogonality penalty on A and B (in the loss)
    alpha: float = Field(16.0, gt=0)  # scale alpha / init_r, as LoRA's alpha / r
    dropout: float = Field(0.0, ge=0, lt=1)

    @model_validator(mode="after")
    def _ranks(self):
        if self.target_r > self.init_r:
            raise ValueError(f"target_r ({self.target_r}) must be <= init_r ({self.init_r}): AdaLoRA only prunes ranks")
        if self.tinit_fraction + self.tfinal_fraction >= 1:
            raise ValueError(f"tinit_fraction ({self.tinit_fraction}) + tfinal_fraction ({self.tfinal_fraction}) must "
                             "be < 1: the budget schedule needs steps in between")
        return self


class AdaLoRA(PeftMethod):
    """AdaLoRA (Zhang et al., 2023): SVD-shaped LoRA (A, E, B) whose rank budget is reallocated across
    matrices by importance, from init_r per matrix down to target_r on average, on a cubic schedule
    over train.max_steps (ctx.max_steps).

    peft's `update_and_allocate(step)` needs the step's gradients and must come after the optimizer
    step (it zeroes pruned singular values, which the step must not move again). The loop frees the
    gradients before after_step, so after_backward keeps references to them (no copy) and after_step
    puts them back for peft's call. The allocator's smoothed importances (tensors) and the rank
    pattern (JSON) are method state, so a resumed run allocates exactly as an uninterrupted one.
    Checkpoints hold the full-rank A, E, B (pruned ranks are zeros); final/ holds peft's
    rank-trimmed adapter with the rank pattern in adapter_config.json.
    """

    name = "adalora"
    label = "AdaLoRA"
    Options = AdaLoRAOptions
    raw_checkpoints = True  # peft's saved form drops pruned ranks: it cannot be trained on

    def chunked_loss_refusal(self):
        if self.options.orth_reg_weight > 0:
            return ("peft adds AdaLoRA's orthogonality penalty to the model's own loss (orth_reg_weight > 0), "
                    "which the chunked loss does not compute")
        return None

    def peft_config(self, model, ctx, task_type):
        from peft import AdaLoraConfig

        o = self.options
        # floor(a) + floor(b) < max_steps whenever a + b < 1: peft's tinit < total_step - tfinal always holds.
        tinit, tfinal = int(o.tinit_fraction * ctx.max_steps), int(o.tfinal_fraction * ctx.max_steps)
        self._grads = None
        return AdaLoraConfig(target_r=o.target_r, init_r=o.init_r, tinit=tinit, tfinal=tfinal, deltaT=o.delta_t,
                             beta1=o.beta1, beta2=o.beta2, orth_reg_weight=o.orth_reg_weight, total_step=ctx.max_steps,
                             lora_alpha=o.alpha, lora_dropout=o.dropout, target_modules=o.target_modules,
                             task_type=task_type)

    def prepare(self, model, ctx):
        self.peft = super().prepare(model, ctx)
        return self.peft

    def after_backward(self, model, step):
        self._grads = [(p, p.grad) for p in self._trainable(model).values()]

    def after_step(self, model, step):
        grads, self._grads = self._grads, None
        for p, grad in grads:
            p.grad = grad
        try:
            peft_model_of(model).base_model.update_and_allocate(step)
        finally:
            for p, _ in grads:
                p.grad = None

    def _allocator(self):
        return self.peft.base_model.rankallocator

    def tensor_state(self):
        alloc = self._allocator()
        return {f"{kind}/{name}": t for kind in ("ipt", "exp_avg_ipt", "exp_avg_unc")
                for name, t in getattr(alloc, kind).items()}

    def load_tensor_state(self, tensors):
        alloc = self._allocator()
        alloc.reset_ipt()
        for key, value in tensors.items():
            kind, name = key.split("/", 1)
            getattr(alloc, kind)[name] = value.to(self.peft.device)

    def save_adapter(self, peft_model, out_dir: Path) -> None:
        with warnings.catch_warnings():  # a matrix whose ranks were all pruned is saved as 0-sized A, B: correct
            warnings.filterwarnings("ignore", message=".*tensor\\(s\\) have invalid shape")
            super().save_adapter(peft_model, out_dir)
        # final/ holds only the ranks kept; trim the model in memory the same way, so that it computes
        # exactly (bit for bit) what final/ loads to, rather than summing zeros in another order.
        pattern = peft_model.peft_config["default"].rank_pattern
        if pattern:
            peft_model.base_model.resize_modules_by_rank_pattern(pattern, "default")

    def state_dict(self):
        return {"rank_pattern": self.peft.peft_config["default"].rank_pattern}

    def load_state_dict(self, state):
        self.peft.peft_config["default"].rank_pattern = state.get("rank_pattern")


# ---------------------------------------------------------------- IA3


class IA3Options(_Options):
    # None: peft's defaults for the architecture (llama: k_proj, v_proj, down_proj; bert: key, value, output.dense)
    target_modules: Optional[Union[str, list[str]]] = None
    # the targets whose input (not output) is scaled; must be among target_modules
    feedforward_modules: Optional[list[str]] = None

    @field_validator("target_modules")
    @classmethod
    def _targets(cls, value):
        return _check_targets_value(value, allow_none=True)

    @model_validator(mode="after")
    def _feedforward(self):
        if self.feedforward_modules is not None:
            if self.target_modules is None:
                raise ValueError("feedforward_modules needs target_modules (it picks among them)")
            if isinstance(self.target_modules, list) and not set(self.feedforward_modules) <= set(self.target_modules):
                raise ValueError(f"feedforward_modules {self.feedforward_modules} must be among target_modules "
                                 f"{self.target_modules}")
        return self


class IA3(PeftMethod):
    """(IA)^3 (Liu et al., 2022): learned per-channel scales of chosen activations (one vector per module)."""

    name = "ia3"
    label = "IA3"
    Options = IA3Options

    def peft_config(self, model, ctx, task_type):
        from peft import IA3Config

        o = self.options
        feedforward = o.feedforward_modules
        if o.target_modules is not None and feedforward is None:
            feedforward = []  # own targets: every one scales its output unless named here
        return IA3Config(target_modules=o.target_modules, feedforward_modules=feedforward, task_type=task_type)


# ---------------------------------------------------------------- LyCORIS: LoHa, LoKr


class LoHaOptions(LinearTargets):
    r: int = Field(8, ge=1)
    alpha: float = Field(8.0, gt=0)  # scale alpha / r
    rank_dropout: float = Field(0.0, ge=0, lt=1)  # drops ranks of the update, per step
    module_dropout: float = Field(0.0, ge=0, lt=1)  # drops the whole module's update, per step


class LoHa(PeftMethod):
    """LoHa (FedPara; LyCORIS): the update is the Hadamard product of two low-rank products."""

    name = "loha"
    label = "LoHa"
    Options = LoHaOptions

    def peft_config(self, model, ctx, task_type):
        from peft import LoHaConfig

        o = self.options
        return LoHaConfig(r=o.r, alpha=o.alpha, rank_dropout=o.rank_dropout, module_dropout=o.module_dropout,
                          target_modules=o.target_modules, task_type=task_type)


class LoKrOptions(LoHaOptions):
    decompose_both: bool = False  # also factor the left Kronecker factor into low rank
    decompose_factor: int = -1  # -1: factor each dimension as evenly as possible

    @field_validator("decompose_factor")
    @classmethod
    def _factor(cls, value):
        if value == -1 or value >= 1:
            return value
        raise ValueError("decompose_factor is -1 (balanced) or a positive integer")


class LoKr(PeftMethod):
    """LoKr (LyCORIS): the update is a Kronecker product of a small matrix and a low-rank one."""

    name = "lokr"
    label = "LoKr"
    Options = LoKrOptions

    def peft_config(self, model, ctx, task_type):
        from peft import LoKrConfig

        o = self.options
        return LoKrConfig(r=o.r, alpha=o.alpha, rank_dropout=o.rank_dropout, module_dropout=o.module_dropout,
                          decompose_both=o.decompose_both, decompose_factor=o.decompose_factor,
                          target_modules=o.target_modules, task_type=task_type)


# ---------------------------------------------------------------- VeRA


class VeRAOptions(LinearTargets):
    r: int = Field(256, ge=1)  # rank of the shared frozen random projections
    d_initial: float = Field(0.1, gt=0)  # initial value of the trained scaling vector d
    dropout: float = Field(0.0, ge=0, lt=1)
    projection_prng_key: int = Field(0, ge=0)  # seed of the shared projections (saved with the adapter)


class VeRA(PeftMethod):
    """VeRA (Kopiczko et al., 2024): one pair of frozen random matrices shared by all layers; each layer
    trains only two scaling vectors. The projections are saved with the adapter (save_projection)."""

    name = "vera"
    label = "VeRA"
    Options = VeRAOptions

    def peft_config(self, model, ctx, task_type):
        from peft import VeraConfig

        o = self.options
        return VeraConfig(r=o.r, d_initial=o.d_initial, vera_dropout=o.dropout, projection_prng_key=o.projection_prng_key,
                          save_projection=True, target_modules=o.target_modules, task_type=task_type)


# ---------------------------------------------------------------- orthogonal: OFT, BOFT


class OFTOptions(LinearTargets):
    block_size: int = Field(32, ge=0)  # size of each orthogonal block (set this or r, the other 0)
    r: int = Field(0, ge=0)  # number of blocks
    coft: bool = False  # constrained OFT: keep R within eps of the identity
    eps: float = Field(6e-5, gt=0)
    block_share: bool = False  # one block shared along the diagonal
    dropout: float = Field(0.0, ge=0, lt=1)  # drops whole blocks (multiplicative dropout)

    @model_validator(mode="after")
    def _one_of(self):
        if (self.block_size == 0) == (self.r == 0):
            raise ValueError(f"set exactly one of block_size ({self.block_size}) and r ({self.r}); the other 0")
        return self


class OFT(PeftMethod):
    """OFT (Qiu et al., 2023): each weight is rotated by a trained block-diagonal orthogonal matrix."""

    name = "oft"
    label = "OFT"
    Options = OFTOptions

    def peft_config(self, model, ctx, task_type):
        from peft import OFTConfig

        o = self.options
        return OFTConfig(oft_block_size=o.block_size, r=o.r, coft=o.coft, eps=o.eps, block_share=o.block_share,
                         module_dropout=o.dropout, target_modules=o.target_modules, task_type=task_type)


class BOFTOptions(LinearTargets):
    block_size: int = Field(4, ge=0)  # set this or block_num, the other 0
    block_num: int = Field(0, ge=0)
    n_butterfly_factor: int = Field(1, ge=1)  # butterfly factors: 1 is plain block-diagonal OFT
    dropout: float = Field(0.0, ge=0, lt=1)

    @model_validator(mode="after")
    def _one_of(self):
        if (self.block_size == 0) == (self.block_num == 0):
            raise ValueError(f"set exactly one of block_size ({self.block_size}) and block_num ({self.block_num}); "
                             "the other 0")
        return self


class BOFT(PeftMethod):
    """BOFT (Liu et al., 2024): OFT with the orthogonal matrix a product of butterfly factors."""

    name = "boft"
    label = "BOFT"
    Options = BOFTOptions
    # Without its CUDA extension peft warns twice per layer; one butterfly factor needs none.
    quiet = ("Failed to load the CUDA extension", "Setting boft_n_butterfly_factor to 1")

    def peft_config(self, model, ctx, task_type):
        from peft import BOFTConfig
        from peft.tuners.boft.layer import get_fbd_cuda

        o = self.options
        # peft builds butterfly factors > 1 with its CUDA extension only, and silently uses 1 without it.
        if o.n_butterfly_factor > 1 and get_fbd_cuda() is None:
            raise ConfigError(f"method.options (boft): n_butterfly_factor {o.n_butterfly_factor} needs peft's fbd_cuda "
                              "extension (CUDA and ninja), which cannot be built here; use n_butterfly_factor: 1")
        return BOFTConfig(boft_block_size=o.block_size, boft_block_num=o.block_num,
                          boft_n_butterfly_factor=o.n_butterfly_factor, boft_dropout=o.dropout,
                          target_modules=o.target_modules, task_type=task_type)


# ---------------------------------------------------------------- SHiRA


class SHiRAOptions(LinearTargets):
    r: int = Field(32, ge=1)  # trains r * (rows + columns) entries of each targeted matrix, at random places


class SHiRA(PeftMethod):
    """SHiRA (Bhardwaj et al., 2024): a sparse high-rank adapter, a fixed random subset of each weight's
    entries is trained (the positions are drawn from the seeded RNG and saved with the adapter)."""

    name = "shira"
    label = "SHiRA"
    Options = SHiRAOptions

    def peft_config(self, model, ctx, task_type):
        from peft import ShiraConfig

        return ShiraConfig(r=self.options.r, target_modules=self.options.target_modules, task_type=task_type)


# ---------------------------------------------------------------- LN tuning, trainable tokens


class LNTuningOptions(_Options):
    # None: every normalisation layer of the model (llama: input_layernorm, post_attention_layernorm, norm)
    target_modules: Optional[Union[str, list[str]]] = None

    @field_validator("target_modules")
    @classmethod
    def _targets(cls, value):
        if value == "all-linear":
            raise ValueError("LN tuning adapts normalisation layers: give their names (e.g. [input_layernorm]) "
                             "or leave it unset")
        return _check_targets_value(value, allow_none=True)


class LNTuning(PeftMethod):
    """LN tuning (Qi et al., 2022): train (copies of) the normalisation layers' gains and biases."""

    name = "ln_tuning"
    label = "LN tuning"
    target_kinds = "norm"
    Options = LNTuningOptions
    quiet = ("Unsupported layer type",)  # peft asks every layer for in/out features; a norm layer needs none

    def peft_config(self, model, ctx, task_type):
        from peft import LNTuningConfig

        targets = self.options.target_modules
        if targets is None:  # every normalisation layer (peft knows defaults for a few architectures only)
            targets = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if name and _is_norm(m)})
        return LNTuningConfig(target_modules=targets, task_type=task_type)


class TrainableTokensOptions(_Options):
    # The tokens whose embedding rows train (ids, or tokens as the tokenizer spells them); the rest stay frozen.
    tokens: list[Union[int, str]] = Field(min_length=1)


class TrainableTokens(PeftMethod):
    """Trainable tokens (peft): train only the embedding rows of chosen tokens (e.g. new special
    tokens); a tied LM head follows, since it shares the rows."""

    name = "trainable_tokens"
    label = "trainable-tokens"
    Options = TrainableTokensOptions

    def peft_config(self, model, ctx, task_type):
        from peft import TrainableTokensConfig

        head = model.get_output_embeddings()
        if head is not None and head.weight is model.get_input_embeddings().weight and head.bias is not None:
            # peft 0.21 computes a tied output layer as F.linear(x, W) without its bias: it would train and
            # save a model without the output bias, while export --merge keeps it.
            raise ConfigError(f"method trainable_tokens: this {type(model).__name__}'s output layer is tied to the "
                              "embeddings and has a bias, which peft's trainable tokens drop; use lora or ln_tuning")
        vocab = model.get_input_embeddings().weight.shape[0]
        ids = []
        for token in self.options.tokens:
            if isinstance(token, str):
                found = ctx.tokenizer.convert_tokens_to_ids(token)
                if found is None or found == ctx.tokenizer.unk_token_id:
                    raise ConfigError(f"method.options.tokens: {token!r} is not a token of this tokenizer "
                                      "(give token ids, or tokens as the tokenizer spells them)")
                token = found
            if not 0 <= token < vocab:
                raise ConfigError(f"method.options.tokens: id {token} is outside the embedding's {vocab} rows")
            ids.append(token)
        return TrainableTokensConfig(token_indices=sorted(set(ids)), task_type=task_type)
