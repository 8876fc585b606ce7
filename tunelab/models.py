"""Build or load HF models and adapters (their tokenizers: tunelab/tokenizers.py; where a model lives,
`package:NAME` and adapter directories: tunelab/paths.py).

Tiny presets make every method runnable on a laptop CPU in seconds; `model.path` loads any
local directory (or a hub id, for users with network) that `transformers` can load, or a model
shipped inside an installed Python package: `package:NAME` (see resolve_model_path).
Everything is saved with `save_pretrained`, so plain `AutoModelForCausalLM` / `AutoTokenizer`
read our outputs.
"""

from __future__ import annotations

from pathlib import Path

from tunelab.arch import attn_implementation as family_attention
from tunelab.errors import ModelError
from tunelab.paths import adapter_base, adapter_info, check_exists, is_adapter_dir, resolve_model_path
from tunelab.tokenizers import eos_id

# name -> (architecture, HF config fields). Parameter counts are for the default vocab (4096).
PRESETS: dict[str, tuple[str, dict]] = {
    # ~0.2M params: for unit tests of the math.
    "llama-micro": ("llama", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=2, num_key_value_heads=2)),
    # ~1M params
    "llama-tiny": ("llama", dict(hidden_size=128, intermediate_size=352, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=4)),
    # ~20M params (with a 8192 vocab)
    "llama-small": ("llama", dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=6,
                                  num_attention_heads=8, num_key_value_heads=8)),
    # BERT-style encoder with a masked-LM head, ~1M params
    "bert-tiny": ("bert", dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                               num_attention_heads=2)),
}

# Model types loaded with a masked-LM head (AutoModelForMaskedLM) and trained/evaluated with MLM.
ENCODER_TYPES = {"bert", "roberta", "distilbert", "electra", "xlm-roberta", "deberta", "deberta-v2", "modernbert"}


def is_encoder(model) -> bool:
    return not getattr(model.config, "is_decoder", False) and model.config.model_type in ENCODER_TYPES


def max_positions(model) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


def _config_class(arch: str):
    from transformers import BertConfig, LlamaConfig

    return LlamaConfig if arch == "llama" else BertConfig


def _first_error(err: Exception) -> str:
    # transformers' validation errors put the reason on the lines after a generic header.
    return " ".join(line.strip() for line in str(err).splitlines() if line.strip())[:300]


def check_preset(preset: str, overrides: dict) -> None:
    """Unknown presets and misspelt override keys fail at recipe validation, before any work.

    HF configs accept any keyword silently: a typo would train a different model than asked for.
    """
    from tunelab.config import did_you_mean

    if preset not in PRESETS:
        raise ModelError(f"model.preset: unknown preset {preset!r}{did_you_mean(preset, PRESETS)}; "
                         f"known: {', '.join(PRESETS)}")
    config_cls = _config_class(PRESETS[preset][0])
    known = set(config_cls().to_dict())
    for key in overrides:
        if key not in known:
            raise ModelError(f"model.overrides.{key}: not a {config_cls.__name__} field{did_you_mean(key, known)}")
    try:  # values too: e.g. a hidden size that the number of heads does not divide
        config_cls(**{**PRESETS[preset][1], **overrides})
    except Exception as err:
        raise ModelError(f"model.overrides: {_first_error(err)}") from None


