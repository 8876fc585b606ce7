"""The checks before any merging (configs, tensors, vocabularies token by token); the inputs themselves
are resolved by the operation scaffold (ops/operation.py)."""

from __future__ import annotations

import json

from tunelab.errors import ModelError
from tunelab.ops.operation import ModelInput
from tunelab.ops.safetensors_io import FLOAT_DTYPES, WeightFiles


# config.json fields that say nothing about the computation (checked fields: everything else).
CONFIG_IGNORED = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "use_cache", "_commit_hash",
                  "output_attentions", "output_hidden_states", "return_dict"}


def check_configs(inputs: list[ModelInput], sources: list[WeightFiles]) -> None:
    """Same architecture class, same tensors (naming the first that differs), same remaining config fields."""
    configs = [json.loads((i.model_dir / "config.json").read_text()) for i in inputs]
    first = inputs[0]
    for key in ("model_type", "architectures"):
        for item, config in zip(inputs[1:], configs[1:]):
            if config.get(key) != configs[0].get(key):
                raise ModelError(f"models differ: {key} is {config.get(key)} in {item.label} but {configs[0].get(key)} "
                                 f"in {first.label}; merge models of the same architecture")
    check_tensors(sources)
    for item, config in zip(inputs[1:], configs[1:]):
        for key in sorted((set(config) | set(configs[0])) - CONFIG_IGNORED):
            if config.get(key) != configs[0].get(key):
                raise ModelError(f"models differ: config.json {key} is {config.get(key)!r} in {item.label} but "
                                 f"{configs[0].get(key)!r} in {first.label}; merge models of the same architecture")


def check_vocabularies(inputs: list[ModelInput]):
    """Every tokenizer maps the same ids to the same tokens; returns the first one."""
    from tunelab.tokenizers import load_tokenizer, tokenizer_fingerprint

    tokenizers = [load_tokenizer(str(i.model_dir), i.label) for i in inputs]
    first, ref = inputs[0], tokenizers[0]
    ref_print = tokenizer_fingerprint(ref)
    ref_tokens = None
    for item, tok in zip(inputs[1:], tokenizers[1:]):
        if tokenizer_fingerprint(tok) == ref_print:
            continue
        ref_tokens = ref_tokens or ref.convert_ids_to_tokens(list(range(len(ref))))
        tokens = tok.convert_ids_to_tokens(list(range(len(tok))))
        where = "merge models that share one tokenizer"
        for i, (a, b) in enumerate(zip(ref_tokens, tokens)):
            if a != b:
                raise ModelError(f"vocabularies differ: token {i} is {b!r} in {item.label} but {a!r} in {first.label}; "
                                 f"{where}")
        if len(tokens) != len(ref_tokens):
            raise ModelError(f"vocabularies differ: {item.label} has {len(tokens)} tokens, {first.label} "
                             f"{len(ref_tokens)}; {where}")
        specials = (sorted(tok.all_special_tokens), sorted(ref.all_special_tokens))
        if specials[0] != specials[1]:
            raise ModelError(f"vocabularies differ: special tokens {specials[0]} in {item.label} but {specials[1]} "
                             f"in {first.label}; {where}")
    return ref


def check_tensors(sources: list[WeightFiles]) -> list[str]:
    """The tensor names every model has (sorted); a one-line error naming the first tensor that differs."""
    first = sources[0]
    for other in sources[1:]:
        if other.keys() != first.keys():
            extra = sorted(other.keys() - first.keys())
            key = extra[0] if extra else sorted(first.keys() - other.keys())[0]
            has, lacks = (other, first) if extra else (first, other)
            hint = (" (one stores a separate LM head, the other ties it to the embedding: tie_word_embeddings "
                    "differs)" if "lm_head" in key or "embed" in key else "")
            raise ModelError(f"models differ: {has.label} has tensor {key} that {lacks.label} lacks{hint}; merge "
                             "models of the same architecture")
    for key in sorted(first.keys()):
        for other in sources[1:]:
            if other.shape(key) != first.shape(key):
                raise ModelError(f"models differ: tensor {key} is {other.shape(key)} in {other.label} but "
                                 f"{first.shape(key)} in {first.label}; merge models of the same architecture")
            if (other.dtype(key) in FLOAT_DTYPES) != (first.dtype(key) in FLOAT_DTYPES):
                raise ModelError(f"models differ: tensor {key} is {other.dtype(key)} in {other.label} but "
                                 f"{first.dtype(key)} in {first.label}")
    return sorted(first.keys())
