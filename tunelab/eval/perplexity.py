"""Per-domain held-out loss, perplexity and bits per byte.

Bits per byte = total next-token loss in bits / UTF-8 bytes of the predicted text. Unlike
perplexity it does not depend on the tokenizer, so models with different vocabularies compare.
"""

from __future__ import annotations

import math

import numpy as np
import torch

# Bytes behind each token of a byte-level BPE: every character of the token string is one byte.
_BYTE_LEVEL_ALPHABET: set[str] | None = None


def _byte_level_alphabet() -> set[str]:
    global _BYTE_LEVEL_ALPHABET
    if _BYTE_LEVEL_ALPHABET is None:
        from tokenizers import pre_tokenizers

        _BYTE_LEVEL_ALPHABET = set(pre_tokenizers.ByteLevel.alphabet())
    return _BYTE_LEVEL_ALPHABET


def token_byte_lengths(tokenizer) -> np.ndarray:
    """UTF-8 byte count of each token id; 0 for special tokens.

    Exact for byte-level BPE; for other tokenizers, the length of the decoded token.
    """
    alphabet = _byte_level_alphabet()
    special = set(tokenizer.all_special_ids)
    added = set(tokenizer.get_added_vocab().values())  # stored as plain text, not byte-level symbols
    size = len(tokenizer)
    lengths = np.zeros(size, dtype=np.int64)
    tokens = tokenizer.convert_ids_to_tokens(list(range(size)))
    for i, tok in enumerate(tokens):
        if i in special or tok is None:
            continue
        if i in added:
            lengths[i] = len(tok.encode("utf-8"))
        elif all(ch in alphabet for ch in tok):
            lengths[i] = len(tok)
        else:
            lengths[i] = len(tokenizer.decode([i]).encode("utf-8"))
    return lengths


def window_indices(n_windows: int, max_windows: int) -> np.ndarray:
    """Evenly spread windows over the split, so a capped evaluation still sees all of it."""
    if n_windows <= max_windows:
        return np.arange(n_windows)
    return np.unique(np.linspace(0, n_windows - 1, max_windows).round().astype(np.int64))


def _nats(model, batch: dict[str, torch.Tensor], objective: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed cross-entropy, the target ids) of one batch, the logits whole."""
    # use_cache=False keeps document masking (see methods/base.py lm_loss).
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits.float()
    targets = batch["labels"]
    if objective == "clm":  # shift the targets, not the logits: logits[:, :-1] would be copied by the reshape
        targets = torch.nn.functional.pad(targets[:, 1:], (0, 1), value=-100)  # (batch x seq x vocab floats)
    nats = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                             ignore_index=-100, reduction="sum")
    return nats, targets[targets != -100]


@torch.no_grad()
def evaluate_tokens(model, tokens: np.ndarray, seq_len: int, *, eos_id: int, document_mask: bool,
                    byte_lengths: np.ndarray | None, max_tokens: int | None = None, batch_size: int = 8,
                    device: torch.device = torch.device("cpu"), autocast_dtype: torch.dtype | None = None,
                    objective: str = "clm", label_fn=None, loss_mask: np.ndarray | None = None,
                    starts: np.ndarray | None = None, chunk_tokens: int | None = None) -> dict:
    """Loss over held-out windows of `tokens`. Returns loss, ppl, bpb (None for MLM), eval_tokens.

    `label_fn(batch, window_indices)` labels MLM windows (deterministic masks); `loss_mask` (1 =
    target, aligned with `tokens`) excludes tokens from the loss, as in training. `starts` (a chat
    source's example offsets): whole examples packed into rows, each attending only to itself
    (tunelab.data.rows), so every reply is scored with its whole prompt, however training packed them.
    `chunk_tokens` (train.loss_chunk_tokens, causal LMs): the head's logits `chunk_tokens` targets at a time.
    """
    from tunelab.data import PackedSequences, collate
    from tunelab.data.rows import ExampleRows
    from tunelab.train.chunked_loss import chunked_lm_nats
    from tunelab.train.objectives import add_labels

    if len(tokens) < 2:
        return {"loss": float("nan"), "ppl": float("nan"), "bpb": None, "eval_tokens": 0}
    if starts is not None:
        windows = ExampleRows(tokens, starts, loss_mask, seq_len, pad_id=eos_id)
    else:
        # A split shorter than one window is evaluated as one shorter window.
        seq_len = min(seq_len, len(tokens))
        extra = {} if loss_mask is None else {"loss_mask": loss_mask}
        windows = PackedSequences(tokens, seq_len, eos_id, document_mask, **extra)
    budget = len(windows) if max_tokens is None else max(1, max_tokens // seq_len)
    picked = window_indices(len(windows), budget)
    was_training = model.training
    model.eval()
    total_nats, total_targets, total_bytes = 0.0, 0, 0
    for start in range(0, len(picked), batch_size):
        indices = [int(i) for i in picked[start:start + batch_size]]
        batch = collate([windows[i] for i in indices])
        batch = label_fn(batch, indices) if label_fn is not None else add_labels(batch, "clm")
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            if chunk_tokens is not None and objective == "clm":
                nats, scored = chunked_lm_nats(model, batch, chunk_tokens)
            else:
                nats, scored = _nats(model, batch, objective)
        total_nats += float(nats)
        total_targets += scored.numel()
        if byte_lengths is not None and objective == "clm":
            total_bytes += int(byte_lengths[scored.cpu().numpy()].sum())
    model.train(was_training)
    loss = total_nats / max(1, total_targets)
    bpb = total_nats / math.log(2) / total_bytes if total_bytes else None
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "bpb": bpb, "eval_tokens": total_targets}
