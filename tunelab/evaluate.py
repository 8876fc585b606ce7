"""`tunelab eval` and `tunelab generate`: work on any saved model directory."""

from __future__ import annotations

from pathlib import Path

import torch

from tunelab import models
from tunelab.config import SourceSpec, _as_source_list, validate
from tunelab.pretrain import resolve_cache_dir


def run_data_config(model_dir: str):
    """The data section of the run that wrote `model_dir` (its final/ or a checkpoint), else the defaults.

    Evaluation must hold out the same split (eval_fraction) and mask the same way (packing) as training.
    """
    import yaml

    from tunelab.config import DataConfig

    for candidate in (Path(model_dir).parent / "config.yaml", Path(model_dir).parent.parent / "config.yaml"):
        if candidate.is_file():
            try:
                data = yaml.safe_load(candidate.read_text())["data"]
                return DataConfig(eval_fraction=data["eval_fraction"], packing=data["packing"])
            except (KeyError, TypeError, ValueError, yaml.YAMLError):
                break
    return DataConfig()


def evaluate_model(model_dir: str, sources: list[str], seq_len: int = 256, max_tokens: int | None = None,
                   eval_fraction: float | None = None, log=print) -> dict:
    """Per-domain loss / perplexity / bits per byte on each source's held-out split.

    The held-out split is the one training leaves out: same rule, and the same eval_fraction as
    the run that produced the model (read from its config.yaml), so a model is never scored on
    text it was trained on from that source.
    """
    run_data = run_data_config(model_dir)
    if eval_fraction is None:
        eval_fraction = run_data.eval_fraction
    from tunelab.data import tokenize_sources
    from tunelab.eval.perplexity import evaluate_tokens, token_byte_lengths

    tokenizer = models.load_tokenizer(model_dir, "MODEL_DIR")
    model = models.load_model(model_dir, field="MODEL_DIR")
    seq_len = min(seq_len, models.max_positions(model) or seq_len)
    models.check_pair(model, tokenizer, seq_len)
    specs = [validate(s, "--data", SourceSpec) for s in _as_source_list(sources)]
    eos = models.eos_id(tokenizer)
    tokenized = tokenize_sources(specs, tokenizer, eos, resolve_cache_dir(), eval_fraction, log=log)
    objective = "mlm" if models.is_encoder(model) else "clm"
    label_fn = None
    if objective == "mlm":
        from tunelab.train.objectives import fixed_mlm_labeler

        label_fn = fixed_mlm_labeler(tokenizer.mask_token_id, len(tokenizer), list(tokenizer.all_special_ids))
    byte_lengths = token_byte_lengths(tokenizer)
    return {src.domain: evaluate_tokens(model, src.eval, seq_len, eos_id=eos,
                                        document_mask=run_data.packing == "document",
                                        byte_lengths=byte_lengths, max_tokens=max_tokens, objective=objective,
                                        label_fn=label_fn)
            for src in tokenized}


def generate_text(model_dir: str, prompt: str, max_new_tokens: int = 64, greedy: bool = False,
                  temperature: float = 0.8, top_k: int = 50, seed: int = 0) -> str:
    tokenizer = models.load_tokenizer(model_dir, "MODEL_DIR")
    model = models.load_model(model_dir, field="MODEL_DIR")
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
    sampling = {} if greedy else {"temperature": temperature, "top_k": top_k or None}
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=not greedy, pad_token_id=tokenizer.pad_token_id or models.eos_id(tokenizer),
                             **sampling)
    return tokenizer.decode(out[0], skip_special_tokens=True)
