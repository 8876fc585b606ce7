"""`tunelab eval` and `tunelab generate`: work on any saved model directory."""

from __future__ import annotations

from pathlib import Path

import torch

from tunelab import models
from tunelab.config import SourceSpec, _as_source_list, validate
from tunelab.stages.setup import resolve_cache_dir


SPLITS = ("auto", "held-out", "whole")


def run_recipe(model_dir: str) -> dict | None:
    """The resolved recipe of the run that wrote `model_dir` (its final/ or a checkpoint), if any.

    Evaluation must hold out the same split (eval_fraction), mask the same way (packing, MLM
    probability) and know which sources the model was trained on.
    """
    import yaml

    if str(model_dir).startswith("package:"):  # a model shipped in a Python package: no run around it
        return None
    candidates = [Path(model_dir).parent / "config.yaml", Path(model_dir).parent.parent / "config.yaml"]
    try:  # a model written from a run's checkpoints (tunelab average) names the run in its lineage.json
        import json

        run = json.loads((Path(model_dir) / "lineage.json").read_text()).get("run")
        candidates += [Path(run) / "config.yaml"] if isinstance(run, str) else []
    except (OSError, ValueError):
        pass
    for candidate in candidates:
        if candidate.is_file():
            try:
                recipe = yaml.safe_load(candidate.read_text())
                return recipe if isinstance(recipe, dict) and isinstance(recipe.get("data"), dict) else None
            except yaml.YAMLError:
                return None
    return None


def evaluate_model(model_dir: str, sources: list[str], seq_len: int = 256, max_tokens: int | None = None,
                   eval_fraction: float | None = None, base: str | None = None, split: str = "auto",
                   log=print) -> dict:
    """Per-domain loss / perplexity / bits per byte of a model (or adapter) directory.

    split="auto": a source the model or any of its ancestors trained on (by content hash, through
    lineage.json) is scored on its held-out split only (the smallest eval_fraction any of them held
    out), so a model is never scored on text it has seen; any other source is scored whole, as training
    scores its eval-only sources. "held-out" / "whole" force one or the other (to compare models of
    different histories on the same text, use "held-out").
    """
    from tunelab.config import DataConfig, TrainConfig
    from tunelab.data import source_content_hash, tokenize_source
    from tunelab.eval.perplexity import evaluate_tokens, token_byte_lengths
    from tunelab.runs import trained_sources

    if split not in SPLITS:
        from tunelab.errors import ConfigError

        raise ConfigError(f"--split: {split!r} is not one of {', '.join(SPLITS)}")
    recipe = run_recipe(model_dir) or {}
    run_data = recipe.get("data", {})
    defaults = DataConfig()
    explicit_fraction = eval_fraction
    eval_fraction = eval_fraction or run_data.get("eval_fraction", defaults.eval_fraction)
    packing = run_data.get("packing", defaults.packing)
    mlm_probability = recipe.get("train", {}).get("mlm_probability", TrainConfig().mlm_probability)

    tokenizer = models.load_tokenizer(model_dir, "MODEL_DIR")
    model = models.load_model(model_dir, field="MODEL_DIR", base=base)
    seq_len = min(seq_len, models.max_positions(model) or seq_len)
    models.check_pair(model, tokenizer, seq_len)
    specs = [validate(s, "--data", SourceSpec) for s in _as_source_list(sources)]
    eos = models.eos_id(tokenizer)
    objective = "mlm" if models.is_encoder(model) else "clm"
    label_fn = None
    if objective == "mlm":
        from tunelab.train.objectives import fixed_mlm_labeler, word_table

        whole_words = bool(recipe.get("train", {}).get("whole_word_masking", False))  # mask as the run trained
        label_fn = fixed_mlm_labeler(tokenizer.mask_token_id, len(tokenizer), list(tokenizer.all_special_ids),
                                     mlm_probability, word_table=word_table(tokenizer) if whole_words else None)
    byte_lengths = token_byte_lengths(tokenizer)
    cache = resolve_cache_dir()
    seen = trained_sources(model_dir)
    results = {}
    for spec in specs:
        digest = source_content_hash(spec, cache, log=log)
        held_out = split == "held-out" or (split == "auto" and digest in seen)
        fraction = explicit_fraction or seen.get(digest) or eval_fraction
        src = tokenize_source(spec, tokenizer, eos, cache, fraction, log=log, split=held_out)
        results[src.domain] = evaluate_tokens(model, src.eval, seq_len, eos_id=eos, document_mask=packing == "document",
                                              byte_lengths=byte_lengths, max_tokens=max_tokens, objective=objective,
                                              label_fn=label_fn, loss_mask=src.eval_mask)
        results[src.domain]["split"] = "held-out" if held_out else "whole"
    return results


def generate_text(model_dir: str, prompt: str, max_new_tokens: int = 64, greedy: bool = False,
                  temperature: float = 0.8, top_k: int = 50, seed: int = 0, base: str | None = None) -> str:
    tokenizer = models.load_tokenizer(model_dir, "MODEL_DIR")
    model = models.load_model(model_dir, field="MODEL_DIR", base=base)
    if models.is_encoder(model):
        from tunelab.errors import ModelError

        raise ModelError(f"{model_dir}: an encoder (masked LM) cannot generate text; use `tunelab eval` instead")
    torch.manual_seed(seed)
    model.eval()
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    if ids.shape[1] == 0:  # an empty prompt starts from the document separator
        ids = torch.tensor([[models.eos_id(tokenizer)]])
    limit = models.max_positions(model)
    if limit is not None:
        max_new_tokens = max(0, min(max_new_tokens, limit - ids.shape[1]))
    # `or` would treat pad id 0 as missing.
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else models.eos_id(tokenizer)
    sampling = {} if greedy else {"temperature": temperature, "top_k": top_k or None}
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=not greedy, pad_token_id=pad_id,
                             **sampling)
    return tokenizer.decode(out[0], skip_special_tokens=True)