def build_model(preset: str, tokenizer, overrides: dict | None = None, attn_implementation: str = "sdpa"):
    from transformers import BertForMaskedLM, LlamaForCausalLM

    check_preset(preset, overrides or {})
    arch, fields = PRESETS[preset]
    config_cls, model_cls = _config_class(arch), (LlamaForCausalLM if arch == "llama" else BertForMaskedLM)
    eos = eos_id(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    defaults = dict(max_position_embeddings=2048, tie_word_embeddings=True, bos_token_id=eos, eos_token_id=eos) \
        if arch == "llama" else dict(max_position_embeddings=512)
    fields = {**defaults, **fields, "vocab_size": len(tokenizer), "pad_token_id": pad, **(overrides or {})}
    try:
        config = config_cls(**fields)
    except Exception as err:  # transformers 5 raises its own strict-dataclass errors for bad values
        raise ModelError(f"model.overrides: {_first_error(err)}") from None
    config._attn_implementation = attn_implementation
    try:
        return model_cls(config)
    except Exception as err:  # e.g. hidden_size not divisible by num_attention_heads
        raise ModelError(f"model.overrides: cannot build {preset} ({_first_error(err)})") from None


def _stderr_rank0(message: str) -> None:
    import os
    import sys

    if os.environ.get("RANK", "0") == "0":  # one line per run, not one per DDP process
        print(message, file=sys.stderr, flush=True)


def load_model(path: str, attn_implementation: str = "sdpa", field: str = "model.path", merge: bool = False,
               base: str | None = None, log=None):
    """A saved model directory, or a PEFT adapter directory (see load_adapter: `merge`, `base`).

    An encoder is loaded with its masked-LM head; a bare encoder checkpoint (e.g. a BertModel, as
    sentence-embedding models ship) gets a new head whose decoder is tied to the input embeddings
    (see _complete_mlm_head), said in one line through `log` (default: stderr, rank 0).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM

    check_exists(path, field)
    shown, path = path, resolve_model_path(path, field)
    if is_adapter_dir(path):
        return load_adapter(path, attn_implementation, field, merge=merge, base=base)[0]
    local = {"local_files_only": True} if Path(path).expanduser().is_dir() else {}  # never a hub call for a dir
    try:
        config = AutoConfig.from_pretrained(path, **local)
    except (OSError, ValueError) as err:
        raise ModelError(f"{field}: cannot load {path} ({str(err).splitlines()[0]}); "
                         "give a directory written by save_pretrained (config.json + weights)") from None
    attn_implementation = family_attention(config, attn_implementation)  # gemma2 has no sdpa
    if config.model_type not in ENCODER_TYPES:
        return AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn_implementation, dtype="float32",
                                                    **local)
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its missing-keys report would say "corrupted" for a bare encoder: we say why
    try:
        model, info = AutoModelForMaskedLM.from_pretrained(path, attn_implementation=attn_implementation,
                                                           dtype="float32", output_loading_info=True, **local)
    finally:
        hf_logging.set_verbosity(verbosity)
    _complete_mlm_head(model, set(info.get("missing_keys") or ()), shown, field, log or _stderr_rank0)
    return model


def _complete_mlm_head(model, missing: set[str], shown: str, field: str, log) -> None:
    """Check what a masked-LM load filled in: every encoder weight must come from the checkpoint; a head
    absent from it (a bare encoder) is initialised with its decoder tied to the input embeddings and a
    zero output bias (the transform layer keeps transformers' own init), and said in one line.

    A key is missing only if no loaded key shares its tensor (the decoder is tied to the embeddings,
    its bias to the head's bias), so a checkpoint that stores a tied tensor once is complete.
    """
    import torch

    state = model.state_dict()
    prefix = model.base_model_prefix + "."
    loaded = {state[k].data_ptr() for k in state if k not in missing}
    missing = {k for k in missing if k in state and state[k].data_ptr() not in loaded}
    encoder = sorted(k for k in missing if k.startswith(prefix))
    if encoder:
        raise ModelError(f"{field}: {shown} lacks {len(encoder)} encoder weights ({', '.join(encoder[:3])}"
                         f"{', ...' if len(encoder) > 3 else ''}): give a complete checkpoint")
    head = sorted(missing)
    if not head:
        return
    embeddings, decoder = model.get_input_embeddings(), model.get_output_embeddings()
    head_loaded = [k for k in state if not k.startswith(prefix) and k not in missing
                   and state[k].data_ptr() != embeddings.weight.data_ptr()]
    if head_loaded or decoder is None:
        raise ModelError(f"{field}: {shown} has an incomplete masked-LM head (missing {', '.join(head[:3])}): "
                         "give a checkpoint with the whole head, or a bare encoder")
    if decoder.weight is not embeddings.weight:
        decoder.weight = embeddings.weight
    model.config.tie_word_embeddings = True
    if getattr(decoder, "bias", None) is not None:
        with torch.no_grad():
            decoder.bias.zero_()
    log(f"{shown} has no MLM head: initialised one tied to the input embeddings")


def check_objective(model, objective) -> None:
    """An encoder trained on next-token labels would learn to copy its input: refuse it (and the converse)."""
    if is_encoder(model) and objective.model_kind != "encoder":
        raise ModelError(f"{model.config.model_type} is a masked-LM encoder: set objective.name: mlm "
                         f"(not {objective.name})")
    if not is_encoder(model) and objective.model_kind == "encoder":
        raise ModelError(f"{model.config.model_type} is a causal decoder: set objective.name: clm (or unset it)")


def unwrapped(model):
    """The module under torch.compile and DDP wrappers."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model) if type(model).__name__ == "DistributedDataParallel" else model


def enable_gradient_checkpointing(model) -> None:
    """train.gradient_checkpointing: every layer recomputes its activations in the backward pass.

    Non-reentrant (torch's recommended form): it needs no input that requires grad, so it works under
    frozen embeddings and peft adapters, and with DDP and torch.compile. It acts only in train mode:
    evaluation and no-grad forwards (MeZO, a DPO reference) are unchanged."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ModelError(f"{type(model).__name__} does not support gradient checkpointing in transformers: set "
                         "train.gradient_checkpointing: false")
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


def check_pair(model, tokenizer, seq_len: int) -> None:
    """One-line errors for the two classic mismatches, before any training starts."""
    vocab = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > vocab:
        raise ModelError(f"tokenizer has {len(tokenizer)} tokens but the model's embedding has {vocab} rows: "
                         "use the model's own tokenizer (unset tokenizer.path) or resize the vocabulary first")
    limit = max_positions(model)
    if limit is not None and seq_len > limit:
        raise ModelError(f"data.seq_len={seq_len} is beyond the model's {limit} positions: "
                         f"set data.seq_len <= {limit}")


def count_params(model, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


# ---------------------------------------------------------------- adapters and weight hashes

def weights_sha256(model_or_state_dict) -> str:
    """sha256 of a model's weights: sorted names, dtype, shape and raw bytes of every tensor.

    A tensor shared under several names (tied embeddings) is hashed once, under its first name in
    sorted order, so a model and its save_pretrained/from_pretrained reload hash the same.
    """
    import hashlib

    import torch

    state = model_or_state_dict if isinstance(model_or_state_dict, dict) else model_or_state_dict.state_dict()
    digest, seen = hashlib.sha256(), set()
    for name in sorted(state):
        tensor = state[name].detach()
        key = (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
               tuple(tensor.stride()), tensor.dtype)
        if key in seen:
            continue
        seen.add(key)
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def load_adapter(path, attn_implementation: str = "sdpa", field: str = "model.path", merge: bool = False,
                 base: str | None = None):
    """(model, base path, base weights sha256) for an adapter directory, in eval mode.

    The base is loaded with load_model (so an adapter on an adapter works: its base comes back
    merged) and refused when its hash differs from the one recorded at training time: an adapter
    applied to other weights runs, but computes something nobody trained. merge=True folds the
    adapter into the base (a plain transformers model); else a peft.PeftModel, which computes
    exactly what was trained.
    """
    import warnings

    from peft import PeftModel

    from tunelab.adapters import PEFT_LABELS, PROMPT_LEARNING, fit_for_tunelab

    peft_type = adapter_info(path).get("peft_type")
    if merge and peft_type in PROMPT_LEARNING:  # refused before the base is loaded
        raise ModelError(f"{field}: {path} is a {PEFT_LABELS.get(peft_type, peft_type)} adapter: its virtual tokens "
                         "are inputs, not weights, so peft cannot merge it into the base; use the adapter directory "
                         "itself (tunelab eval/generate and peft load it)")
    base = adapter_base(path, field, base)
    base_model = load_model(base, attn_implementation, field=f"{field} (base of {path})", merge=True)
    base_hash = weights_sha256(base_model)
    expected = adapter_info(path).get("base_weights_sha256")
    if expected and expected != base_hash:
        raise ModelError(f"{field}: {path} was trained on a different base (hash mismatch): {base} has weights "
                         f"sha256 {base_hash[:12]}..., the adapter expects {expected[:12]}...; pass the base it "
                         "was trained on")
    with warnings.catch_warnings():  # peft 0.21 probes a property transformers 5 deprecated
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        # Noise from peft 0.21 for adapters it wrote itself: AdaLoRA's rank pattern read as LoRA's, and
        # LN tuning's norm layers, which have no in/out features to report.
        warnings.filterwarnings("ignore", message="The following rank_pattern keys did not match")
        warnings.filterwarnings("ignore", message="Unsupported layer type")
        model = PeftModel.from_pretrained(base_model, str(path), is_trainable=False)
    if merge:
        try:
            model = model.merge_and_unload()
        except (NotImplementedError, ValueError, TypeError) as err:  # e.g. Lily; a bias adapter on a bias-free base
            raise ModelError(f"{field}: peft cannot merge the {PEFT_LABELS.get(peft_type, peft_type)} adapter {path} "
                             f"into its base ({' '.join(str(err).split())[:200]}); use the adapter directory itself "
                             "(tunelab eval/generate and peft load it)") from None
    else:  # prompt tuning: one logit row per input token, as tunelab's readers expect
        fit_for_tunelab(model)
    return model.eval(), base, base_hash
